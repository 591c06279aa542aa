//! IQ3_S: 256 weights; per 32: eight 9-bit indices into the 512-point grid (groups of 4), 32 explicit
//! signs and a 4-bit scale. Block: d (f16) | qs[64] (index low bytes) | qh[8] (index 9th bits) |
//! signs[32] | scales[4] (two 4-bit scales per byte) = 110 bytes.

use half::f16;

use super::{grid_s, nearest_int, search_ref, weights, SearchFn, SearchParams, SubBlock};
#[cfg(target_arch = "x86_64")]
use crate::quant::cpu;
use crate::quant::iq_tables::IQ3S_GRID;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 110;
const QS: usize = 2;
const QH: usize = 66;
const SIGNS: usize = 74;
const SCALES: usize = 106;
const PARAMS: SearchParams = SearchParams {
    nstep: 9,
    xxs: false,
};

pub struct Iq3S;
pub const IQ3_S_KERNELS: Kernels = kernels_of::<Iq3S>();

/// `quantize_row_iq3_s_impl(32, ...)` for one row.
fn quantize_row_with(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>, search: SearchFn) {
    let g = grid_s();
    let mut weight = [0f32; 32];
    let mut waux = [0f32; 32];
    let mut xval = [0f32; 32];
    let mut l = [0i8; 32];
    for (ibl, (xbl, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        y.fill(0);
        let mut scales = [0f32; 8];
        let mut max_scale = 0f32;
        let mut sumx2 = 0f32;
        for v in xbl {
            sumx2 += v * v;
        }
        let sigma2 = 2.0 * sumx2 / QK_K as f32;
        // Write cursors into qs and signs. ggml advances them only for sub-blocks it quantizes, so
        // after an all-zero sub-block the later ones land one slot early; kept for identical bytes.
        let (mut qs_at, mut signs_at) = (QS, SIGNS);
        for ib in 0..8 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            let qw = imatrix.map(|w| &w[QK_K * ibl + 32 * ib..]);
            weights(xb, qw, sigma2, &mut weight, &mut waux);
            let mut block_signs = [0u8; 4];
            for k in 0..4 {
                let mut s = 0u8;
                for i in 0..8 {
                    let v = xb[8 * k + i];
                    if v >= 0.0 {
                        xval[8 * k + i] = v;
                    } else {
                        xval[8 * k + i] = -v;
                        s |= 1 << i;
                    }
                }
                block_signs[k] = s;
            }
            let mut max = xval[0];
            for &v in &xval[1..] {
                max = if max > v { max } else { v };
            }
            l.fill(0);
            if max == 0.0 {
                scales[ib] = 0.0;
                continue;
            }
            let sb = SubBlock {
                xval: &xval,
                weight: &weight,
                waux: &waux,
                max,
            };
            let mut scale = search(g, PARAMS, &sb, &mut l);
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s;
                }
            }
            for k in 0..8 {
                let m = g.map[super::Iq3Grid::key(&l[4 * k..4 * k + 4])];
                assert!(m >= 0, "IQ3_S: levels left off the grid");
                y[qs_at + k] = m as u8;
                y[QH + ib] |= ((m >> 8) as u8) << k;
            }
            qs_at += 8;
            y[signs_at..signs_at + 4].copy_from_slice(&block_signs);
            signs_at += 4;
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / 31.0;
        // ggml's fudge factor on the stored scale.
        y[..2].copy_from_slice(&f16::from_f32(d * 1.033).to_bits().to_le_bytes());
        let id = 1.0 / d;
        for ib in (0..8).step_by(2) {
            let l1 = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
            let l2 = nearest_int(0.5 * (id * scales[ib + 1] - 1.0)).clamp(0, 15);
            y[SCALES + ib / 2] = (l1 | (l2 << 4)) as u8;
        }
    }
}

/// Grid index of group `k` (0..8) of sub-block `ib`.
#[inline]
fn grid_index(x: &[u8], ib: usize, k: usize) -> usize {
    x[QS + 8 * ib + k] as usize | (((x[QH + ib] >> k) & 1) as usize) << 8
}

/// The scale of sub-block `ib`: d · (1 + 2·s).
#[inline]
fn sub_scale(x: &[u8], d: f32, ib: usize) -> f32 {
    d * (1 + 2 * ((x[SCALES + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32) as f32
}

impl BlockQuant for Iq3S {
    const TYPE: GgmlType = GgmlType::IQ3_S;

    /// ggml's `quantize_iq3_s` (`quantize_row_iq3_s_impl` with 32-weight sub-blocks), imatrix optional.
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row_with(src, dst, imatrix, search_ref);
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        #[cfg(target_arch = "x86_64")]
        if cpu::has_avx2() {
            return quantize_row_with(src, dst, imatrix, super::avx2::search);
        }
        Self::quantize_row_ref(src, dst, imatrix)
    }

    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32();
            for ib in 0..8 {
                let db = sub_scale(x, d, ib);
                for k in 0..8 {
                    let grid = IQ3S_GRID[grid_index(x, ib, k)];
                    let signs = x[SIGNS + 4 * ib + k / 2];
                    for j in 0..4 {
                        let sign = if signs & (1 << (4 * (k % 2) + j)) != 0 {
                            -1.0
                        } else {
                            1.0
                        };
                        y[32 * ib + 4 * k + j] = db * ((grid >> (8 * j)) & 0xff) as f32 * sign;
                    }
                }
            }
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if cpu::has_avx2() {
            // SAFETY: AVX2 was detected.
            return unsafe { avx2::dequantize_row(src, dst) };
        }
        Self::dequantize_row_ref(src, dst)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{grid_index, sub_scale, BLOCK_BYTES, IQ3S_GRID, SIGNS};
    use crate::types::QK_K;

    /// Two grid points (8 magnitudes) per step, signs applied by multiplying by ±1 as ggml does.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let (plus, minus) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-1.0));
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = half::f16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32();
            for ib in 0..8 {
                let db = _mm256_set1_ps(sub_scale(x, d, ib));
                for l in 0..4 {
                    let g1 = IQ3S_GRID[grid_index(x, ib, 2 * l)];
                    let g2 = IQ3S_GRID[grid_index(x, ib, 2 * l + 1)];
                    let g = _mm_set_epi32(0, 0, g2 as i32, g1 as i32);
                    let mag = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(g));
                    let signs = _mm256_set1_epi32(x[SIGNS + 4 * ib + l] as i32);
                    let neg = _mm256_cmpeq_epi32(_mm256_and_si256(signs, bits), bits);
                    let sign = _mm256_blendv_ps(plus, minus, _mm256_castsi256_ps(neg));
                    let v = _mm256_mul_ps(_mm256_mul_ps(db, mag), sign);
                    _mm256_storeu_ps(y.as_mut_ptr().add(32 * ib + 8 * l), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::{assert_fast_matches_ref, gaussian, round_trip_rmse};

    #[test]
    fn fast_matches_reference() {
        assert_fast_matches_ref(&IQ3_S_KERNELS, 256, true);
    }

    #[test]
    fn round_trip_error_is_moderate() {
        let x = gaussian(3, 2048);
        let rmse = round_trip_rmse(&IQ3_S_KERNELS, &x, 512, None);
        assert!(rmse < 0.0035, "{rmse}");
    }

    #[test]
    fn zero_sub_block_shifts_later_ones_like_ggml() {
        // ggml does not advance its qs/signs cursors past an all-zero sub-block; neither do we.
        let mut x = gaussian(8, 256);
        x[..32].fill(0.0);
        let mut q = vec![0u8; BLOCK_BYTES];
        Iq3S::quantize_row_ref(&x, &mut q, None);
        assert_eq!(&q[QS + 56..QS + 64], &[0; 8]);
        assert_eq!(&q[SIGNS + 28..SIGNS + 32], &[0; 4]);
        let neg: Vec<u8> = (0..4)
            .map(|k| (0..8).fold(0, |s, i| s | (((x[32 + 8 * k + i] < 0.0) as u8) << i)))
            .collect();
        assert_eq!(&q[SIGNS..SIGNS + 4], &neg[..]);
    }
}
