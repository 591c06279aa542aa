//! IQ3_XXS: 256 weights; per 32: eight grid indices (groups of 4 on the 256-point grid), four 7-bit
//! sign sets (the 8th sign of each 8 is implied by even parity) and a 4-bit scale.
//! Block: d (f16) | qs[64] (grid indices) | 8 × u32 (signs in bits 0..28, scale in 28..32) = 98 bytes.

use half::f16;

use super::{grid_xxs, nearest_int, search_ref, weights, SearchFn, SearchParams, SubBlock};
#[cfg(target_arch = "x86_64")]
use crate::quant::cpu;
use crate::quant::iq_tables::{IQ3XXS_GRID, KSIGNS_IQ2XS};
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 98;
/// ggml's GROUP_MAX_EPS_IQ3_XXS: sub-blocks below this magnitude get scale 0.
const GROUP_MAX_EPS: f32 = 1e-8;
const PARAMS: SearchParams = SearchParams {
    nstep: 15,
    xxs: true,
};

pub struct Iq3Xxs;
pub const IQ3_XXS_KERNELS: Kernels = kernels_of::<Iq3Xxs>();

/// `quantize_row_iq3_xxs_impl(256, ...)` for one row.
fn quantize_row_with(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>, search: SearchFn) {
    let g = grid_xxs();
    let mut weight = [0f32; 32];
    let mut waux = [0f32; 32];
    let mut xval = [0f32; 32];
    let mut l = [0i8; 32];
    for (ibl, (xbl, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        let mut q3 = [0u8; 64];
        let mut scales_and_signs = [0u32; 8];
        let mut scales = [0f32; 8];
        let mut max_scale = 0f32;
        let mut sumx2 = 0f32;
        for v in xbl {
            sumx2 += v * v;
        }
        let sigma2 = 2.0 * sumx2 / QK_K as f32;
        for ib in 0..8 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            let qw = imatrix.map(|w| &w[QK_K * ibl + 32 * ib..]);
            weights(xb, qw, sigma2, &mut weight, &mut waux);
            let mut block_signs = [0u8; 4];
            for k in 0..4 {
                let mut nflip = 0;
                let mut s = 0u8;
                for i in 0..8 {
                    let v = xb[8 * k + i];
                    if v >= 0.0 {
                        xval[8 * k + i] = v;
                    } else {
                        xval[8 * k + i] = -v;
                        nflip += 1;
                        s |= 1 << i;
                    }
                }
                if nflip % 2 == 1 {
                    // An odd number of minus signs cannot be stored: flip the least important weight.
                    let mut imin = 0;
                    let mut min = weight[8 * k] * xb[8 * k] * xb[8 * k];
                    for i in 1..8 {
                        let ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                        if ax < min {
                            min = ax;
                            imin = i;
                        }
                    }
                    xval[8 * k + imin] = -xval[8 * k + imin];
                    s ^= 1 << imin;
                }
                block_signs[k] = s & 127;
            }
            let mut max = xval[0];
            for &v in &xval[1..] {
                max = if max > v { max } else { v };
            }
            l.fill(0);
            if max < GROUP_MAX_EPS {
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
                    *s = !*s & 127;
                }
            }
            for k in 0..8 {
                let m = g.map[super::Iq3Grid::key(&l[4 * k..4 * k + 4])];
                assert!(m >= 0, "IQ3_XXS: levels left off the grid");
                q3[8 * ib + k] = m as u8;
            }
            scales_and_signs[ib] = block_signs[0] as u32
                | (block_signs[1] as u32) << 7
                | (block_signs[2] as u32) << 14
                | (block_signs[3] as u32) << 21;
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            y.fill(0);
            continue;
        }
        let d = max_scale / 31.0;
        // ggml's fudge factor on the stored scale.
        y[..2].copy_from_slice(&f16::from_f32(d * 1.0125).to_bits().to_le_bytes());
        let id = 1.0 / d;
        for ib in 0..8 {
            let ls = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
            scales_and_signs[ib] |= (ls as u32) << 28;
        }
        y[2..66].copy_from_slice(&q3);
        for (o, v) in y[66..].chunks_exact_mut(4).zip(scales_and_signs) {
            o.copy_from_slice(&v.to_le_bytes());
        }
    }
}

impl BlockQuant for Iq3Xxs {
    const TYPE: GgmlType = GgmlType::IQ3_XXS;

    /// ggml's `quantize_iq3_xxs` / `quantize_row_iq3_xxs_impl(256, ...)`, imatrix optional.
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
                let aux = u32::from_le_bytes(x[66 + 4 * ib..70 + 4 * ib].try_into().unwrap());
                let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
                for l in 0..4 {
                    let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                    for half in 0..2 {
                        let grid = IQ3XXS_GRID[x[2 + 8 * ib + 2 * l + half] as usize];
                        for j in 0..4 {
                            let sign = if signs & (1 << (4 * half + j)) != 0 {
                                -1.0
                            } else {
                                1.0
                            };
                            y[32 * ib + 8 * l + 4 * half + j] =
                                db * ((grid >> (8 * j)) & 0xff) as f32 * sign;
                        }
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

    use super::{BLOCK_BYTES, IQ3XXS_GRID, KSIGNS_IQ2XS};
    use crate::types::QK_K;

    /// Two grid points (8 magnitudes) per step; signs applied by multiplying by ±1 as ggml does
    /// (a sign-bit flip would differ on NaN scales from corrupt blocks).
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
                let aux = u32::from_le_bytes(x[66 + 4 * ib..70 + 4 * ib].try_into().unwrap());
                let db = _mm256_set1_ps(d * (0.5 + (aux >> 28) as f32) * 0.5);
                for l in 0..4 {
                    let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize] as i32;
                    let g1 = IQ3XXS_GRID[x[2 + 8 * ib + 2 * l] as usize];
                    let g2 = IQ3XXS_GRID[x[3 + 8 * ib + 2 * l] as usize];
                    let g = _mm_set_epi32(0, 0, g2 as i32, g1 as i32);
                    let mag = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(g));
                    let neg =
                        _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(signs), bits), bits);
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
        assert_fast_matches_ref(&IQ3_XXS_KERNELS, 256, true);
    }

    #[test]
    fn round_trip_error_is_moderate() {
        let x = gaussian(3, 2048);
        let rmse = round_trip_rmse(&IQ3_XXS_KERNELS, &x, 512, None);
        assert!(rmse < 0.0046, "{rmse}");
    }
}
