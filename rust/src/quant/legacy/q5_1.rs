//! Q5_1: 32 weights as 5-bit levels with an f16 scale and an f16 offset: x = d * q + m.
//! Block: d (f16) | m (f16) | qh (u32 LE, bit j = bit 4 of level j) | qs[16] = 24 bytes.

use super::{c_trunc_i32, f16_at, f16_bytes, imatrix_weights, pack_q5, q5_level, row_sigma2, QK};
use crate::quant::util::make_qkx3_quants;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 24;

pub struct Q5_1;
pub const Q5_1_KERNELS: Kernels = kernels_of::<Q5_1>();

/// quantize_row_q5_1_ref on one block: m = min, d = (max - min) / 31, q = trunc((x-m)/d + 0.5)
/// (ggml does not clamp here; the levels cannot exceed 31 for finite scales).
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
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    y[2..4].copy_from_slice(&f16_bytes(min));
    let levels: [u8; QK] = std::array::from_fn(|j| c_trunc_i32((x[j] - min) * id + 0.5) as u8);
    let (qh, qs) = y[4..].split_at_mut(4);
    pack_q5(&levels, qh, qs);
}

/// quantize_row_q5_1_impl with importance weights: make_qkx3_quants' weighted scale/min search.
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
            31,
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
        let (qh, qs) = y[4..].split_at_mut(4);
        pack_q5(&l, qh, qs);
    }
}

impl BlockQuant for Q5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;

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
            let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
            for (j, o) in y.iter_mut().enumerate() {
                *o = q5_level(qh, &x[8..], j) as f32 * d + m;
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
    use super::super::{f16_at, f16_bytes, pack_q5, row_sigma2, QK};
    use super::BLOCK_BYTES;

    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8]) {
        for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
            let (d, min, levels) = asymmetric_levels(x, 31, false);
            y[..2].copy_from_slice(&f16_bytes(d));
            y[2..4].copy_from_slice(&f16_bytes(min));
            y[4..8].copy_from_slice(&bit4_mask(levels).to_le_bytes());
            _mm_storeu_si128(
                y[8..].as_mut_ptr() as *mut __m128i,
                nibbles_or(levels, true),
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
            let (d, the_min) = make_qkx3_quants_32(31, x, &weights, &mut l);
            y[..2].copy_from_slice(&f16_bytes(d));
            y[2..4].copy_from_slice(&f16_bytes(-the_min));
            let (qh, qs) = y[4..].split_at_mut(4);
            pack_q5(&l, qh, qs);
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_at(x));
            let m = _mm256_set1_ps(f16_at(&x[2..]));
            let q = unpack_q5_levels(&x[8..], u32::from_le_bytes([x[4], x[5], x[6], x[7]]));
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
        assert_fast_matches_ref(&Q5_1_KERNELS, 256, true);
    }

    #[test]
    fn known_block() {
        // min 0 (all non-negative), max 3.1: d = 0.1, levels round(x / 0.1).
        let x: [f32; QK] = std::array::from_fn(|j| (j as f32) * 0.1);
        let mut y = [0u8; BLOCK_BYTES];
        Q5_1::quantize_row_ref(&x, &mut y, None);
        assert_eq!(f16_at(&y[2..]), 0.0);
        let qh = u32::from_le_bytes([y[4], y[5], y[6], y[7]]);
        for j in 0..QK {
            assert_eq!(q5_level(qh, &y[8..], j) as usize, j);
        }
    }
}
