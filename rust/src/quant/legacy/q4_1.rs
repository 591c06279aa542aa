//! Q4_1: 32 weights as 4-bit levels with an f16 scale and an f16 offset: x = d * q + m.
//! Block: d (f16) | m (f16) | qs[16] (element j low nibble of qs[j], element j+16 high) = 20 bytes.

use super::{c_level_min, f16_at, f16_bytes, imatrix_weights, row_sigma2, QK};
use crate::quant::util::make_qkx3_quants;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 20;

pub struct Q4_1;
pub const Q4_1_KERNELS: Kernels = kernels_of::<Q4_1>();

/// quantize_row_q4_1_ref on one block: m = min, d = (max - min) / 15, q = min(15, trunc((x-m)/d + 0.5)).
fn quantize_block_ref(x: &[f32], y: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    y[2..4].copy_from_slice(&f16_bytes(min));
    for j in 0..QK / 2 {
        let lo = c_level_min((x[j] - min) * id + 0.5, 15);
        let hi = c_level_min((x[j + QK / 2] - min) * id + 0.5, 15);
        y[4 + j] = lo | (hi << 4);
    }
}

/// quantize_row_q4_1_impl with importance weights: make_qkx3_quants' weighted scale/min search.
fn quantize_row_imatrix(src: &[f32], dst: &mut [u8], qw: &[f32]) {
    let sigma2 = row_sigma2(src);
    for ((x, y), w) in src
        .chunks_exact(QK)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .zip(qw.chunks_exact(QK))
    {
        let weights = imatrix_weights(x, w, sigma2);
        let (mut l, mut laux) = ([0u8; QK], [0u8; QK]);
        let (d, the_min) = make_qkx3_quants(
            15,
            x,
            Some(&weights),
            &mut l,
            &mut laux,
            -0.9,
            0.05,
            36,
            false,
        );
        y[..2].copy_from_slice(&f16_bytes(d));
        y[2..4].copy_from_slice(&f16_bytes(-the_min));
        for j in 0..QK / 2 {
            y[4 + j] = l[j] | (l[j + QK / 2] << 4);
        }
    }
}

impl BlockQuant for Q4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;

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
            let m = f16_at(&x[2..]);
            for j in 0..QK / 2 {
                y[j] = (x[4 + j] & 0x0F) as f32 * d + m;
                y[j + QK / 2] = (x[4 + j] >> 4) as f32 * d + m;
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
            let (d, min, levels) = asymmetric_levels(x, 15, true);
            y[..2].copy_from_slice(&f16_bytes(d));
            y[2..4].copy_from_slice(&f16_bytes(min));
            _mm_storeu_si128(
                y[4..].as_mut_ptr() as *mut __m128i,
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
            let mut l = [0u8; QK];
            let (d, the_min) = make_qkx3_quants_32(15, x, &weights, &mut l);
            y[..2].copy_from_slice(&f16_bytes(d));
            y[2..4].copy_from_slice(&f16_bytes(-the_min));
            for j in 0..QK / 2 {
                y[4 + j] = l[j] | (l[j + QK / 2] << 4);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_at(x));
            let m = _mm256_set1_ps(f16_at(&x[2..]));
            let q = unpack_nibbles(&x[4..]);
            // mul then add, never fused, like ggml's x*d + m.
            store_block(
                y,
                q.map(|l| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(l), d), m)),
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
        assert_fast_matches_ref(&Q4_1_KERNELS, 256, true);
    }

    #[test]
    fn known_block() {
        // min -1, max 2: d = 0.2, levels (x + 1) / 0.2.
        let x: [f32; QK] = std::array::from_fn(|j| {
            if j == 7 {
                -1.0
            } else if j == 30 {
                2.0
            } else {
                0.0
            }
        });
        let mut y = [0u8; BLOCK_BYTES];
        Q4_1::quantize_row_ref(&x, &mut y, None);
        assert_eq!(f16_at(&y[2..]), -1.0);
        assert_eq!(y[4 + 7] & 0x0F, 0);
        assert_eq!(y[4 + 14] >> 4, 15);
        assert_eq!(y[4] & 0x0F, 5);
    }

    #[test]
    fn signed_zero_min_follows_ggml_scan_order() {
        // The first zero is -0.0, so ggml's `v < min` scan keeps it: m is stored as f16 -0.0.
        let mut x = [0f32; QK];
        x[0] = -0.0;
        x[9] = 0.5;
        let mut a = [0u8; BLOCK_BYTES];
        let mut b = [0u8; BLOCK_BYTES];
        Q4_1::quantize_row_ref(&x, &mut a, None);
        Q4_1::quantize_row(&x, &mut b, None);
        assert_eq!(&a[2..4], &[0x00, 0x80]);
        assert_eq!(a, b);
        x[0] = 0.0;
        x[1] = -0.0;
        Q4_1::quantize_row_ref(&x, &mut a, None);
        Q4_1::quantize_row(&x, &mut b, None);
        assert_eq!(&a[2..4], &[0x00, 0x00]);
        assert_eq!(a, b);
    }
}
