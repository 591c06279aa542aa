//! IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear table `kvalues_iq4nl`, with one scale per
//! 32 weights (IQ4_NL: an f16 per block; IQ4_XS: a 6-bit scale under an f16 super-block scale).
//!
//! Both follow ggml's `quantize_row_iq4_nl_impl` with `ntry = 7`, the path `quantize_iq4_nl` and
//! `quantize_iq4_xs` take (and so llama-quantize), with or without an importance matrix.

use half::f16;

use super::iq_tables::KVALUES_IQ4NL;
use super::util::nearest_int;

pub mod iq4_nl;
pub mod iq4_xs;

pub use iq4_nl::IQ4_NL_KERNELS;
pub use iq4_xs::IQ4_XS_KERNELS;

/// ggml's GROUP_MAX_EPS: sub-blocks whose largest magnitude is below this get scale 0.
const GROUP_MAX_EPS: f32 = 1e-15;
/// Scale trials on each side of the initial guess (ggml's `ntry`).
const NTRY: i32 = 7;

/// The levels as f32 (ggml compares floats against the promoted int8 levels).
const LEVELS: [f32; 16] = {
    let mut m = [0f32; 16];
    let mut j = 0;
    while j < 16 {
        m[j] = KVALUES_IQ4NL[j] as f32;
        j += 1;
    }
    m
};

/// ggml's `best_index_int8` on kvalues_iq4nl: bisect to the bracketing levels, then take the
/// nearer one (the upper on ties, and 15 for NaN), with ggml's exact float comparisons.
#[inline]
pub(crate) fn best_index(x: f32) -> usize {
    if x <= LEVELS[0] {
        return 0;
    }
    if x >= LEVELS[15] {
        return 15;
    }
    let (mut ml, mut mu) = (0, 15);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < LEVELS[mav] {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - LEVELS[mu - 1] < LEVELS[mu] - x {
        mu - 1
    } else {
        mu
    }
}

/// The per-sub-block scale search: returns ggml's `d` for 32 weights `xb` with weights `weight`,
/// where `max` is the signed value of largest magnitude.
pub(crate) type ScaleSearchFn = fn(xb: &[f32], weight: &[f32], max: f32) -> f32;

/// Scalar scale search, as in `quantize_row_iq4_nl_impl`: an initial guess d = max/127 refined
/// by the least-squares scale of each of 15 trial quantizations.
pub(crate) fn search_scale_ref(xb: &[f32], weight: &[f32], max: f32) -> f32 {
    let values = &KVALUES_IQ4NL;
    let v0 = values[0] as f32;
    let (sumqx, sumq2) = trial_sums(xb, weight, 1.0 / (-max / v0));
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let id = (itry + values[0] as i32) as f32 / max;
        let (sumqx, sumq2) = trial_sums(xb, weight, id);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Weighted sums Σ w·q·x and Σ w·q² of quantizing `xb` with inverse scale `id`.
#[inline]
fn trial_sums(xb: &[f32], weight: &[f32], id: f32) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for (x, w) in xb.iter().zip(weight) {
        let q = KVALUES_IQ4NL[best_index(id * x)] as f32;
        sumqx += w * q * x;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// Level indices of `x` at inverse scale `id`, written to `l`.
pub(crate) type IndexFn = fn(x: &[f32], id: f32, l: &mut [u8]);

pub(crate) fn indices_ref(x: &[f32], id: f32, l: &mut [u8]) {
    for (o, v) in l.iter_mut().zip(x) {
        *o = best_index(id * v) as u8;
    }
}

/// What one super-block of `n` weights (32 for IQ4_NL, 256 for IQ4_XS) quantizes to.
pub(crate) struct SuperBlock {
    /// f16 bits of the block (IQ4_NL) or super-block (IQ4_XS) scale.
    pub d: u16,
    /// IQ4_XS only: the 6-bit sub-block scales, biased by 32.
    pub sub_scales: [u8; 8],
}

/// `quantize_row_iq4_nl_impl(n, 32, ..., ntry = 7)`: fills `l` with level indices (one per weight).
pub(crate) fn quantize_superblock(
    x: &[f32],
    quant_weights: Option<&[f32]>,
    l: &mut [u8],
    search: ScaleSearchFn,
    indices: IndexFn,
) -> SuperBlock {
    let n = x.len();
    let nb = n / 32;
    let mut sigma2 = 0f32;
    for v in x {
        sigma2 += v * v;
    }
    sigma2 *= 2.0 / n as f32;

    let mut scales = [0f32; 8];
    let mut weight = [0f32; 32];
    let (mut max_scale, mut amax_scale) = (0f32, 0f32);
    for ib in 0..nb {
        let xb = &x[32 * ib..32 * ib + 32];
        match quant_weights {
            Some(qw) => {
                for ((w, q), v) in weight.iter_mut().zip(&qw[32 * ib..]).zip(xb) {
                    *w = q * (sigma2 + v * v).sqrt();
                }
            }
            None => {
                for (w, v) in weight.iter_mut().zip(xb) {
                    *w = v * v;
                }
            }
        }
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            let ax = v.abs();
            if ax > amax {
                amax = ax;
                max = v;
            }
        }
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let d = search(xb, &weight, max);
        scales[ib] = d;
        if d.abs() > amax_scale {
            amax_scale = d.abs();
            max_scale = d;
        }
    }

    let mut out = SuperBlock {
        d: 0,
        sub_scales: [0; 8],
    };
    if nb > 1 {
        let d = -max_scale / 32.0;
        out.d = f16::from_f32(d).to_bits();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for ib in 0..nb {
            let ls = nearest_int(id * scales[ib]).clamp(-32, 31);
            let dl = d * ls as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            indices(
                &x[32 * ib..32 * ib + 32],
                idl,
                &mut l[32 * ib..32 * ib + 32],
            );
            out.sub_scales[ib] = (ls + 32) as u8;
        }
    } else {
        out.d = f16::from_f32(scales[0]).to_bits();
        let id = if scales[0] != 0.0 {
            1.0 / scales[0]
        } else {
            0.0
        };
        indices(x, id, l);
    }
    out
}

/// Packs 32 level indices per 16 bytes: element j in the low nibble, j + 16 in the high one.
#[inline]
pub(crate) fn pack_nibbles(l: &[u8], qs: &mut [u8]) {
    for (q, l) in qs.chunks_exact_mut(16).zip(l.chunks_exact(32)) {
        for j in 0..16 {
            q[j] = l[j] | (l[16 + j] << 4);
        }
    }
}

/// Dequantizes 16 bytes of nibbles with scale `d` into 32 values.
#[inline]
pub(crate) fn dequantize_nibbles_ref(qs: &[u8], d: f32, y: &mut [f32]) {
    for j in 0..16 {
        y[j] = d * KVALUES_IQ4NL[(qs[j] & 0xf) as usize] as f32;
        y[j + 16] = d * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! AVX2 kernels shared by IQ4_NL and IQ4_XS. Each does per lane exactly the float operations
    //! of the scalar code (separate mul and add, same order), so bytes and values are identical.

    use std::arch::x86_64::*;

    use super::{KVALUES_IQ4NL, LEVELS, NTRY};

    /// `best_index` for 8 lanes, returning (index, level). Inside (v0, v15) the bisection ends at
    /// mu = 1 + #{j in 1..15 : x >= v[j]}; the edge tests come first, as in ggml.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn index8(x: __m256, lo: __m256, hi: __m256) -> (__m256i, __m256) {
        let mut mu = _mm256_set1_epi32(1);
        for v in &LEVELS[1..15] {
            // A true compare is all ones (-1), so subtracting it counts.
            let ge = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(*v)));
            mu = _mm256_sub_epi32(mu, ge);
        }
        let one = _mm256_set1_epi32(1);
        let below = _mm256_sub_epi32(mu, one);
        let lower = level8(below, lo, hi);
        let upper = level8(mu, lo, hi);
        let pick_lower =
            _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_sub_ps(x, lower), _mm256_sub_ps(upper, x));
        let mut idx = _mm256_add_epi32(mu, _mm256_castps_si256(pick_lower));
        let mut q = _mm256_blendv_ps(upper, lower, pick_lower);
        // x <= v0 gives 0; otherwise !(x < v15) (x >= v15, or NaN) gives 15.
        let top = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(LEVELS[15]));
        idx = _mm256_blendv_epi8(idx, _mm256_set1_epi32(15), _mm256_castps_si256(top));
        q = _mm256_blendv_ps(q, _mm256_set1_ps(LEVELS[15]), top);
        let bottom = _mm256_cmp_ps::<_CMP_LE_OQ>(x, _mm256_set1_ps(LEVELS[0]));
        idx = _mm256_andnot_si256(_mm256_castps_si256(bottom), idx);
        q = _mm256_blendv_ps(q, _mm256_set1_ps(LEVELS[0]), bottom);
        (idx, q)
    }

    /// LEVELS[idx] for 8 lanes of indices in 0..16.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn level8(idx: __m256i, lo: __m256, hi: __m256) -> __m256 {
        let a = _mm256_permutevar8x32_ps(lo, idx);
        let b = _mm256_permutevar8x32_ps(hi, idx);
        let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
        _mm256_blendv_ps(a, b, upper)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn level_tables() -> (__m256, __m256) {
        (
            _mm256_loadu_ps(LEVELS.as_ptr()),
            _mm256_loadu_ps(LEVELS.as_ptr().add(8)),
        )
    }
    /// `search_scale_ref` with its 16 trial quantizations in the lanes of two vectors: each lane
    /// accumulates its sums over j in order, so the sums equal the scalar ones bit for bit.
    pub(crate) fn search_scale(xb: &[f32], weight: &[f32], max: f32) -> f32 {
        unsafe { search_scale_avx2(xb, weight, max) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn search_scale_avx2(xb: &[f32], weight: &[f32], max: f32) -> f32 {
        let v0 = KVALUES_IQ4NL[0] as f32;
        // Lane 0: the initial guess; lanes 1..16: itry = -7..=7.
        let mut ids = [0f32; 16];
        ids[0] = 1.0 / (-max / v0);
        for (t, itry) in (-NTRY..=NTRY).enumerate() {
            ids[t + 1] = (itry + KVALUES_IQ4NL[0] as i32) as f32 / max;
        }
        let (lo, hi) = level_tables();
        let id_a = _mm256_loadu_ps(ids.as_ptr());
        let id_b = _mm256_loadu_ps(ids.as_ptr().add(8));
        let (mut sqx_a, mut sq2_a) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut sqx_b, mut sq2_b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (x, w) in xb.iter().zip(weight) {
            let xv = _mm256_set1_ps(*x);
            let wv = _mm256_set1_ps(*w);
            let (_, qa) = index8(_mm256_mul_ps(id_a, xv), lo, hi);
            let (_, qb) = index8(_mm256_mul_ps(id_b, xv), lo, hi);
            let wqa = _mm256_mul_ps(wv, qa);
            let wqb = _mm256_mul_ps(wv, qb);
            sqx_a = _mm256_add_ps(sqx_a, _mm256_mul_ps(wqa, xv));
            sq2_a = _mm256_add_ps(sq2_a, _mm256_mul_ps(wqa, qa));
            sqx_b = _mm256_add_ps(sqx_b, _mm256_mul_ps(wqb, xv));
            sq2_b = _mm256_add_ps(sq2_b, _mm256_mul_ps(wqb, qb));
        }
        let mut sqx = [0f32; 16];
        let mut sq2 = [0f32; 16];
        _mm256_storeu_ps(sqx.as_mut_ptr(), sqx_a);
        _mm256_storeu_ps(sqx.as_mut_ptr().add(8), sqx_b);
        _mm256_storeu_ps(sq2.as_mut_ptr(), sq2_a);
        _mm256_storeu_ps(sq2.as_mut_ptr().add(8), sq2_b);
        let mut d = if sq2[0] > 0.0 { sqx[0] / sq2[0] } else { 0.0 };
        let mut best = d * sqx[0];
        for t in 1..16 {
            if sq2[t] > 0.0 && sqx[t] * sqx[t] > best * sq2[t] {
                d = sqx[t] / sq2[t];
                best = d * sqx[t];
            }
        }
        d
    }

    /// `indices_ref` eight lanes at a time.
    pub(crate) fn indices(x: &[f32], id: f32, l: &mut [u8]) {
        unsafe { indices_avx2(x, id, l) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn indices_avx2(x: &[f32], id: f32, l: &mut [u8]) {
        let idv = _mm256_set1_ps(id);
        let (lo, hi) = level_tables();
        let mut tmp = [0i32; 8];
        for (xs, ls) in x.chunks_exact(8).zip(l.chunks_exact_mut(8)) {
            let (idx, _) = index8(_mm256_mul_ps(idv, _mm256_loadu_ps(xs.as_ptr())), lo, hi);
            _mm256_storeu_si256(tmp.as_mut_ptr().cast(), idx);
            for (o, v) in ls.iter_mut().zip(tmp) {
                *o = v as u8;
            }
        }
    }

    /// `dequantize_nibbles_ref`: byte-shuffle lookup of the levels, then one multiply per value.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn dequantize_nibbles(qs: &[u8], d: f32, y: &mut [f32]) {
        debug_assert!(qs.len() >= 16 && y.len() >= 32);
        let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr().cast());
        let q = _mm_loadu_si128(qs.as_ptr().cast());
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, mask));
        let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(q), mask));
        let dv = _mm256_set1_ps(d);
        store_scaled(lo, dv, y.as_mut_ptr());
        store_scaled(hi, dv, y.as_mut_ptr().add(16));
    }

    /// Writes 16 signed bytes times `dv` as 16 floats at `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_scaled(v: __m128i, dv: __m256, p: *mut f32) {
        let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)));
        _mm256_storeu_ps(p, _mm256_mul_ps(dv, a));
        _mm256_storeu_ps(p.add(8), _mm256_mul_ps(dv, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_index_is_nearest_level_with_ties_up() {
        for (i, v) in KVALUES_IQ4NL.iter().enumerate() {
            assert_eq!(best_index(*v as f32), i);
        }
        assert_eq!(best_index(-1000.0), 0);
        assert_eq!(best_index(1000.0), 15);
        assert_eq!(best_index(7.0), 9); // midway between 1 and 13
        assert_eq!(best_index(6.999), 8);
        assert_eq!(best_index(f32::NAN), 15);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_indices_match_scalar_everywhere() {
        if !crate::quant::cpu::has_avx2() {
            return;
        }
        let mut x: Vec<f32> = (-1400..1400).map(|i| i as f32 * 0.1).collect();
        for v in KVALUES_IQ4NL {
            let v = v as f32;
            x.extend([v, v.next_up(), v.next_down()]);
        }
        for w in KVALUES_IQ4NL.windows(2) {
            let mid = (w[0] as f32 + w[1] as f32) / 2.0;
            x.extend([mid, mid.next_up(), mid.next_down()]);
        }
        x.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-40,
        ]);
        x.resize(x.len().next_multiple_of(8), 0.0);
        let mut fast = vec![0u8; x.len()];
        avx2::indices(&x, 1.0, &mut fast);
        for (v, f) in x.iter().zip(&fast) {
            assert_eq!(best_index(*v) as u8, *f, "x = {v}");
        }
    }
}
