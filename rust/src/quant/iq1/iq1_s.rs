//! IQ1_S (1.5625 bpw): per 256 weights, d (f16) | qs[32] (low 8 bits of 11-bit grid indices) |
//! qh[8] (u16 per 32: three 3-bit index highs, a 3-bit scale s, the shift sign) = 50 bytes.
//! Weight j of a group is d·(2s+1)·(grid[j] ± 1/8).

use super::{iq1_search, sorted_order, sorted_order_fast, SplitChoice, X_M, X_P};
use crate::quant::iq2::{c_max, f16_bits, f16_value, nearest_int, pattern, GridSearch};
use crate::quant::iq_tables::IQ1S_GRID;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 50;
const BLOCK: usize = 32;

pub struct Iq1S;
pub const IQ1_S_KERNELS: Kernels = kernels_of::<Iq1S>();

impl BlockQuant for Iq1S {
    const TYPE: GgmlType = GgmlType::IQ1_S;
    const REQUIRES_IMATRIX: bool = true;

    /// quantize_row_iq1_s_impl with quant_weights (ggml requires them).
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<false>(src, dst, imatrix)
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row::<true>(src, dst, imatrix)
    }

    /// dequantize_row_iq1_s.
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let qh = u16::from_le_bytes([x[34 + 2 * ib], x[35 + 2 * ib]]);
                let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
                let delta = if qh & 0x8000 != 0 { -X_P[1] } else { X_P[1] };
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let index =
                        x[2 + 4 * ib + l] as usize | ((((qh >> (3 * l)) & 7) as usize) << 8);
                    let grid = IQ1S_GRID[index].to_le_bytes();
                    for j in 0..8 {
                        yg[j] = dl * (grid[j] as i8 as f32 + delta);
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
    let qw_row = imatrix.expect("IQ1_S needs an importance matrix (the quantize driver checks)");
    let search = iq1_search();
    for ((xbl, y), qw) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .zip(qw_row.chunks_exact(QK_K))
    {
        quantize_block::<FAST>(search, xbl, qw, y);
    }
}

/// The best split of a sorted block into levels 0/1/2 and its shift, by ggml's exhaustive search
/// over the two boundaries: (i1, i2, shift, scale), or None when no split has a positive q².
fn best_split_ref(
    sumx: &[f32; BLOCK + 1],
    sumw: &[f32; BLOCK + 1],
    max: f32,
) -> Option<(usize, usize, i8, f32)> {
    let mut choice = SplitChoice::new(max);
    let n = BLOCK;
    for i1 in 0..=n {
        for i2 in i1..=n {
            for (xs, shift) in [(&X_P, 1i8), (&X_M, -1i8)] {
                let sumqx = (sumx[i1] - sumx[0]) * xs[0]
                    + (sumx[i2] - sumx[i1]) * xs[1]
                    + (sumx[n] - sumx[i2]) * xs[2];
                let sumq2 = (sumw[i1] - sumw[0]) * xs[0] * xs[0]
                    + (sumw[i2] - sumw[i1]) * xs[1] * xs[1]
                    + (sumw[n] - sumw[i2]) * xs[2] * xs[2];
                choice.consider(sumqx, sumq2, (i1, i2, shift));
            }
        }
    }
    choice
        .best
        .map(|(i1, i2, shift)| (i1, i2, shift, choice.scale))
}

fn best_split_fast(
    sumx: &[f32; BLOCK + 1],
    sumw: &[f32; BLOCK + 1],
    max: f32,
) -> Option<(usize, usize, i8, f32)> {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::has_avx2() {
        // Safety: AVX2 is present.
        return unsafe { avx2::best_split(sumx, sumw, max) };
    }
    best_split_ref(sumx, sumw, max)
}

fn quantize_block<const FAST: bool>(
    search: &GridSearch,
    xbl: &[f32],
    qw_blk: &[f32],
    y: &mut [u8],
) {
    let mut scales = [0f32; QK_K / BLOCK];
    let mut shifts = [0i8; QK_K / BLOCK];
    let mut weight = [0f32; BLOCK];
    let mut levels = [0i8; BLOCK];
    let mut index = [0u16; BLOCK / 8];
    let mut sumx = [0f32; BLOCK + 1];
    let mut sumw = [0f32; BLOCK + 1];
    y.fill(0);

    let mut max_scale = 0f32;
    let mut sumx2 = 0f32;
    for &v in xbl {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / QK_K as f32;

    for ib in 0..QK_K / BLOCK {
        let xb = &xbl[BLOCK * ib..BLOCK * (ib + 1)];
        let qw = &qw_blk[BLOCK * ib..BLOCK * (ib + 1)];
        for i in 0..BLOCK {
            weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
        }
        let max = xb[1..].iter().fold(xb[0].abs(), |m, &v| c_max(m, v.abs()));
        if max < 1e-12 {
            scales[ib] = 0.0;
            shifts[ib] = 1;
            continue;
        }
        let order = if FAST {
            sorted_order_fast::<BLOCK>(xb)
        } else {
            sorted_order::<BLOCK>(xb)
        };
        for (j, &i) in order.iter().enumerate() {
            sumx[j + 1] = sumx[j] + weight[i] * xb[i];
            sumw[j + 1] = sumw[j] + weight[i];
        }
        let split = if FAST {
            best_split_fast(&sumx, &sumw, max)
        } else {
            best_split_ref(&sumx, &sumw, max)
        };
        let Some((i1, i2, mut shift, mut scale)) = split else {
            scales[ib] = 0.0;
            shifts[ib] = 1;
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
            shift = -shift;
        }
        let xx = if shift == 1 { &X_P } else { &X_M };
        let mut all_on_grid = true;
        for k in 0..BLOCK / 8 {
            let r = 8 * k..8 * k + 8;
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
        let mut h = 0u16;
        for k in 0..BLOCK / 8 {
            y[2 + (BLOCK / 8) * ib + k] = index[k] as u8;
            h |= (index[k] >> 8) << (3 * k);
        }
        y[34 + 2 * ib..36 + 2 * ib].copy_from_slice(&h.to_le_bytes());
        scales[ib] = scale;
        shifts[ib] = shift;
        max_scale = c_max(max_scale, scale);
    }

    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 15.0;
    y[..2].copy_from_slice(&f16_bits(d * 1.125).to_le_bytes());
    let id = 1.0 / d;
    for ib in 0..QK_K / BLOCK {
        let mut l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7) as u16;
        if shifts[ib] == -1 {
            l |= 8;
        }
        y[35 + 2 * ib] |= (l << 4) as u8;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{f16_value, SplitChoice, BLOCK, BLOCK_BYTES, IQ1S_GRID, QK_K, X_M, X_P};
    use crate::quant::iq1::avx2_split::choose;
    use crate::quant::iq2::avx2_util::grid_row_signed;

    /// `best_split_ref` with 8 values of i2 per register. Every lane computes its sums with the
    /// reference's operations; a register whose candidates all fail against the current best is
    /// skipped (they would fail one by one too, the best being unchanged), otherwise its lanes
    /// go through the reference comparison in order.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn best_split(
        sumx: &[f32; BLOCK + 1],
        sumw: &[f32; BLOCK + 1],
        max: f32,
    ) -> Option<(usize, usize, i8, f32)> {
        let n = BLOCK;
        let mut px = [0f32; BLOCK + 1 + 8];
        let mut pw = [0f32; BLOCK + 1 + 8];
        px[..=n].copy_from_slice(sumx);
        pw[..=n].copy_from_slice(sumw);
        let mut choice = SplitChoice::new(max);
        let shifts = [(&X_P, 1i8), (&X_M, -1i8)];
        for i1 in 0..=n {
            let ax = _mm256_set1_ps(sumx[i1] - sumx[0]);
            let aw = _mm256_set1_ps(sumw[i1] - sumw[0]);
            let (x1, w1) = (_mm256_set1_ps(sumx[i1]), _mm256_set1_ps(sumw[i1]));
            let (xn, wn) = (_mm256_set1_ps(sumx[n]), _mm256_set1_ps(sumw[n]));
            for i2 in (i1..=n).step_by(8) {
                let lanes = (n + 1 - i2).min(8);
                let x2 = _mm256_loadu_ps(px.as_ptr().add(i2));
                let w2 = _mm256_loadu_ps(pw.as_ptr().add(i2));
                let (bx, cx) = (_mm256_sub_ps(x2, x1), _mm256_sub_ps(xn, x2));
                let (bw, cw) = (_mm256_sub_ps(w2, w1), _mm256_sub_ps(wn, w2));
                let (mut qx, mut q2) = ([bx; 2], [bx; 2]);
                for (s, (xs, _)) in shifts.iter().enumerate() {
                    let v = xs.map(|c| _mm256_set1_ps(c));
                    qx[s] = _mm256_add_ps(
                        _mm256_add_ps(_mm256_mul_ps(ax, v[0]), _mm256_mul_ps(bx, v[1])),
                        _mm256_mul_ps(cx, v[2]),
                    );
                    q2[s] = _mm256_add_ps(
                        _mm256_add_ps(
                            _mm256_mul_ps(_mm256_mul_ps(aw, v[0]), v[0]),
                            _mm256_mul_ps(_mm256_mul_ps(bw, v[1]), v[1]),
                        ),
                        _mm256_mul_ps(_mm256_mul_ps(cw, v[2]), v[2]),
                    );
                }
                choose(&qx, &q2, lanes, &mut choice, |lane, s| {
                    (i1, i2 + lane, shifts[s].1)
                });
            }
        }
        choice
            .best
            .map(|(i1, i2, shift)| (i1, i2, shift, choice.scale))
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16_value(x[0], x[1]);
            for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
                let qh = u16::from_le_bytes([x[34 + 2 * ib], x[35 + 2 * ib]]);
                let dl = _mm256_set1_ps(d * (2 * ((qh >> 12) & 7) + 1) as f32);
                let delta = _mm256_set1_ps(if qh & 0x8000 != 0 { -X_P[1] } else { X_P[1] });
                for (l, yg) in yb.chunks_exact_mut(8).enumerate() {
                    let index =
                        x[2 + 4 * ib + l] as usize | ((((qh >> (3 * l)) & 7) as usize) << 8);
                    let g = grid_row_signed(IQ1S_GRID[index]);
                    _mm256_storeu_ps(yg.as_mut_ptr(), _mm256_mul_ps(dl, _mm256_add_ps(g, delta)));
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
        assert_fast_matches_ref(&IQ1_S_KERNELS, 512, true);
    }

    #[test]
    fn refuses_without_imatrix() {
        let x = testdata::gaussian(1, 256);
        let e = crate::quant::quantize("t", &x, 256, GgmlType::IQ1_S, None).unwrap_err();
        assert!(
            e.to_string().contains("IQ1_S needs an importance matrix"),
            "{e}"
        );
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x = testdata::gaussian(3, 256 * 8);
        let w = testdata::importance(4, 256);
        let rmse = testdata::round_trip_rmse(&IQ1_S_KERNELS, &x, 256, Some(&w));
        assert!(rmse < 0.8 * 0.02 && rmse > 0.1 * 0.02, "{rmse}");
    }
}
