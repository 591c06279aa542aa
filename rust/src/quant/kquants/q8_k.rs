//! Q8_K: ggml's intermediate format for the activations of k-quant dot products: 256 int8
//! levels with an f32 scale and the sums of each 16 levels.
//! Block: d (f32) | qs[256] (i8) | bsums[16] (i16) = 292 bytes.

use super::QK_K;
use crate::quant::util::nearest_int;
use crate::quant::{cpu, kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 292;

pub struct Q8K;
pub const Q8_K_KERNELS: Kernels = kernels_of::<Q8K>();

/// Signed value of largest magnitude (the first on ties), and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn write_bsums(y: &mut [u8]) {
    for j in 0..16 {
        let sum: i32 = y[4 + 16 * j..20 + 16 * j]
            .iter()
            .map(|q| *q as i8 as i32)
            .sum();
        y[260 + 2 * j..262 + 2 * j].copy_from_slice(&(sum as i16).to_le_bytes());
    }
}

impl BlockQuant for Q8K {
    const TYPE: GgmlType = GgmlType::Q8_K;

    /// quantize_row_q8_K_ref: iscale = -127/max (max the signed absmax), q = min(127, round).
    /// An all-zero block is written as zeros (ggml leaves its bsums unwritten).
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
        for (x, y) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        {
            let (amax, max) = signed_absmax(x);
            if amax == 0.0 {
                y.fill(0);
                continue;
            }
            let iscale = -127.0 / max;
            for (q, v) in y[4..260].iter_mut().zip(x) {
                *q = nearest_int(iscale * v).min(127) as i8 as u8;
            }
            write_bsums(y);
            y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
        }
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        if cpu::has_avx2() {
            // SAFETY: AVX2 is present (checked at run time).
            unsafe { avx2::quantize_row(src, dst) }
        } else {
            Self::quantize_row_ref(src, dst, imatrix)
        }
    }

    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            for (o, q) in y.iter_mut().zip(&x[4..260]) {
                *o = d * *q as i8 as f32;
            }
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        if cpu::has_avx2() {
            // SAFETY: AVX2 is present (checked at run time).
            unsafe { avx2::dequantize_row(src, dst) }
        } else {
            Self::dequantize_row_ref(src, dst)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// ggml's scan keeps the first element of largest magnitude: find the maximum magnitude
    /// (order-independent), then the first element that has it.
    #[inline(always)]
    unsafe fn signed_absmax_avx2(x: &[f32]) -> (f32, f32) {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        for k in 0..QK_K / 8 {
            m = _mm256_max_ps(
                m,
                _mm256_andnot_ps(sign, _mm256_loadu_ps(x.as_ptr().add(8 * k))),
            );
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
        if amax == 0.0 {
            return (0.0, 0.0);
        }
        let target = _mm256_set1_ps(amax);
        for k in 0..QK_K / 8 {
            let v = _mm256_loadu_ps(x.as_ptr().add(8 * k));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                _mm256_andnot_ps(sign, v),
                target,
            ));
            if hit != 0 {
                return (amax, x[8 * k + hit.trailing_zeros() as usize]);
            }
        }
        unreachable!("the maximum magnitude is one of the elements")
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8]) {
        let magic = _mm256_set1_ps(12_582_912.0);
        let mant = _mm256_set1_epi32(0x007f_ffff);
        let bias = _mm256_set1_epi32(0x0040_0000);
        let top = _mm256_set1_epi32(127);
        let byte = _mm256_set1_epi32(0xFF);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (x, y) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        {
            let (amax, max) = signed_absmax_avx2(x);
            if amax == 0.0 {
                y.fill(0);
                continue;
            }
            let iscale = -127.0 / max;
            let vs = _mm256_set1_ps(iscale);
            let mut sums = [0i32; 16];
            for c in 0..8 {
                let mut q = [_mm256_setzero_si256(); 4];
                for (k, qk) in q.iter_mut().enumerate() {
                    let v = _mm256_loadu_ps(x.as_ptr().add(32 * c + 8 * k));
                    let t = _mm256_castps_si256(_mm256_add_ps(_mm256_mul_ps(vs, v), magic));
                    let v =
                        _mm256_min_epi32(_mm256_sub_epi32(_mm256_and_si256(t, mant), bias), top);
                    // Keep the low byte, as C's int -> int8_t store does (an infinite iscale from
                    // a denormal max yields out-of-range values that must wrap, not saturate).
                    *qk = _mm256_and_si256(v, byte);
                }
                let p = _mm256_packus_epi16(
                    _mm256_packus_epi32(q[0], q[1]),
                    _mm256_packus_epi32(q[2], q[3]),
                );
                let p = _mm256_permutevar8x32_epi32(p, order);
                _mm256_storeu_si256(y.as_mut_ptr().add(4 + 32 * c) as *mut __m256i, p);
                // bsums of the two 16-element groups: sums of the stored (sign-extended) bytes.
                let mut s8 = q;
                for v in s8.iter_mut() {
                    *v = _mm256_srai_epi32(_mm256_slli_epi32(*v, 24), 24);
                }
                let a = _mm256_add_epi32(s8[0], s8[1]);
                let b = _mm256_add_epi32(s8[2], s8[3]);
                let h = _mm256_hadd_epi32(a, b);
                let h = _mm256_hadd_epi32(h, h);
                let h = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                sums[2 * c] = _mm_cvtsi128_si32(h);
                sums[2 * c + 1] = _mm_extract_epi32::<1>(h);
            }
            for (j, s) in sums.iter().enumerate() {
                y[260 + 2 * j..262 + 2 * j].copy_from_slice(&(*s as i16).to_le_bytes());
            }
            y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = _mm256_set1_ps(f32::from_le_bytes([x[0], x[1], x[2], x[3]]));
            for g in 0..32 {
                let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    x.as_ptr().add(4 + 8 * g) as *const __m128i
                ));
                _mm256_storeu_ps(
                    y.as_mut_ptr().add(8 * g),
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(b)),
                );
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8]) {
        <super::Q8K as super::BlockQuant>::quantize_row_ref(src, dst, None)
    }
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        <super::Q8K as super::BlockQuant>::dequantize_row_ref(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kquants::test_support::{fast_matches_reference, rmse_within};

    #[test]
    fn fast_matches_ref() {
        fast_matches_reference(&Q8_K_KERNELS, false);
    }

    #[test]
    fn round_trip_error() {
        rmse_within(&Q8_K_KERNELS, 0.02);
    }

    #[test]
    fn ties_keep_the_first_largest_magnitude() {
        // The sign of the first element of largest magnitude sets the sign of d.
        for (first, second) in [(5usize, 200usize), (200, 5), (7, 8), (255, 0)] {
            let mut x = crate::quant::testdata::gaussian(first as u64, 256);
            x[first] = -3.0;
            x[second] = 3.0;
            let (mut a, mut b) = (vec![0u8; BLOCK_BYTES], vec![0u8; BLOCK_BYTES]);
            Q8K::quantize_row_ref(&x, &mut a, None);
            Q8K::quantize_row(&x, &mut b, None);
            assert_eq!(a, b);
            let d = f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
            assert_eq!(d > 0.0, first < second, "d = {d}");
        }
    }

    #[test]
    fn bsums_are_sums_of_16_levels() {
        let x = crate::quant::testdata::heavy_tailed(3, 256);
        let mut y = vec![0u8; BLOCK_BYTES];
        Q8K::quantize_row_ref(&x, &mut y, None);
        for j in 0..16 {
            let s: i32 = y[4 + 16 * j..20 + 16 * j]
                .iter()
                .map(|q| *q as i8 as i32)
                .sum();
            assert_eq!(
                i16::from_le_bytes([y[260 + 2 * j], y[261 + 2 * j]]) as i32,
                s
            );
        }
    }
}
