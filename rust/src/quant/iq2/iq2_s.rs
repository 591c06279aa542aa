//! IQ2_S (2.5625 bpw): per 256 weights, d (f16) | qs[32] (low 8 bits of 10-bit indices into the
//! 1024-point grid) | signs[32] (8 explicit sign bits per 8) | qh[8] (high 2 bits, 4 per byte) |
//! scales[8] (two 4-bit scales) = 82 bytes. Each 16 weights have the scale d·(0.5 + s)/4.
//! llama.cpp does not require an importance matrix for IQ2_S; without one, weights are σ²/4 + x².

use super::iq2_xs::search_scale_16;
use super::{c_max, f16_bits, f16_value, iq2s_search, nearest_int, pattern, GridSearch};
use crate::quant::iq_tables::IQ2S_GRID;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 82;

pub struct Iq2S;
pub const IQ2_S_KERNELS: Kernels = kernels_of::<Iq2S>();

impl BlockQuant for Iq2S {
    const TYPE: GgmlType = GgmlType::IQ2_S;

    /// quantize_row_iq2_s_impl (quantize_iq2_s).
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<false>(src, dst, imatrix)
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<true>(src, dst, imatrix)
    }

    /// dequantize_row_iq2_s.
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            let (qs, signs, qh, sc) = (&x[2..34], &x[34..66], &x[66..74], &x[74..82]);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let db = [
                    d * (0.5 + (sc[ib] & 0xf) as f32) * 0.25,
                    d * (0.5 + (sc[ib] >> 4) as f32) * 0.25,
                ];
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let index =
                        qs[4 * ib + l] as usize | ((qh[ib] as usize) << (8 - 2 * l) & 0x300);
                    let grid = IQ2S_GRID[index].to_le_bytes();
                    let s = signs[4 * ib + l];
                    for j in 0..8 {
                        let v = db[l / 2] * grid[j] as f32;
                        yg[j] = if s & (1 << j) != 0 { -v } else { v };
                    }
                }
            }
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::cpu::has_avx2() {
            // Safety: AVX2 is present.
            return unsafe { avx2::dequantize_row(src, dst) };
        }
        Self::dequantize_row_ref(src, dst)
    }
}

/// ggml's algorithm; FAST only swaps in the AVX2 neighbour search, which returns the same index.
fn quantize_row<const FAST: bool>(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let search = iq2s_search();
    for (ibl, (xbl, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        let qw = imatrix.map(|w| &w[QK_K * ibl..QK_K * (ibl + 1)]);
        quantize_block::<FAST>(search, xbl, qw, y);
    }
}

fn quantize_block<const FAST: bool>(
    search: &GridSearch,
    xbl: &[f32],
    qw_blk: Option<&[f32]>,
    y: &mut [u8],
) {
    let mut scales = [0f32; QK_K / 16];
    let mut weight = [0f32; 16];
    let mut waux = [0f32; 16];
    let mut xval = [0f32; 16];
    let mut levels = [0i8; 16];
    let mut block_signs = [0u8; 2];
    y.fill(0);

    let mut max_scale = 0f32;
    let mut sumx2 = 0f32;
    for &v in xbl {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;

    for ib in 0..QK_K / 16 {
        let xb = &xbl[16 * ib..16 * ib + 16];
        match qw_blk {
            Some(qw) => {
                for i in 0..16 {
                    weight[i] = qw[16 * ib + i] * (sigma2 + xb[i] * xb[i]).sqrt();
                }
            }
            None => {
                for i in 0..16 {
                    weight[i] = 0.25 * sigma2 + xb[i] * xb[i];
                }
            }
        }
        for i in 0..16 {
            waux[i] = weight[i].sqrt();
        }
        for k in 0..2 {
            let mut s = 0u8;
            for i in 8 * k..8 * k + 8 {
                if xb[i] >= 0.0 {
                    xval[i] = xb[i];
                } else {
                    xval[i] = -xb[i];
                    s |= 1 << (i - 8 * k);
                }
            }
            block_signs[k] = s;
        }
        let max = xval[1..].iter().fold(xval[0], |m, &v| c_max(m, v));
        if max < 1e-8 {
            scales[ib] = 0.0;
            continue;
        }
        let mut scale = search_scale_16::<FAST>(search, &xval, &weight, &waux, max, &mut levels);
        if scale < 0.0 {
            scale = -scale;
            for s in block_signs.iter_mut() {
                *s = !*s;
            }
        }
        for k in 0..2 {
            let index = search
                .lookup(pattern(&levels[8 * k..8 * k + 8]))
                .unwrap_or_else(|_| unreachable!("IQ2_S levels off the grid"));
            let i8 = 2 * ib + k;
            y[2 + i8] = index as u8;
            y[66 + i8 / 4] |= ((index >> 8) as u8) << (2 * (i8 % 4));
            y[34 + i8] = block_signs[k];
        }
        scales[ib] = scale;
        max_scale = c_max(max_scale, scale);
    }

    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    y[..2].copy_from_slice(&f16_bits(d * 0.9875).to_le_bytes());
    let id = 1.0 / d;
    for ib in 0..QK_K / 16 {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15) as u8;
        y[74 + ib / 2] |= if ib % 2 == 0 { l } else { l << 4 };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{f16_value, BLOCK_BYTES, IQ2S_GRID, QK_K};
    use crate::quant::iq2::avx2_util::{apply_signs, grid_row};

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            let (qs, signs, qh, sc) = (&x[2..34], &x[34..66], &x[66..74], &x[74..82]);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let db = [
                    _mm256_set1_ps(d * (0.5 + (sc[ib] & 0xf) as f32) * 0.25),
                    _mm256_set1_ps(d * (0.5 + (sc[ib] >> 4) as f32) * 0.25),
                ];
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let index =
                        qs[4 * ib + l] as usize | ((qh[ib] as usize) << (8 - 2 * l) & 0x300);
                    let g = grid_row(IQ2S_GRID[index]);
                    let v = apply_signs(_mm256_mul_ps(db[l / 2], g), signs[4 * ib + l]);
                    _mm256_storeu_ps(yg.as_mut_ptr(), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::{self, assert_fast_matches_ref};

    #[test]
    fn fast_matches_reference() {
        assert_fast_matches_ref(&IQ2_S_KERNELS, 512, true);
    }

    #[test]
    fn quantizes_without_imatrix() {
        let x = testdata::gaussian(3, 256 * 8);
        let rmse = testdata::round_trip_rmse(&IQ2_S_KERNELS, &x, 256, None);
        assert!(rmse < 0.5 * 0.02 && rmse > 0.02 * 0.02, "{rmse}");
    }
}
