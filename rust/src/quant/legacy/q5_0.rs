//! Q5_0: 32 weights as 5-bit levels around 16 with one f16 scale: x = d * (q - 16).
//! Block: d (f16) | qh (u32 LE, bit j = bit 4 of level j) | qs[16] (low nibbles, j and j+16) = 22 bytes.

use super::{c_level_min, f16_at, f16_bytes, imatrix_weights, pack_q5, q5_level, row_sigma2, QK};
use crate::quant::util::make_qx_quants;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 22;

pub struct Q5_0;
pub const Q5_0_KERNELS: Kernels = kernels_of::<Q5_0>();

/// quantize_row_q5_0_ref on one block: d = (signed absmax) / -16, q = min(31, trunc(x/d + 16.5)).
fn quantize_block_ref(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    let levels: [u8; QK] = std::array::from_fn(|j| c_level_min(x[j] * id + 16.5, 31));
    let (qh, qs) = y[2..].split_at_mut(4);
    pack_q5(&levels, qh, qs);
}

/// quantize_row_q5_0_impl with importance weights: weighted least-squares scale search.
fn quantize_row_imatrix(src: &[f32], dst: &mut [u8], qw: &[f32]) {
    let sigma2 = row_sigma2(src);
    for ((x, y), w) in src
        .chunks_exact(QK)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .zip(qw.chunks_exact(QK))
    {
        let weights = imatrix_weights(x, w, sigma2);
        let mut l = [0i8; QK];
        let d = make_qx_quants(16, x, &mut l, 1, Some(&weights));
        y[..2].copy_from_slice(&f16_bytes(d));
        let levels: [u8; QK] = l.map(|v| v as u8);
        let (qh, qs) = y[2..].split_at_mut(4);
        pack_q5(&levels, qh, qs);
    }
}

impl BlockQuant for Q5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;

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
            let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
            for (j, o) in y.iter_mut().enumerate() {
                *o = (q5_level(qh, &x[6..], j) as i32 - 16) as f32 * d;
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
            let (d, levels) = symmetric_levels(x, 31);
            y[..2].copy_from_slice(&f16_bytes(d));
            y[2..6].copy_from_slice(&bit4_mask(levels).to_le_bytes());
            _mm_storeu_si128(
                y[6..].as_mut_ptr() as *mut __m128i,
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
            let mut l = [0i8; QK];
            let d = make_qx_quants_32(16, x, &weights, &mut l);
            y[..2].copy_from_slice(&f16_bytes(d));
            let (qh, qs) = y[2..].split_at_mut(4);
            pack_q5(&l.map(|v| v as u8), qh, qs);
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        let sixteen = _mm256_set1_epi32(16);
        for (x, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_at(x));
            let q = unpack_q5_levels(&x[6..], u32::from_le_bytes([x[2], x[3], x[4], x[5]]));
            store_block(
                y,
                q.map(|l| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(l, sixteen)), d)),
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
        assert_fast_matches_ref(&Q5_0_KERNELS, 256, true);
    }

    #[test]
    fn known_block() {
        // Largest magnitude 4 (positive), so d = -0.25 and q = 16 - x/0.25.
        let x: [f32; QK] = std::array::from_fn(|j| match j {
            2 => 4.0,
            17 => -3.75,
            31 => 1.0,
            _ => 0.0,
        });
        let mut y = [0u8; BLOCK_BYTES];
        Q5_0::quantize_row_ref(&x, &mut y, None);
        assert_eq!(f16_at(&y), -0.25);
        let mut back = [0f32; QK];
        Q5_0::dequantize_row_ref(&y, &mut back);
        assert_eq!(back[2], 4.0);
        assert_eq!(back[17], -3.75);
        assert_eq!(back[31], 1.0);
        assert_eq!(back[0], 0.0);
    }
}
