//! IQ2_XS (2.3125 bpw): per 256 weights, d (f16) | 32 × u16 (9-bit index into the 512-point
//! grid, 7 sign bits) | 8 bytes of two 4-bit scales = 74 bytes. Each 16 weights have the scale
//! d·(0.5 + s)/4; the eighth sign of each 8 makes the count of negatives even.

use super::trials::Trials;
use super::{
    c_max, even_signs, f16_bits, f16_value, iq2xs_search, nearest_int, pattern, GridSearch,
    OffGrid, IQ2_SEARCH_VALUES,
};
use crate::quant::iq_tables::{IQ2XS_GRID, KSIGNS_IQ2XS};
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 74;

pub struct Iq2Xs;
pub const IQ2_XS_KERNELS: Kernels = kernels_of::<Iq2Xs>();

impl BlockQuant for Iq2Xs {
    const TYPE: GgmlType = GgmlType::IQ2_XS;
    const REQUIRES_IMATRIX: bool = true;

    /// quantize_row_iq2_xs_impl with quant_weights (ggml requires them).
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<false>(src, dst, imatrix)
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<true>(src, dst, imatrix)
    }

    /// dequantize_row_iq2_xs.
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            let (qs, sc) = (&x[2..66], &x[66..74]);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let db = [
                    d * (0.5 + (sc[ib] & 0xf) as f32) * 0.25,
                    d * (0.5 + (sc[ib] >> 4) as f32) * 0.25,
                ];
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let q = u16::from_le_bytes([qs[8 * ib + 2 * l], qs[8 * ib + 2 * l + 1]]);
                    let grid = IQ2XS_GRID[(q & 511) as usize].to_le_bytes();
                    let signs = KSIGNS_IQ2XS[(q >> 9) as usize];
                    for j in 0..8 {
                        let v = db[l / 2] * grid[j] as f32;
                        yg[j] = if signs & (1 << j) != 0 { -v } else { v };
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

const K_MAX_Q: i32 = 3;

/// ggml's algorithm; FAST only swaps in the AVX2 neighbour search, which returns the same index.
fn quantize_row<const FAST: bool>(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let qw_row = imatrix.expect("IQ2_XS needs an importance matrix (the quantize driver checks)");
    let search = iq2xs_search();
    for ((xbl, y), qw) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .zip(qw_row.chunks_exact(QK_K))
    {
        quantize_block::<FAST>(search, xbl, qw, y);
    }
}

pub(super) fn best_neighbour<const FAST: bool>(
    search: &GridSearch,
    off: OffGrid,
    xval: &[f32],
    waux: &[f32],
    scale: f32,
    levels: &mut [i8],
) {
    let j = if FAST {
        search.best_neighbour(off, &IQ2_SEARCH_VALUES, xval, waux, scale)
    } else {
        search.best_neighbour_ref(off, &IQ2_SEARCH_VALUES, xval, waux, scale)
    };
    for (l, &g) in levels.iter_mut().zip(search.levels(j)) {
        *l = g as i8;
    }
}

/// The scale search over 16 weights shared by IQ2_XS and IQ2_S (their loops are identical):
/// returns the scale and leaves the chosen on-grid levels in `levels`.
pub(super) fn search_scale_16<const FAST: bool>(
    search: &GridSearch,
    xval: &[f32; 16],
    weight: &[f32; 16],
    waux: &[f32; 16],
    max: f32,
    levels: &mut [i8; 16],
) -> f32 {
    let ids: [f32; 19] =
        std::array::from_fn(|j| ((2 * K_MAX_Q - 1) as f32 + (j as i32 - 9) as f32 * 0.1) / max);
    let mut trials = Trials::<16>::new();
    if FAST {
        trials.run(search, xval, weight, waux, &ids);
    } else {
        trials.run_ref(search, xval, weight, waux, &ids);
    }
    let mut best = 0f32;
    let mut scale = max / (2 * K_MAX_Q - 1) as f32;
    let mut on_grid = [true; 2];
    levels.fill(0);
    for t in 0..ids.len() {
        let (sumqx, sumq2) = (trials.sumqx[t], trials.sumq2[t]);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            trials.levels_of(t, levels);
            on_grid = [trials.on_grid[t][0], trials.on_grid[t][1]];
        }
    }
    if on_grid.contains(&false) && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..2 {
            if on_grid[k] {
                continue;
            }
            let r = 8 * k..8 * k + 8;
            for i in r.clone() {
                levels[i] = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, K_MAX_Q - 1) as i8;
            }
            if let Err(off) = search.lookup(pattern(&levels[r.clone()])) {
                best_neighbour::<FAST>(
                    search,
                    off,
                    &xval[r.clone()],
                    &waux[r.clone()],
                    scale,
                    &mut levels[r],
                );
            }
        }
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for i in 0..16 {
            let w = weight[i];
            let q = (2 * levels[i] as i32 + 1) as f32;
            sumqx += w * xval[i] * q;
            sumq2 += w * q * q;
        }
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    scale
}

fn quantize_block<const FAST: bool>(
    search: &GridSearch,
    xbl: &[f32],
    qw_blk: &[f32],
    y: &mut [u8],
) {
    let mut scales = [0f32; QK_K / 16];
    let mut q2 = [0u16; QK_K / 8];
    let mut weight = [0f32; 16];
    let mut waux = [0f32; 16];
    let mut xval = [0f32; 16];
    let mut levels = [0i8; 16];
    let mut block_signs = [0u8; 2];

    let mut max_scale = 0f32;
    let mut sumx2 = 0f32;
    for &v in xbl {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;

    for ib in 0..QK_K / 16 {
        let xb = &xbl[16 * ib..16 * ib + 16];
        let qw = &qw_blk[16 * ib..16 * ib + 16];
        for i in 0..16 {
            weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
        }
        for i in 0..16 {
            waux[i] = weight[i].sqrt();
        }
        for k in 0..2 {
            let r = 8 * k..8 * k + 8;
            block_signs[k] = even_signs(&xb[r.clone()], &weight[r.clone()], &mut xval[r]);
        }
        let max = xval[1..].iter().fold(xval[0], |m, &v| c_max(m, v));
        if max < 1e-15 {
            scales[ib] = 0.0;
            continue;
        }
        let mut scale = search_scale_16::<FAST>(search, &xval, &weight, &waux, max, &mut levels);
        if scale < 0.0 {
            scale = -scale;
            for s in block_signs.iter_mut() {
                *s = !*s & 127;
            }
        }
        for k in 0..2 {
            let index = search
                .lookup(pattern(&levels[8 * k..8 * k + 8]))
                .unwrap_or_else(|_| unreachable!("IQ2_XS levels off the grid"));
            q2[2 * ib + k] = index | ((block_signs[k] as u16) << 9);
        }
        scales[ib] = scale;
        max_scale = c_max(max_scale, scale);
    }

    y.fill(0);
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    y[..2].copy_from_slice(&f16_bits(d).to_le_bytes());
    let id = 1.0 / d;
    for ib in 0..QK_K / 16 {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15) as u8;
        y[66 + ib / 2] |= if ib % 2 == 0 { l } else { l << 4 };
    }
    for (o, q) in y[2..66].chunks_exact_mut(2).zip(q2) {
        o.copy_from_slice(&q.to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{f16_value, BLOCK_BYTES, IQ2XS_GRID, KSIGNS_IQ2XS, QK_K};
    use crate::quant::iq2::avx2_util::{apply_signs, grid_row};

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            let (qs, sc) = (&x[2..66], &x[66..74]);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let db = [
                    _mm256_set1_ps(d * (0.5 + (sc[ib] & 0xf) as f32) * 0.25),
                    _mm256_set1_ps(d * (0.5 + (sc[ib] >> 4) as f32) * 0.25),
                ];
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let q = u16::from_le_bytes([qs[8 * ib + 2 * l], qs[8 * ib + 2 * l + 1]]);
                    let g = grid_row(IQ2XS_GRID[(q & 511) as usize]);
                    let v =
                        apply_signs(_mm256_mul_ps(db[l / 2], g), KSIGNS_IQ2XS[(q >> 9) as usize]);
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
        assert_fast_matches_ref(&IQ2_XS_KERNELS, 512, true);
    }

    #[test]
    fn refuses_without_imatrix() {
        let x = testdata::gaussian(1, 256);
        let e = crate::quant::quantize("t", &x, 256, GgmlType::IQ2_XS, None).unwrap_err();
        assert!(
            e.to_string().contains("IQ2_XS needs an importance matrix"),
            "{e}"
        );
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x = testdata::gaussian(3, 256 * 8);
        let w = testdata::importance(4, 256);
        let rmse = testdata::round_trip_rmse(&IQ2_XS_KERNELS, &x, 256, Some(&w));
        assert!(rmse < 0.5 * 0.02 && rmse > 0.05 * 0.02, "{rmse}");
    }
}
