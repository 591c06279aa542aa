//! IQ1_M (1.75 bpw): per 256 weights, qs[32] (low 8 bits of 11-bit grid indices) | qh[16] (per
//! 16: two 3-bit index highs, each with a shift-sign bit) | scales[8] (four u16: 3-bit scales per
//! 16, and the f16 super-scale spread over their top nibbles) = 56 bytes.
//! Weight j of a group is d·(2s+1)·(grid[j] ± 1/8). llama.cpp does not require an imatrix here.

use super::{iq1_search, sorted_order, sorted_order_fast, SplitChoice, X_M, X_P};
use crate::quant::iq2::{c_max, f16_bits, f16_value, nearest_int, pattern, GridSearch};
use crate::quant::iq_tables::IQ1S_GRID;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 56;
const BLOCK: usize = 16;
/// qh shift-sign bits for ggml's four (first group, second group) shift choices.
const SHIFT_MASKS: [u8; 4] = [0x00, 0x80, 0x08, 0x88];

pub struct Iq1M;
pub const IQ1_M_KERNELS: Kernels = kernels_of::<Iq1M>();

impl BlockQuant for Iq1M {
    const TYPE: GgmlType = GgmlType::IQ1_M;

    /// quantize_row_iq1_m_impl (quantize_iq1_m).
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<false>(src, dst, imatrix)
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<true>(src, dst, imatrix)
    }

    /// dequantize_row_iq1_m.
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let (qs, qh, sc) = scale_words(x);
            let d = super_scale(&sc);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let dl = [
                    d * (2 * ((sc[ib / 2] >> (6 * (ib % 2))) & 7) + 1) as f32,
                    d * (2 * ((sc[ib / 2] >> (6 * (ib % 2) + 3)) & 7) + 1) as f32,
                ];
                let (h0, h1) = (qh[2 * ib] as usize, qh[2 * ib + 1] as usize);
                let index = [
                    qs[4 * ib] as usize | ((h0 << 8) & 0x700),
                    qs[4 * ib + 1] as usize | ((h0 << 4) & 0x700),
                    qs[4 * ib + 2] as usize | ((h1 << 8) & 0x700),
                    qs[4 * ib + 3] as usize | ((h1 << 4) & 0x700),
                ];
                let delta = [h0 & 0x08, h0 & 0x80, h1 & 0x08, h1 & 0x80].map(|b| {
                    if b != 0 {
                        -X_P[1]
                    } else {
                        X_P[1]
                    }
                });
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let grid = IQ1S_GRID[index[l]].to_le_bytes();
                    for j in 0..8 {
                        yg[j] = dl[l / 2] * (grid[j] as i8 as f32 + delta[l]);
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

/// A block's qs, qh and its four little-endian scale words.
fn scale_words(x: &[u8]) -> (&[u8], &[u8], [u16; 4]) {
    let sc = std::array::from_fn(|i| u16::from_le_bytes([x[48 + 2 * i], x[49 + 2 * i]]));
    (&x[..32], &x[32..48], sc)
}

/// The f16 super-scale, kept in the top nibble of each scale word.
fn super_scale(sc: &[u16; 4]) -> f32 {
    let bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
    let [lo, hi] = bits.to_le_bytes();
    f16_value(lo, hi)
}

/// ggml's algorithm; FAST only swaps in the AVX2 neighbour search, which returns the same index.
fn quantize_row<const FAST: bool>(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let search = iq1_search();
    for (ibl, (xbl, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        let qw = imatrix.map(|w| &w[QK_K * ibl..QK_K * (ibl + 1)]);
        quantize_block::<FAST>(search, xbl, qw, y);
    }
}

fn block_weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32, weight: &mut [f32; BLOCK]) {
    match qw {
        Some(qw) => {
            for i in 0..BLOCK {
                weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
            }
        }
        None => {
            for i in 0..BLOCK {
                weight[i] = xb[i] * xb[i];
            }
        }
    }
}

/// Sorted prefix sums of w·x and w kept per half of the block (each half of 8 has its own shift).
struct HalfPrefix {
    px: [[f32; BLOCK + 1]; 2],
    pw: [[f32; BLOCK + 1]; 2],
}

fn half_prefix(order: &[usize; BLOCK], xb: &[f32], weight: &[f32; BLOCK]) -> HalfPrefix {
    let mut p = HalfPrefix {
        px: [[0.0; BLOCK + 1]; 2],
        pw: [[0.0; BLOCK + 1]; 2],
    };
    for (j, &i) in order.iter().enumerate() {
        let h = usize::from(i >= BLOCK / 2);
        p.px[h][j + 1] = p.px[h][j] + weight[i] * xb[i];
        p.px[1 - h][j + 1] = p.px[1 - h][j];
        p.pw[h][j + 1] = p.pw[h][j] + weight[i];
        p.pw[1 - h][j + 1] = p.pw[1 - h][j];
    }
    p
}

/// Level steps: v0² − v1² and v1² − v2² for each shift (exact in f32).
const CP1: f32 = X_P[0] * X_P[0] - X_P[1] * X_P[1];
const CP2: f32 = X_P[1] * X_P[1] - X_P[2] * X_P[2];
const CM1: f32 = X_M[0] * X_M[0] - X_M[1] * X_M[1];
const CM2: f32 = X_M[1] * X_M[1] - X_M[2] * X_M[2];

/// ggml's (current) boundary search: since v0 − v1 = v1 − v2 = −1 for both shifts, the sums for
/// a split (i1, i2) are T·v2 − px[i1] − px[i2] and W·v2² + pw[i1]·c1 + pw[i2]·c2, per half, and
/// the four shift choices k (0: +,+  1: +,−  2: −,+  3: −,−) combine the halves. Returns the best
/// (i1, i2, k) by ggml's running comparison, and its scale.
fn best_split_ref(p: &HalfPrefix, max: f32) -> (Option<(usize, usize, usize)>, f32) {
    let mut choice = SplitChoice::new(max);
    let txs = [p.px[0][BLOCK], p.px[1][BLOCK]];
    let tws = [p.pw[0][BLOCK], p.pw[1][BLOCK]];
    let (p2, m2) = (X_P[2], X_M[2]);
    for i1 in 0..=BLOCK {
        for i2 in i1..=BLOCK {
            let (mut qx_p, mut qx_m, mut q2_p, mut q2_m) =
                ([0f32; 2], [0f32; 2], [0f32; 2], [0f32; 2]);
            for h in 0..2 {
                let sx = p.px[h][i1] + p.px[h][i2];
                qx_p[h] = txs[h] * p2 - sx;
                qx_m[h] = txs[h] * m2 - sx;
                q2_p[h] = tws[h] * p2 * p2 + p.pw[h][i1] * CP1 + p.pw[h][i2] * CP2;
                q2_m[h] = tws[h] * m2 * m2 + p.pw[h][i1] * CM1 + p.pw[h][i2] * CM2;
            }
            let sumqx = [
                qx_p[0] + qx_p[1],
                qx_p[0] + qx_m[1],
                qx_m[0] + qx_p[1],
                qx_m[0] + qx_m[1],
            ];
            let sumq2 = [
                q2_p[0] + q2_p[1],
                q2_p[0] + q2_m[1],
                q2_m[0] + q2_p[1],
                q2_m[0] + q2_m[1],
            ];
            for k in 0..4 {
                choice.consider(sumqx[k], sumq2[k], (i1, i2, k));
            }
        }
    }
    (choice.best, choice.scale)
}

fn best_split_fast(p: &HalfPrefix, max: f32) -> (Option<(usize, usize, usize)>, f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::has_avx2() {
        // Safety: AVX2 is present.
        return unsafe { avx2::best_split(p, max) };
    }
    best_split_ref(p, max)
}

/// Level values of group k (0 or 1) under ggml's shift choice.
fn group_values(shift_choice: usize, k: usize) -> &'static [f32; 3] {
    let plus = if k == 0 {
        shift_choice < 2
    } else {
        shift_choice.is_multiple_of(2)
    };
    if plus {
        &X_P
    } else {
        &X_M
    }
}

fn quantize_block<const FAST: bool>(
    search: &GridSearch,
    xbl: &[f32],
    qw_blk: Option<&[f32]>,
    y: &mut [u8],
) {
    let mut scales = [0f32; QK_K / BLOCK];
    let mut shifts = [0usize; QK_K / BLOCK];
    let mut weight = [0f32; BLOCK];
    let mut levels = [0i8; BLOCK];
    let mut index = [0u16; BLOCK / 8];
    y.fill(0);

    let mut max_scale = 0f32;
    let mut sumx2 = 0f32;
    for &v in xbl {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;

    for ib in 0..QK_K / BLOCK {
        let xb = &xbl[BLOCK * ib..BLOCK * (ib + 1)];
        block_weights(
            xb,
            qw_blk.map(|w| &w[BLOCK * ib..BLOCK * (ib + 1)]),
            sigma2,
            &mut weight,
        );
        let max = xb[1..].iter().fold(xb[0].abs(), |m, &v| c_max(m, v.abs()));
        if max < 1e-7 {
            scales[ib] = 0.0;
            shifts[ib] = 0;
            continue;
        }
        let order = if FAST {
            sorted_order_fast::<BLOCK>(xb)
        } else {
            sorted_order::<BLOCK>(xb)
        };
        let prefix = half_prefix(&order, xb, &weight);
        let (best, mut scale) = if FAST {
            best_split_fast(&prefix, max)
        } else {
            best_split_ref(&prefix, max)
        };
        let Some((i1, i2, mut choice)) = best else {
            scales[ib] = 0.0;
            shifts[ib] = 0;
            continue;
        };
        for (j, &i) in order.iter().enumerate() {
            levels[i] = if j < i1 {
                0
            } else if j < i2 {
                1
            } else {
                2
            };
        }
        if scale < 0.0 {
            for l in levels.iter_mut() {
                *l = 2 - *l;
            }
            scale = -scale;
            choice = 3 - choice;
        }
        let mut all_on_grid = true;
        for k in 0..BLOCK / 8 {
            let r = 8 * k..8 * k + 8;
            let xx = group_values(choice, k);
            index[k] = match search.lookup(pattern(&levels[r.clone()])) {
                Ok(j) => j,
                Err(off) => {
                    all_on_grid = false;
                    if FAST {
                        search.best_neighbour(off, xx, &xb[r.clone()], &weight[r], scale)
                    } else {
                        search.best_neighbour_ref(off, xx, &xb[r.clone()], &weight[r], scale)
                    }
                }
            };
        }
        if !all_on_grid {
            let (mut sumqx, mut sumq2) = (0f32, 0f32);
            for k in 0..BLOCK / 8 {
                let xx = group_values(choice, k);
                let p = search.levels(index[k]);
                for j in 0..8 {
                    let w = weight[8 * k + j];
                    let q = xx[p[j] as usize];
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
            if sumqx > 0.0 && sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        y[2 * ib] = index[0] as u8;
        y[2 * ib + 1] = index[1] as u8;
        y[32 + ib] = ((index[0] >> 8) | ((index[1] >> 8) << 4)) as u8;
        scales[ib] = scale;
        shifts[ib] = choice;
        max_scale = c_max(max_scale, scale);
    }

    if max_scale == 0.0 {
        return;
    }
    let mut sc = [0u16; 4];
    let mut d = max_scale / 15.0;
    let id = 1.0 / d;
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for ib in 0..QK_K / BLOCK {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7);
        sc[ib / 4] |= (l as u16) << (3 * (ib % 4));
        y[32 + ib] |= SHIFT_MASKS[shifts[ib]];
        let xb = &xbl[BLOCK * ib..BLOCK * (ib + 1)];
        block_weights(
            xb,
            qw_blk.map(|w| &w[BLOCK * ib..BLOCK * (ib + 1)]),
            sigma2,
            &mut weight,
        );
        for k in 0..BLOCK / 8 {
            let xx = group_values(shifts[ib], k);
            let gi = y[2 * ib + k] as usize + (((y[32 + ib] as usize) << (8 - 4 * k)) & 0x700);
            let p = search.levels(gi as u16);
            for j in 0..8 {
                let w = weight[8 * k + j];
                let q = xx[p[j] as usize] * (2 * l + 1) as f32;
                sumqx += w * q * xb[8 * k + j];
                sumq2 += w * q * q;
            }
        }
    }
    if sumq2 > 0.0 {
        d = sumqx / sumq2;
    }
    let s = f16_bits(d * 1.1125);
    sc[0] |= (s & 0x000f) << 12;
    sc[1] |= (s & 0x00f0) << 8;
    sc[2] |= (s & 0x0f00) << 4;
    sc[3] |= s & 0xf000;
    for (o, w) in y[48..56].chunks_exact_mut(2).zip(sc) {
        o.copy_from_slice(&w.to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{
        scale_words, super_scale, HalfPrefix, SplitChoice, BLOCK, BLOCK_BYTES, CM1, CM2, CP1, CP2,
        IQ1S_GRID, QK_K, X_M, X_P,
    };
    use crate::quant::iq1::avx2_split::choose;
    use crate::quant::iq2::avx2_util::grid_row_signed;

    /// `best_split_ref` with 8 values of i2 per register, each lane computing the reference's
    /// sums with the same operations; a register whose 32 candidates all fail against the current
    /// best is skipped (one by one they would fail too), otherwise its candidates go through the
    /// reference comparison in order.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn best_split(
        p: &HalfPrefix,
        max: f32,
    ) -> (Option<(usize, usize, usize)>, f32) {
        let mut choice = SplitChoice::new(max);
        let mut px = [[0f32; BLOCK + 1 + 8]; 2];
        let mut pw = [[0f32; BLOCK + 1 + 8]; 2];
        for h in 0..2 {
            px[h][..=BLOCK].copy_from_slice(&p.px[h]);
            pw[h][..=BLOCK].copy_from_slice(&p.pw[h]);
        }
        let txs = [p.px[0][BLOCK], p.px[1][BLOCK]];
        let tws = [p.pw[0][BLOCK], p.pw[1][BLOCK]];
        let (p2, m2) = (X_P[2], X_M[2]);
        let (cp2, cm2) = (_mm256_set1_ps(CP2), _mm256_set1_ps(CM2));
        for i1 in 0..=BLOCK {
            // Per half: the i1-only parts, in the reference's order of operations.
            let x1 = [0, 1].map(|h| _mm256_set1_ps(p.px[h][i1]));
            let tp = [0, 1].map(|h| _mm256_set1_ps(txs[h] * p2));
            let tm = [0, 1].map(|h| _mm256_set1_ps(txs[h] * m2));
            let wp = [0, 1].map(|h| _mm256_set1_ps(tws[h] * p2 * p2 + p.pw[h][i1] * CP1));
            let wm = [0, 1].map(|h| _mm256_set1_ps(tws[h] * m2 * m2 + p.pw[h][i1] * CM1));
            for i2 in (i1..=BLOCK).step_by(8) {
                let lanes = (BLOCK + 1 - i2).min(8);
                let (mut qx_p, mut qx_m, mut q2_p, mut q2_m) =
                    ([tp[0]; 2], [tp[0]; 2], [tp[0]; 2], [tp[0]; 2]);
                for h in 0..2 {
                    let sx = _mm256_add_ps(x1[h], _mm256_loadu_ps(px[h].as_ptr().add(i2)));
                    let w2 = _mm256_loadu_ps(pw[h].as_ptr().add(i2));
                    qx_p[h] = _mm256_sub_ps(tp[h], sx);
                    qx_m[h] = _mm256_sub_ps(tm[h], sx);
                    q2_p[h] = _mm256_add_ps(wp[h], _mm256_mul_ps(w2, cp2));
                    q2_m[h] = _mm256_add_ps(wm[h], _mm256_mul_ps(w2, cm2));
                }
                let sumqx = [
                    _mm256_add_ps(qx_p[0], qx_p[1]),
                    _mm256_add_ps(qx_p[0], qx_m[1]),
                    _mm256_add_ps(qx_m[0], qx_p[1]),
                    _mm256_add_ps(qx_m[0], qx_m[1]),
                ];
                let sumq2 = [
                    _mm256_add_ps(q2_p[0], q2_p[1]),
                    _mm256_add_ps(q2_p[0], q2_m[1]),
                    _mm256_add_ps(q2_m[0], q2_p[1]),
                    _mm256_add_ps(q2_m[0], q2_m[1]),
                ];
                choose(&sumqx, &sumq2, lanes, &mut choice, |lane, k| {
                    (i1, i2 + lane, k)
                });
            }
        }
        (choice.best, choice.scale)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let (qs, qh, sc) = scale_words(x);
            let d = super_scale(&sc);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let dl = [
                    _mm256_set1_ps(d * (2 * ((sc[ib / 2] >> (6 * (ib % 2))) & 7) + 1) as f32),
                    _mm256_set1_ps(d * (2 * ((sc[ib / 2] >> (6 * (ib % 2) + 3)) & 7) + 1) as f32),
                ];
                let (h0, h1) = (qh[2 * ib] as usize, qh[2 * ib + 1] as usize);
                let index = [
                    qs[4 * ib] as usize | ((h0 << 8) & 0x700),
                    qs[4 * ib + 1] as usize | ((h0 << 4) & 0x700),
                    qs[4 * ib + 2] as usize | ((h1 << 8) & 0x700),
                    qs[4 * ib + 3] as usize | ((h1 << 4) & 0x700),
                ];
                let delta = [h0 & 0x08, h0 & 0x80, h1 & 0x08, h1 & 0x80].map(|b| {
                    if b != 0 {
                        -X_P[1]
                    } else {
                        X_P[1]
                    }
                });
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let g = _mm256_add_ps(
                        grid_row_signed(IQ1S_GRID[index[l]]),
                        _mm256_set1_ps(delta[l]),
                    );
                    _mm256_storeu_ps(yg.as_mut_ptr(), _mm256_mul_ps(dl[l / 2], g));
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
        assert_fast_matches_ref(&IQ1_M_KERNELS, 512, true);
    }

    #[test]
    fn quantizes_without_imatrix() {
        let x = testdata::gaussian(3, 256 * 8);
        let rmse = testdata::round_trip_rmse(&IQ1_M_KERNELS, &x, 256, None);
        assert!(rmse < 0.8 * 0.02 && rmse > 0.1 * 0.02, "{rmse}");
    }
}
