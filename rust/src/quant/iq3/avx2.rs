//! AVX2 search for IQ3_XXS / IQ3_S. Eight scale trials run in the lanes of a vector, each lane doing
//! the scalar code's float operations in the same order; neighbour searches score 8 grid points at
//! once and then pick the winner in list order. The bytes equal `search_ref`'s.

use std::arch::x86_64::*;

use super::{refit, Iq3Grid, SearchParams, SubBlock, KMAX_Q};

pub(crate) fn search(g: &Iq3Grid, p: SearchParams, sb: &SubBlock, l: &mut [i8; 32]) -> f32 {
    // SAFETY: only installed as the fast path after `cpu::has_avx2()`.
    unsafe { search_avx2(g, p, sb, l) }
}

/// `iq3_find_best_neighbour` for the off-grid point `key`: 8 distances per step, first minimum wins.
/// `x` and `w` are the group's 4 magnitudes and distance weights, broadcast.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn best_neighbour(
    g: &Iq3Grid,
    key: usize,
    x: &[__m256; 4],
    w: &[__m256; 4],
    scale: f32,
) -> usize {
    let nl = &g.lanes;
    let at = nl.at[key] as usize;
    let n = nl.len[key] as usize;
    debug_assert!(n > 0 && at + n.next_multiple_of(8) <= nl.index.len());
    let s = _mm256_set1_ps(scale);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut best_d2 = f32::MAX;
    let mut best = *nl.index.get_unchecked(at);
    for c in (0..n).step_by(8) {
        let mut acc = _mm256_setzero_ps();
        for i in 0..4 {
            // SAFETY: every list is padded to a multiple of 8 entries (see NeighbourLanes::build).
            let q = _mm256_loadu_ps(nl.level.get_unchecked(i).as_ptr().add(at + c));
            let diff = _mm256_sub_ps(_mm256_mul_ps(s, q), x[i]);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(w[i], diff), diff));
        }
        // Padding (NaN levels) and NaN distances can never win: make them +inf, take the first minimum.
        let d2 = _mm256_blendv_ps(inf, acc, _mm256_cmp_ps::<_CMP_ORD_Q>(acc, acc));
        let m = hmin(d2);
        if m < best_d2 {
            best_d2 = m;
            let first = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(d2, _mm256_set1_ps(m)))
                .trailing_zeros();
            best = *nl.index.get_unchecked(at + c + first as usize);
        }
    }
    best as usize
}

/// Smallest of 8 lanes (none NaN).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hmin(v: __m256) -> f32 {
    let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_min_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

#[target_feature(enable = "avx2")]
unsafe fn search_avx2(g: &Iq3Grid, p: SearchParams, sb: &SubBlock, l: &mut [i8; 32]) -> f32 {
    let SubBlock {
        xval,
        weight,
        waux,
        max,
    } = *sb;
    let ntrial = (2 * p.nstep + 1) as usize;
    let mut best = 0f32;
    let mut scale = max / (2 * KMAX_Q - 1) as f32;
    let mut on_grid = [p.xxs; 8];
    // Levels per weight, one lane per trial.
    let mut lv = [[0i32; 8]; 32];
    let mut keys = [0i32; 8];
    let mut off_grid = [0i32; 8];
    let (zero, seven) = (_mm256_setzero_si256(), _mm256_set1_epi32(KMAX_Q - 1));
    let (one, half) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.5));
    let magic = _mm256_set1_ps(12_582_912.0);
    let (mantissa, bias) = (
        _mm256_set1_epi32(0x007f_ffff),
        _mm256_set1_epi32(0x0040_0000),
    );
    for first in (0..ntrial).step_by(8) {
        let lanes = (ntrial - first).min(8);
        let mut ids = [1f32; 8];
        let mut trial_scale = [1f32; 8];
        for t in 0..lanes {
            let is = (first + t) as i32 - p.nstep;
            ids[t] = ((2 * KMAX_Q - 1) as f32 + is as f32 * 0.2) / max;
            trial_scale[t] = 1.0 / ids[t];
        }
        let idv = _mm256_loadu_ps(ids.as_ptr());
        for k in 0..8 {
            let mut key = zero;
            for i in 0..4 {
                let x = _mm256_set1_ps(xval[4 * k + i]);
                let v = _mm256_mul_ps(half, _mm256_sub_ps(_mm256_mul_ps(idv, x), one));
                // nearest_int: the 1.5·2^23 trick, lane by lane.
                let n = _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_castps_si256(_mm256_add_ps(v, magic)), mantissa),
                    bias,
                );
                let li = _mm256_max_epi32(zero, _mm256_min_epi32(seven, n));
                _mm256_storeu_si256(lv[4 * k + i].as_mut_ptr().cast(), li);
                key = _mm256_or_si256(key, _mm256_sllv_epi32(li, _mm256_set1_epi32(3 * i as i32)));
            }
            let m = _mm256_i32gather_epi32::<4>(g.map.as_ptr(), key);
            let mut off = _mm256_movemask_ps(_mm256_castsi256_ps(m)) & ((1 << lanes) - 1);
            off_grid[k] = off;
            if off != 0 {
                _mm256_storeu_si256(keys.as_mut_ptr().cast(), key);
                let xs: [__m256; 4] = std::array::from_fn(|i| _mm256_set1_ps(xval[4 * k + i]));
                let ws: [__m256; 4] = std::array::from_fn(|i| _mm256_set1_ps(waux[4 * k + i]));
                while off != 0 {
                    let t = off.trailing_zeros() as usize;
                    off &= off - 1;
                    let gi = best_neighbour(g, keys[t] as usize, &xs, &ws, trial_scale[t]);
                    for i in 0..4 {
                        lv[4 * k + i][t] = ((g.points[gi][i] - 1) / 2) as i32;
                    }
                }
            }
        }
        let (mut sqx, mut sq2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let one_i = _mm256_set1_epi32(1);
        for i in 0..32 {
            let li = _mm256_loadu_si256(lv[i].as_ptr().cast());
            let q = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32::<1>(li), one_i));
            let w = _mm256_set1_ps(weight[i]);
            let wx = _mm256_set1_ps(weight[i] * xval[i]);
            sqx = _mm256_add_ps(sqx, _mm256_mul_ps(wx, q));
            sq2 = _mm256_add_ps(sq2, _mm256_mul_ps(_mm256_mul_ps(w, q), q));
        }
        let mut sumqx = [0f32; 8];
        let mut sumq2 = [0f32; 8];
        _mm256_storeu_ps(sumqx.as_mut_ptr(), sqx);
        _mm256_storeu_ps(sumq2.as_mut_ptr(), sq2);
        // The trials in order, exactly as the scalar loop keeps its best.
        for t in 0..lanes {
            if sumq2[t] > 0.0 && sumqx[t] * sumqx[t] > best * sumq2[t] {
                scale = sumqx[t] / sumq2[t];
                best = scale * sumqx[t];
                for i in 0..32 {
                    l[i] = lv[i][t] as i8;
                }
                for k in 0..8 {
                    on_grid[k] = off_grid[k] & (1 << t) == 0;
                }
            }
        }
    }
    refit(g, p, sb, scale, &on_grid, l)
}
