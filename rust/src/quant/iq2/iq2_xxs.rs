//! IQ2_XXS (2.0625 bpw): per 256 weights, d (f16) | 8 × (4 grid indices of the 256-point grid as
//! bytes, then a u32 of 4 × 7 sign bits and a 4-bit scale in bits 28..32) = 66 bytes.
//! A group's scale is d·(0.5 + s)/4; the eighth sign of each 8 makes the count of negatives even.

use super::trials::Trials;
use super::{
    c_max, even_signs, f16_bits, f16_value, iq2xxs_search, nearest_int, pattern, GridSearch,
    IQ2_SEARCH_VALUES,
};
use crate::quant::iq_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use crate::quant::util::make_qp_quants;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 66;

pub struct Iq2Xxs;
pub const IQ2_XXS_KERNELS: Kernels = kernels_of::<Iq2Xxs>();

impl BlockQuant for Iq2Xxs {
    const TYPE: GgmlType = GgmlType::IQ2_XXS;
    const REQUIRES_IMATRIX: bool = true;

    /// quantize_row_iq2_xxs_impl with quant_weights (ggml requires them).
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<false>(src, dst, imatrix)
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<true>(src, dst, imatrix)
    }

    /// dequantize_row_iq2_xxs.
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            for (q, yb) in x[2..].chunks_exact(8).zip(y.chunks_exact_mut(32)) {
                let aux = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
                let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let grid = IQ2XXS_GRID[q[l] as usize].to_le_bytes();
                    let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                    for j in 0..8 {
                        let v = db * grid[j] as f32;
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
    let qw_row = imatrix.expect("IQ2_XXS needs an importance matrix (the quantize driver checks)");
    let search = iq2xxs_search();
    for ((xbl, y), qw) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .zip(qw_row.chunks_exact(QK_K))
    {
        quantize_block::<FAST>(search, xbl, qw, y);
    }
}

fn best_neighbour<const FAST: bool>(
    search: &GridSearch,
    off: super::OffGrid,
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

fn quantize_block<const FAST: bool>(
    search: &GridSearch,
    xbl: &[f32],
    qw_blk: &[f32],
    y: &mut [u8],
) {
    let mut scales = [0f32; QK_K / 32];
    let mut q2 = [0u32; 2 * (QK_K / 32)];
    let mut weight = [0f32; 32];
    let mut waux = [0f32; 32];
    let mut xval = [0f32; 32];
    let mut levels = [0i8; 32];
    let mut trials = Trials::<32>::new();
    let mut qp_levels = [0u8; 32];
    let mut block_signs = [0u8; 4];

    let mut max_scale = 0f32;
    let mut sumx2 = 0f32;
    for &v in xbl {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;

    for ib in 0..QK_K / 32 {
        let xb = &xbl[32 * ib..32 * ib + 32];
        let qw = &qw_blk[32 * ib..32 * ib + 32];
        for i in 0..32 {
            weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
        }
        for i in 0..32 {
            waux[i] = weight[i].sqrt();
        }
        for k in 0..4 {
            let r = 8 * k..8 * k + 8;
            block_signs[k] = even_signs(&xb[r.clone()], &weight[r.clone()], &mut xval[r]);
        }
        let max = xval[1..].iter().fold(xval[0], |m, &v| c_max(m, v));
        if max < 1e-15 {
            scales[ib] = 0.0;
            continue;
        }
        // Negative magnitudes (the flipped element) wrap in its u8 levels, as in ggml.
        let mut scale = make_qp_quants(K_MAX_Q + 1, &xval, &mut qp_levels, &weight);
        let eff_max = scale * K_MAX_Q as f32;
        if eff_max <= 0.0 {
            scales[ib] = 0.0;
            continue;
        }
        let ids: [f32; 13] = std::array::from_fn(|j| {
            ((2 * K_MAX_Q - 1) as f32 + (j as i32 - 6) as f32 * 0.1) / eff_max
        });
        if FAST {
            trials.run(search, &xval, &weight, &waux, &ids);
        } else {
            trials.run_ref(search, &xval, &weight, &waux, &ids);
        }
        let mut best = 0f32;
        for t in 0..ids.len() {
            let (sumqx, sumq2) = (trials.sumqx[t], trials.sumq2[t]);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                trials.levels_of(t, &mut levels);
            }
        }
        if scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                let mut rounded = [0i8; 8];
                for (i, l) in r.clone().zip(rounded.iter_mut()) {
                    *l = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, K_MAX_Q - 1) as i8;
                }
                match search.lookup(pattern(&rounded)) {
                    Ok(_) => levels[r].copy_from_slice(&rounded),
                    Err(off) => best_neighbour::<FAST>(
                        search,
                        off,
                        &xval[r.clone()],
                        &waux[r.clone()],
                        scale,
                        &mut levels[r],
                    ),
                }
            }
            let (mut sumqx, mut sumq2) = (0f32, 0f32);
            for i in 0..32 {
                let w = weight[i];
                let q = (2 * levels[i] as i32 + 1) as f32;
                sumqx += w * xval[i] * q;
                sumq2 += w * q * q;
            }
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        if scale < 0.0 {
            // ggml: cannot happen in practice; flip the scale positive and all signs with it.
            scale = -scale;
            for s in block_signs.iter_mut() {
                *s = !*s & 127;
            }
        }
        for k in 0..4 {
            let index = search
                .lookup(pattern(&levels[8 * k..8 * k + 8]))
                .unwrap_or_else(|_| unreachable!("IQ2_XXS levels off the grid"));
            q2[2 * ib] |= (index as u32) << (8 * k);
            q2[2 * ib + 1] |= (block_signs[k] as u32) << (7 * k);
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
    for ib in 0..QK_K / 32 {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
        q2[2 * ib + 1] |= (l as u32) << 28;
    }
    for (o, q) in y[2..].chunks_exact_mut(4).zip(q2) {
        o.copy_from_slice(&q.to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{f16_value, BLOCK_BYTES, IQ2XXS_GRID, KSIGNS_IQ2XS, QK_K};
    use crate::quant::iq2::avx2_util::{apply_signs, grid_row};

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            for (q, yb) in x[2..].chunks_exact(8).zip(y.chunks_exact_mut(32)) {
                let aux = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
                let db = _mm256_set1_ps(d * (0.5 + (aux >> 28) as f32) * 0.25);
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let g = grid_row(IQ2XXS_GRID[q[l] as usize]);
                    let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                    let v = apply_signs(_mm256_mul_ps(db, g), signs);
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
        assert_fast_matches_ref(&IQ2_XXS_KERNELS, 512, true);
    }

    #[test]
    fn refuses_without_imatrix() {
        let x = testdata::gaussian(1, 256);
        let e =
            crate::quant::quantize("blk.0.ffn_up_exps.weight", &x, 256, GgmlType::IQ2_XXS, None);
        let msg = e.unwrap_err().to_string();
        assert!(msg.contains("IQ2_XXS needs an importance matrix"), "{msg}");
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x = testdata::gaussian(3, 256 * 8);
        let w = testdata::importance(4, 256);
        let rmse = testdata::round_trip_rmse(&IQ2_XXS_KERNELS, &x, 256, Some(&w));
        // 2-bit codes on N(0, 0.02²) data: a relative error well under 1 but far from 0.
        assert!(rmse < 0.6 * 0.02 && rmse > 0.05 * 0.02, "{rmse}");
    }
}
