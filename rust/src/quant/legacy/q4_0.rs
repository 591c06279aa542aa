//! Q4_0: 32 weights as 4-bit levels around 8 with one f16 scale: x = d * (q - 8).
//! Block: d (f16) | qs[16] (element j in the low nibble of qs[j], element j+16 in the high) = 18 bytes.

use super::{c_level_min, f16_at, f16_bytes, imatrix_weights, row_sigma2, QK};
use crate::quant::util::make_qx_quants;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 18;

pub struct Q4_0;
pub const Q4_0_KERNELS: Kernels = kernels_of::<Q4_0>();

/// quantize_row_q4_0_ref on one block: d = (signed absmax) / -8, q = min(15, trunc(x/d + 8.5)).
fn quantize_block_ref(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    for j in 0..QK / 2 {
        let lo = c_level_min(x[j] * id + 8.5, 15);
        let hi = c_level_min(x[j + QK / 2] * id + 8.5, 15);
        y[2 + j] = lo | (hi << 4);
    }
}

/// quantize_row_q4_0_impl with importance weights: weighted least-squares scale search.
fn quantize_row_imatrix(src: &[f32], dst: &mut [u8], qw: &[f32]) {
    let sigma2 = row_sigma2(src);
    for ((x, y), w) in src
        .chunks_exact(QK)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .zip(qw.chunks_exact(QK))
    {
        let weights = imatrix_weights(x, w, sigma2);
        let mut l = [0i8; QK];
        let d = make_qx_quants(8, x, &mut l, 1, Some(&weights));
        y[..2].copy_from_slice(&f16_bytes(d));
        for j in 0..QK / 2 {
            y[2 + j] = (l[j] as u8) | ((l[j + QK / 2] as u8) << 4);
        }
    }
}

impl BlockQuant for Q4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;

    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        match imatrix {
            Some(qw) => quantize_row_imatrix(src, dst, qw),
            None => {
                for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
                    quantize_block_ref(x, y);
                }
            }
        }
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::cpu::has_avx2() {
            // SAFETY: AVX2 was detected at run time.
            return unsafe {
                match imatrix {
                    None => avx2::quantize_row(src, dst),
                    Some(qw) => avx2::quantize_row_imatrix(src, dst, qw),
                }
            };
        }
        Self::quantize_row_ref(src, dst, imatrix)
    }

    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
            let d = f16_at(x);
            for j in 0..QK / 2 {
                y[j] = ((x[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + QK / 2] = ((x[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::cpu::has_avx2() {
            // SAFETY: AVX2 was detected at run time.
            return unsafe { avx2::dequantize_row(src, dst) };
        }
        Self::dequantize_row_ref(src, dst)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::simd::*;
    use super::super::{f16_at, f16_bytes, row_sigma2, QK};
    use super::BLOCK_BYTES;

    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8]) {
        for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
            let (d, levels) = symmetric_levels(x, 15);
            y[..2].copy_from_slice(&f16_bytes(d));
            _mm_storeu_si128(
                y[2..].as_mut_ptr() as *mut __m128i,
                nibbles_or(levels, false),
            );
        }
    }

    /// The imatrix path, with the scale search evaluated across lanes (same bytes as the reference).
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row_imatrix(src: &[f32], dst: &mut [u8], qw: &[f32]) {
        let sigma2 = row_sigma2(src);
        for ((x, y), w) in src
            .chunks_exact(QK)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
            .zip(qw.chunks_exact(QK))
        {
            let weights = imatrix_weights(x, w, sigma2);
            let mut l = [0i8; QK];
            let d = make_qx_quants_32(8, x, &weights, &mut l);
            y[..2].copy_from_slice(&f16_bytes(d));
            for j in 0..QK / 2 {
                y[2 + j] = (l[j] as u8) | ((l[j + QK / 2] as u8) << 4);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        let eight = _mm256_set1_epi32(8);
        for (x, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_at(x));
            let q = unpack_nibbles(&x[2..]);
            store_block(
                y,
                q.map(|l| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(l, eight)), d)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::assert_fast_matches_ref;

    #[test]
    fn fast_matches_reference() {
        assert_fast_matches_ref(&Q4_0_KERNELS, 256, true);
    }

    #[test]
    fn known_block() {
        // Largest magnitude is -2 (first of ±2), so d = 0.25 and levels are x/0.25 + 8.
        let mut x = [0f32; QK];
        x[0] = 1.0;
        x[3] = -2.0;
        x[5] = 2.0;
        x[20] = 0.5;
        let mut y = [0u8; BLOCK_BYTES];
        Q4_0::quantize_row_ref(&x, &mut y, None);
        assert_eq!(f16_at(&y), 0.25);
        let mut back = [0f32; QK];
        Q4_0::dequantize_row_ref(&y, &mut back);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[3], -2.0);
        assert_eq!(back[5], 1.75); // +2 clips at level 15
        assert_eq!(back[20], 0.5);
    }
}
