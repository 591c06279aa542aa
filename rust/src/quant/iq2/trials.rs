//! The inner step of ggml's IQ2 scale searches: for each candidate inverse scale `id`, round
//! x·id to levels 0..=2 (`nearest_int(0.5·(id·x − 1))`), replace each group of 8 that is off the
//! grid by its best neighbour at scale 1/id, and form Σ w·x·q and Σ w·q² (q = 2l+1).
//!
//! Trials do not depend on each other (only the choice among them is sequential), so the AVX2
//! path runs 8 of them per register, with the reference's operations lane by lane.

use super::{nearest_int, pattern, GridSearch, IQ2_SEARCH_VALUES};

/// Most candidate scales a search tries (ggml: 13 for IQ2_XXS, 19 for IQ2_XS/IQ2_S).
pub(crate) const MAX_TRIALS: usize = 24;

/// Outcomes of the trials; levels are stored coordinate-major (`levels[i][trial]`).
pub(crate) struct Trials<const N: usize> {
    levels: [[i32; MAX_TRIALS]; N],
    pub on_grid: [[bool; 4]; MAX_TRIALS],
    pub sumqx: [f32; MAX_TRIALS],
    pub sumq2: [f32; MAX_TRIALS],
}

impl<const N: usize> Trials<N> {
    pub(crate) fn new() -> Self {
        Trials {
            levels: [[0; MAX_TRIALS]; N],
            on_grid: [[true; 4]; MAX_TRIALS],
            sumqx: [0.0; MAX_TRIALS],
            sumq2: [0.0; MAX_TRIALS],
        }
    }

    /// The (on-grid) levels trial `t` ended with.
    pub(crate) fn levels_of(&self, t: usize, out: &mut [i8; N]) {
        for (o, row) in out.iter_mut().zip(&self.levels) {
            *o = row[t] as i8;
        }
    }

    /// Scalar reference, one trial after the other.
    pub(crate) fn run_ref(
        &mut self,
        search: &GridSearch,
        xval: &[f32; N],
        weight: &[f32; N],
        waux: &[f32; N],
        ids: &[f32],
    ) {
        let mut laux = [0i8; N];
        for (t, &id) in ids.iter().enumerate() {
            let this_scale = 1.0 / id;
            for k in 0..N / 8 {
                let r = 8 * k..8 * k + 8;
                for i in r.clone() {
                    laux[i] = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, 2) as i8;
                }
                self.on_grid[t][k] = true;
                if let Err(off) = search.lookup(pattern(&laux[r.clone()])) {
                    self.on_grid[t][k] = false;
                    let j = search.best_neighbour_ref(
                        off,
                        &IQ2_SEARCH_VALUES,
                        &xval[r.clone()],
                        &waux[r.clone()],
                        this_scale,
                    );
                    for (l, &g) in laux[r].iter_mut().zip(search.levels(j)) {
                        *l = g as i8;
                    }
                }
            }
            let (mut sumqx, mut sumq2) = (0f32, 0f32);
            for i in 0..N {
                let w = weight[i];
                let q = (2 * laux[i] as i32 + 1) as f32;
                sumqx += w * xval[i] * q;
                sumq2 += w * q * q;
            }
            self.sumqx[t] = sumqx;
            self.sumq2[t] = sumq2;
            for i in 0..N {
                self.levels[i][t] = laux[i] as i32;
            }
        }
    }

    /// Same results as `run_ref`, on the fastest path this CPU has.
    pub(crate) fn run(
        &mut self,
        search: &GridSearch,
        xval: &[f32; N],
        weight: &[f32; N],
        waux: &[f32; N],
        ids: &[f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::cpu::has_avx2() {
            // Safety: AVX2 is present.
            return unsafe { self.run_avx2(search, xval, weight, waux, ids) };
        }
        self.run_ref(search, xval, weight, waux, ids)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(
        &mut self,
        search: &GridSearch,
        xval: &[f32; N],
        weight: &[f32; N],
        waux: &[f32; N],
        ids: &[f32],
    ) {
        use std::arch::x86_64::*;
        let n_trials = ids.len();
        debug_assert!(n_trials <= MAX_TRIALS);
        // Unused lanes round with id = 0 and are never read.
        let mut id_lanes = [0f32; MAX_TRIALS];
        id_lanes[..n_trials].copy_from_slice(ids);
        let n_vec = n_trials.div_ceil(8);
        let mut patterns = [[0i32; MAX_TRIALS]; 4];
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let magic = _mm256_set1_ps(12582912.0);
        let (mantissa, offset) = (
            _mm256_set1_epi32(0x007f_ffff),
            _mm256_set1_epi32(0x0040_0000),
        );
        let (zero, two) = (_mm256_setzero_si256(), _mm256_set1_epi32(2));
        for v in 0..n_vec {
            let id = _mm256_loadu_ps(id_lanes.as_ptr().add(8 * v));
            let mut pat = [zero; 4];
            for i in 0..N {
                // nearest_int(0.5·(id·x − 1)), clamped to 0..=2, exactly as the scalar code.
                let t = _mm256_mul_ps(
                    half,
                    _mm256_sub_ps(_mm256_mul_ps(id, _mm256_set1_ps(xval[i])), one),
                );
                let bits = _mm256_castps_si256(_mm256_add_ps(t, magic));
                let l = _mm256_sub_epi32(_mm256_and_si256(bits, mantissa), offset);
                let l = _mm256_min_epi32(_mm256_max_epi32(l, zero), two);
                _mm256_storeu_si256(self.levels[i].as_mut_ptr().add(8 * v) as *mut __m256i, l);
                let shifted = _mm256_sllv_epi32(l, _mm256_set1_epi32(2 * (i % 8) as i32));
                pat[i / 8] = _mm256_or_si256(pat[i / 8], shifted);
            }
            for k in 0..N / 8 {
                _mm256_storeu_si256(patterns[k].as_mut_ptr().add(8 * v) as *mut __m256i, pat[k]);
            }
        }
        for (t, &id) in ids.iter().enumerate() {
            let this_scale = 1.0 / id;
            for k in 0..N / 8 {
                self.on_grid[t][k] = true;
                if let Err(off) = search.lookup(patterns[k][t] as u16) {
                    self.on_grid[t][k] = false;
                    let r = 8 * k..8 * k + 8;
                    let j = search.best_neighbour(
                        off,
                        &IQ2_SEARCH_VALUES,
                        &xval[r.clone()],
                        &waux[r],
                        this_scale,
                    );
                    for (c, &g) in search.levels(j).iter().enumerate() {
                        self.levels[8 * k + c][t] = g as i32;
                    }
                }
            }
        }
        for v in 0..n_vec {
            let (mut acc_qx, mut acc_q2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for i in 0..N {
                let l = _mm256_loadu_si256(self.levels[i].as_ptr().add(8 * v) as *const __m256i);
                let q = _mm256_cvtepi32_ps(_mm256_add_epi32(
                    _mm256_add_epi32(l, l),
                    _mm256_set1_epi32(1),
                ));
                // (w·x)·q and (w·q)·q, the reference's association.
                let wx = _mm256_set1_ps(weight[i] * xval[i]);
                let w = _mm256_set1_ps(weight[i]);
                acc_qx = _mm256_add_ps(acc_qx, _mm256_mul_ps(wx, q));
                acc_q2 = _mm256_add_ps(acc_q2, _mm256_mul_ps(_mm256_mul_ps(w, q), q));
            }
            let mut qx = [0f32; 8];
            let mut q2 = [0f32; 8];
            _mm256_storeu_ps(qx.as_mut_ptr(), acc_qx);
            _mm256_storeu_ps(q2.as_mut_ptr(), acc_q2);
            let lanes = (n_trials - 8 * v).min(8);
            self.sumqx[8 * v..8 * v + lanes].copy_from_slice(&qx[..lanes]);
            self.sumq2[8 * v..8 * v + lanes].copy_from_slice(&q2[..lanes]);
        }
    }
}
