//! The 1-bit i-quants IQ1_S and IQ1_M: groups of 8 weights snapped to a point of a 2048-point grid
//! of ternary levels {-1, 0, 1}, shifted by ±1/8 per group, with 3-bit scales per 32 or 16.
//!
//! Shared here: the grid's search state (built once, on first use, by the IQ2 family's builder
//! with ggml's nwant = 3), the level values, and ggml's exhaustive split of a sorted block.

// Index loops mirror ggml's C, so the reference reads side by side with the spec.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use crate::quant::iq2::{iq1_packed_patterns, GridSearch};

pub mod iq1_m;
pub mod iq1_s;

pub use iq1_m::IQ1_M_KERNELS;
pub use iq1_s::IQ1_S_KERNELS;

/// IQ1S_DELTA = IQ1M_DELTA: every group's levels are shifted by ±1/8.
pub(crate) const IQ1_DELTA: f32 = 0.125;
/// Level values with a + shift (ggml's x_p) and a − shift (x_m).
pub(crate) const X_P: [f32; 3] = [-1.0 + IQ1_DELTA, IQ1_DELTA, 1.0 + IQ1_DELTA];
pub(crate) const X_M: [f32; 3] = [-1.0 - IQ1_DELTA, -IQ1_DELTA, 1.0 - IQ1_DELTA];

/// The 2048-point grid's search state (ggml builds identical copies for IQ1_S and IQ1_M).
pub(crate) fn iq1_search() -> &'static GridSearch {
    static S: OnceLock<GridSearch> = OnceLock::new();
    S.get_or_init(|| GridSearch::new(&iq1_packed_patterns(), 3))
}

/// Indices of `xb` in ascending order of value, equal values in index order: ggml calls qsort,
/// which in glibc is a stable merge sort for arrays this small.
pub(crate) fn sorted_order<const N: usize>(xb: &[f32]) -> [usize; N] {
    // Sort (order-preserving integer key of the value, index): keys are distinct, so the result is
    // the stable order. Adding 0.0 turns -0.0 into +0.0, which compare equal in C.
    let mut keys: [u64; N] = std::array::from_fn(|i| {
        let bits = (xb[i] + 0.0).to_bits();
        let key = if bits >> 31 == 1 {
            !bits
        } else {
            bits | 0x8000_0000
        };
        ((key as u64) << 32) | i as u64
    });
    keys.sort_unstable();
    keys.map(|k| (k & 0xffff_ffff) as usize)
}

/// `sorted_order` on the fastest path this CPU has (same order).
pub(crate) fn sorted_order_fast<const N: usize>(xb: &[f32]) -> [usize; N] {
    #[cfg(target_arch = "x86_64")]
    if N.is_multiple_of(8) && N <= 32 && crate::quant::cpu::has_avx2() {
        // Safety: AVX2 is present; N is 8, 16, 24 or 32.
        return unsafe { avx2_split::sorted_order(xb) };
    }
    sorted_order(xb)
}

/// AVX2 helpers for the boundary searches, which score 8 splits per register.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_split {
    use std::arch::x86_64::*;

    /// `SPREAD[K][m]`: bit l of m moved to bit K·l (K = 2 or 4), to order candidates lane-major.
    const fn spread_table(k: u32) -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut m = 0;
        while m < 256 {
            let mut l = 0;
            while l < 8 {
                if m & (1 << l) != 0 {
                    t[m] |= 1 << (k * l);
                }
                l += 1;
            }
            m += 1;
        }
        t
    }
    static SPREAD2: [u32; 256] = spread_table(2);
    static SPREAD4: [u32; 256] = spread_table(4);

    /// Each element's place in the stable ascending order is the number of smaller elements plus
    /// the number of equal ones before it (float comparison, so -0.0 equals +0.0).
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn sorted_order<const N: usize>(xb: &[f32]) -> [usize; N] {
        let mut v = [_mm256_setzero_ps(); 4];
        for (c, slot) in v.iter_mut().enumerate().take(N / 8) {
            *slot = _mm256_loadu_ps(xb[8 * c..8 * c + 8].as_ptr());
        }
        let mut order = [0usize; N];
        for i in 0..N {
            let b = _mm256_set1_ps(xb[i]);
            let mut ahead = 0u32;
            for c in 0..N / 8 {
                let lt = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(v[c], b)) as u32;
                let eq = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v[c], b)) as u32;
                let before = if i >= 8 * c + 8 {
                    0xff
                } else {
                    (1u32 << i.saturating_sub(8 * c)) - 1
                };
                ahead |= (lt | (eq & before)) << (8 * c);
            }
            order[ahead.count_ones() as usize] = i;
        }
        order
    }

    /// Which of the K×8 candidates (bit K·lane + k) beat `best` by ggml's test
    /// sumq2 > 0 && sumqx² > best·sumq2, computed with the same operations.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn winners<const K: usize>(
        sumqx: &[__m256; K],
        sumq2: &[__m256; K],
        best: f32,
    ) -> u32 {
        let b = _mm256_set1_ps(best);
        let mut mask = 0u32;
        for k in 0..K {
            let win = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(sumq2[k], _mm256_setzero_ps()),
                _mm256_cmp_ps::<_CMP_GT_OQ>(
                    _mm256_mul_ps(sumqx[k], sumqx[k]),
                    _mm256_mul_ps(b, sumq2[k]),
                ),
            );
            let m = _mm256_movemask_ps(win) as usize;
            mask |= if K == 2 { SPREAD2[m] } else { SPREAD4[m] } << k;
        }
        mask
    }

    /// Runs ggml's sequential choice over one register of candidates: only those that beat the
    /// best of their moment are visited, in order; the others would have failed one by one too.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn choose<const K: usize, C>(
        sumqx: &[__m256; K],
        sumq2: &[__m256; K],
        lanes: usize,
        choice: &mut super::SplitChoice<C>,
        candidate: impl Fn(usize, usize) -> C,
    ) {
        let valid = if lanes * K >= 32 {
            u32::MAX
        } else {
            (1u32 << (lanes * K)) - 1
        };
        let mut mask = winners(sumqx, sumq2, choice.best_score) & valid;
        if mask == 0 {
            return;
        }
        // A winner's new scale and score, qx/q2 and (qx/q2)·qx, as the reference computes them.
        let (mut qx, mut q2) = ([[0f32; 8]; K], [[0f32; 8]; K]);
        let (mut scale, mut score) = ([[0f32; 8]; K], [[0f32; 8]; K]);
        for k in 0..K {
            let sc = _mm256_div_ps(sumqx[k], sumq2[k]);
            _mm256_storeu_ps(qx[k].as_mut_ptr(), sumqx[k]);
            _mm256_storeu_ps(q2[k].as_mut_ptr(), sumq2[k]);
            _mm256_storeu_ps(scale[k].as_mut_ptr(), sc);
            _mm256_storeu_ps(score[k].as_mut_ptr(), _mm256_mul_ps(sc, sumqx[k]));
        }
        while mask != 0 {
            let c = mask.trailing_zeros() as usize;
            let (lane, k) = (c / K, c % K);
            // It passed ggml's test against the current best, so it is taken.
            let old_best = choice.best_score;
            choice.scale = scale[k][lane];
            choice.best_score = score[k][lane];
            choice.best = Some(candidate(lane, k));
            mask &= if c + 1 >= 32 { 0 } else { u32::MAX << (c + 1) };
            if choice.best_score >= old_best {
                // The test is monotone in the best (q2 > 0, rounding is monotone): candidates that
                // lost to the old best lose to the new one. Drop the rest that lose now, in order.
                while mask != 0 {
                    let j = mask.trailing_zeros() as usize;
                    let (a, b) = (qx[j % K][j / K], q2[j % K][j / K]);
                    if b > 0.0 && a * a > choice.best_score * b {
                        break;
                    }
                    mask &= mask - 1;
                }
            } else {
                let later = if c + 1 >= 32 { 0 } else { u32::MAX << (c + 1) };
                mask = winners(sumqx, sumq2, choice.best_score) & valid & later;
            }
        }
    }
}

/// ggml's running choice among splits: a candidate wins when sumqx² > best·sumq2 (strictly).
pub(crate) struct SplitChoice<C> {
    pub best_score: f32,
    pub scale: f32,
    pub best: Option<C>,
}

impl<C> SplitChoice<C> {
    pub(crate) fn new(max: f32) -> Self {
        SplitChoice {
            best_score: -f32::MAX,
            scale: max,
            best: None,
        }
    }

    #[inline(always)]
    pub(crate) fn consider(&mut self, sumqx: f32, sumq2: f32, candidate: C) {
        if sumq2 > 0.0 && sumqx * sumqx > self.best_score * sumq2 {
            self.scale = sumqx / sumq2;
            self.best_score = self.scale * sumqx;
            self.best = Some(candidate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::iq2::pattern;

    #[test]
    fn grid_maps_back_to_its_index() {
        let s = iq1_search();
        assert_eq!(s.len(), 2048);
        for i in 0..s.len() {
            let levels: Vec<i8> = s.levels(i as u16).iter().map(|&l| l as i8).collect();
            assert_eq!(s.lookup(pattern(&levels)).unwrap(), i as u16);
        }
    }

    /// Values whose squares overflow make ggml abort (no neighbour compares below FLT_MAX);
    /// pyqmoe must still return bytes, the same on both paths, for all five types.
    #[test]
    fn overflowing_inputs_do_not_panic() {
        use crate::quant::kernels;
        use crate::types::GgmlType::*;
        let w = crate::quant::testdata::importance(2, 256);
        let rows: Vec<Vec<f32>> = vec![
            (0..256)
                .map(|i| {
                    if i % 3 == 0 {
                        3e38
                    } else {
                        -1e30 * (i % 5) as f32
                    }
                })
                .collect(),
            (0..256).map(|i| (i as f32 - 128.0) * 1e36).collect(),
        ];
        for ty in [IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M] {
            let k = kernels(ty).unwrap();
            for x in &rows {
                let mut a = vec![0u8; ty.row_size(256).unwrap()];
                let mut b = a.clone();
                (k.quantize_row_ref)(x, &mut a, Some(&w));
                (k.quantize_row)(x, &mut b, Some(&w));
                assert_eq!(a, b, "{ty}");
            }
        }
    }

    #[test]
    fn fast_sort_matches() {
        let mut r = crate::quant::testdata::Rng::new(3);
        for _ in 0..200 {
            let x: [f32; 32] = std::array::from_fn(|_| {
                ((r.next_u64() % 7) as f32 - 3.0) * 0.5
                    + if r.next_u64().is_multiple_of(5) {
                        -0.0
                    } else {
                        0.0
                    }
            });
            assert_eq!(sorted_order_fast::<32>(&x), sorted_order::<32>(&x));
            assert_eq!(
                sorted_order_fast::<16>(&x[..16]),
                sorted_order::<16>(&x[..16])
            );
        }
    }

    #[test]
    fn sort_is_stable() {
        let x = [
            0.5,
            -1.0,
            0.5,
            0.0,
            -0.0,
            -1.0,
            f32::MIN_POSITIVE,
            -1e-40,
            3e38,
            -3e38,
        ];
        assert_eq!(sorted_order::<10>(&x), [9, 1, 5, 7, 3, 4, 6, 0, 2, 8]);
    }
}
