//! AVX2 versions of the k-quant searches with one sub-block per SIMD lane.
//!
//! ggml's searches (make_qkx2/qkx3/qx/q3_quants) are serial float reductions whose results
//! decide which levels are kept, so vectorising across a sub-block's elements would change the
//! summation order and with it the bytes. Instead the 8 or 16 sub-blocks of a super-block are
//! transposed so that lane k holds sub-block k: every lane then executes exactly the scalar
//! sequence of correctly rounded IEEE operations (mul, add, div, sqrt; never FMA), data-dependent
//! branches become per-lane masks, and the results are the reference's bit for bit.

// Index loops over parallel lane arrays mirror the scalar helpers in `util`.
#![allow(clippy::needless_range_loop)]

use super::q2_k::Fits16;
use super::q4_k::SubFits;
use super::{get_scale_min_k4, sum_squares, QK_K};
use crate::quant::util::GROUP_MAX_EPS;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
mod v {
    //! Small AVX2 helpers; `#[inline(always)]` so they compile into their AVX2 callers.
    use std::arch::x86_64::*;

    /// ggml's nearest_int on 8 lanes, bit-identical including out-of-range inputs.
    #[inline(always)]
    pub unsafe fn nearest_int(x: __m256) -> __m256i {
        let t = _mm256_castps_si256(_mm256_add_ps(x, _mm256_set1_ps(12_582_912.0)));
        _mm256_sub_epi32(_mm256_and_si256(t, _mm256_set1_epi32(0x007f_ffff)), _mm256_set1_epi32(0x0040_0000))
    }
    #[inline(always)]
    pub unsafe fn clamp(q: __m256i, lo: i32, hi: i32) -> __m256i {
        _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(hi)), _mm256_set1_epi32(lo))
    }
    /// `if mask { a } else { b }` per lane.
    #[inline(always)]
    pub unsafe fn select(mask: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(b, a, mask)
    }
    #[inline(always)]
    pub unsafe fn abs(x: __m256) -> __m256 {
        _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)))
    }
    #[inline(always)]
    pub unsafe fn neg(x: __m256) -> __m256 {
        _mm256_xor_ps(x, _mm256_set1_ps(-0.0))
    }
    #[inline(always)]
    pub unsafe fn lt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)
    }
    #[inline(always)]
    pub unsafe fn gt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps::<_CMP_GT_OQ>(a, b)
    }
    #[inline(always)]
    pub unsafe fn any(m: __m256) -> bool {
        _mm256_movemask_ps(m) != 0
    }
    #[inline(always)]
    pub unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    pub unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    pub unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    pub unsafe fn div(a: __m256, b: __m256) -> __m256 {
        _mm256_div_ps(a, b)
    }
    #[inline(always)]
    pub unsafe fn splat(a: f32) -> __m256 {
        _mm256_set1_ps(a)
    }

    /// Element i of 8 consecutive `n`-element sub-blocks starting at `x`, for i in 0..N.
    #[inline(always)]
    pub unsafe fn transpose<const N: usize>(x: *const f32) -> [__m256; N] {
        let n = N as i32;
        let idx = _mm256_setr_epi32(0, n, 2 * n, 3 * n, 4 * n, 5 * n, 6 * n, 7 * n);
        let mut out = [_mm256_setzero_ps(); N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = _mm256_i32gather_ps::<4>(x.add(i), idx);
        }
        out
    }

    /// Writes lane-layout levels back in element order: out[N*k + i] = lane k of l[i].
    #[inline(always)]
    pub unsafe fn untranspose_levels<const N: usize>(l: &[__m256; N], out: &mut [u8]) {
        let mut buf = [[0f32; 8]; N];
        for i in 0..N {
            _mm256_storeu_ps(buf[i].as_mut_ptr(), l[i]);
        }
        for k in 0..8 {
            for i in 0..N {
                out[N * k + i] = buf[i][k] as i32 as u8;
            }
        }
    }

    /// Stores 8 lanes of small non-negative i32 (< 256) as bytes.
    #[inline(always)]
    pub unsafe fn store_u8x8(q: __m256i, out: *mut u8) {
        let p = _mm256_packus_epi32(q, q);
        let p = _mm256_packus_epi16(p, p);
        let lo = _mm256_castsi256_si128(p);
        let hi = _mm256_extracti128_si256::<1>(p);
        _mm_storel_epi64(out as *mut __m128i, _mm_unpacklo_epi32(lo, hi));
    }
}

/// Lane version of make_qkx2_quants (`guarded` false) or make_qkx3_quants (`guarded` true, with
/// weights given): returns the levels (as floats, lane layout), the scales and ggml's `-min`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qkx_lanes<const N: usize>(
    xt: &[__m256; N],
    wt: &[__m256; N],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    guarded: bool,
) -> ([__m256; N], __m256, __m256) {
    use v::*;
    let zero = _mm256_setzero_ps();
    let nmaxf = nmax as f32;
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = mul(sum_w, xt[0]);
    for i in 1..N {
        min = select(lt(xt[i], min), xt[i], min);
        max = select(gt(xt[i], max), xt[i], max);
        sum_w = add(sum_w, wt[i]);
        sum_x = add(sum_x, mul(wt[i], xt[i]));
    }
    min = select(gt(min, zero), zero, min);
    let degenerate =
        if guarded { _mm256_cmp_ps::<_CMP_LE_OQ>(max, min) } else { _mm256_cmp_ps::<_CMP_EQ_OQ>(max, min) };
    let min0 = min;
    let mut iscale = div(splat(nmaxf), sub(max, min));
    let mut scale = div(splat(1.0), iscale);
    let mut best = zero;
    let mut l = [zero; N];
    for i in 0..N {
        let q = _mm256_cvtepi32_ps(clamp(nearest_int(mul(iscale, sub(xt[i], min))), 0, nmax));
        l[i] = q;
        let diff = sub(add(mul(scale, q), min), xt[i]);
        best = add(best, mul(wt[i], if use_mad { abs(diff) } else { mul(diff, diff) }));
    }
    debug_assert!(nstep >= 1);
    let mut laux = [zero; N];
    let nmaxv = splat(nmaxf);
    for is in 0..=nstep {
        iscale = div(splat(rmin + rdelta * is as f32 + nmaxf), sub(max, min));
        let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
        for i in 0..N {
            let v = mul(iscale, sub(xt[i], min));
            let q = if guarded {
                // v > 0 ? nearest_int(MIN(v, nmax)) : 0
                let qi = nearest_int(select(lt(v, nmaxv), v, nmaxv));
                _mm256_cvtepi32_ps(_mm256_and_si256(qi, _mm256_castps_si256(gt(v, zero))))
            } else {
                _mm256_cvtepi32_ps(clamp(nearest_int(v), 0, nmax))
            };
            laux[i] = q;
            let wl = mul(wt[i], q);
            sum_l = add(sum_l, wl);
            sum_l2 = add(sum_l2, mul(wl, q));
            sum_xl = add(sum_xl, mul(wl, xt[i]));
        }
        let d = sub(mul(sum_w, sum_l2), mul(sum_l, sum_l));
        let dpos = gt(d, zero);
        if !any(dpos) {
            continue;
        }
        let mut this_scale = div(sub(mul(sum_w, sum_xl), mul(sum_x, sum_l)), d);
        let mut this_min = div(sub(mul(sum_l2, sum_x), mul(sum_l, sum_xl)), d);
        let mpos = gt(this_min, zero);
        this_min = select(mpos, zero, this_min);
        this_scale = select(mpos, div(sum_xl, sum_l2), this_scale);
        let mut cur = zero;
        for i in 0..N {
            let diff = sub(add(mul(this_scale, laux[i]), this_min), xt[i]);
            cur = add(cur, mul(wt[i], if use_mad { abs(diff) } else { mul(diff, diff) }));
        }
        let better = _mm256_and_ps(dpos, lt(cur, best));
        if !any(better) {
            continue;
        }
        for i in 0..N {
            l[i] = select(better, laux[i], l[i]);
        }
        best = select(better, cur, best);
        scale = select(better, this_scale, scale);
        min = select(better, this_min, min);
    }
    for i in 0..N {
        l[i] = select(degenerate, zero, l[i]);
    }
    scale = select(degenerate, zero, scale);
    min = select(degenerate, min0, min);
    (l, scale, neg(min))
}

/// Lane version of make_qx_quants with rmse_type 1 and explicit weights `wt` (x² when ggml
/// passes no weights). Levels come back offset by +nmax, as ggml stores them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn qx_lanes<const N: usize>(xt: &[__m256; N], wt: &[__m256; N], nmax: i32) -> ([__m256; N], __m256) {
    use v::*;
    let zero = _mm256_setzero_ps();
    let nmaxf = nmax as f32;
    let (mut amax, mut max) = (zero, zero);
    for i in 0..N {
        let ax = abs(xt[i]);
        let g = gt(ax, amax);
        amax = select(g, ax, amax);
        max = select(g, xt[i], max);
    }
    let all_zero = lt(amax, splat(GROUP_MAX_EPS));
    let iscale = div(splat(-nmaxf), max);
    let (mut sumlx, mut suml2) = (zero, zero);
    let mut l = [zero; N];
    for i in 0..N {
        let q = _mm256_cvtepi32_ps(clamp(nearest_int(mul(iscale, xt[i])), -nmax, nmax - 1));
        l[i] = q;
        sumlx = add(sumlx, mul(mul(wt[i], xt[i]), q));
        suml2 = add(suml2, mul(mul(wt[i], q), q));
    }
    let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(suml2, zero);
    let mut scale = select(nonzero, div(sumlx, suml2), zero);
    let mut best = mul(scale, sumlx);
    let mut laux = [zero; N];
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let iscale = div(splat(-(nmaxf + 0.1f32 * is as f32)), max);
        let (mut sumlx, mut suml2) = (zero, zero);
        for i in 0..N {
            let q = _mm256_cvtepi32_ps(clamp(nearest_int(mul(iscale, xt[i])), -nmax, nmax - 1));
            laux[i] = q;
            sumlx = add(sumlx, mul(mul(wt[i], xt[i]), q));
            suml2 = add(suml2, mul(mul(wt[i], q), q));
        }
        let upd = _mm256_and_ps(gt(suml2, zero), gt(mul(sumlx, sumlx), mul(best, suml2)));
        if !any(upd) {
            continue;
        }
        for i in 0..N {
            l[i] = select(upd, laux[i], l[i]);
        }
        let s = div(sumlx, suml2);
        scale = select(upd, s, scale);
        best = select(upd, mul(s, sumlx), best);
    }
    let off = splat(nmaxf);
    for i in 0..N {
        l[i] = select(all_zero, zero, add(l[i], off));
    }
    (l, select(all_zero, zero, scale))
}

/// Lane version of make_q3_quants with do_rmse (weights x²). Levels offset by +nmax.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q3_lanes<const N: usize>(xt: &[__m256; N], nmax: i32) -> ([__m256; N], __m256) {
    use v::*;
    let zero = _mm256_setzero_ps();
    let nmaxf = nmax as f32;
    let (mut amax, mut max) = (zero, zero);
    for i in 0..N {
        let ax = abs(xt[i]);
        let g = gt(ax, amax);
        amax = select(g, ax, amax);
        max = select(g, xt[i], max);
    }
    let all_zero = lt(amax, splat(GROUP_MAX_EPS));
    let iscale = div(splat(-nmaxf), max);
    let mut w = [zero; N];
    let mut wx = [zero; N];
    let (mut sumlx, mut suml2) = (zero, zero);
    let mut l = [zero; N];
    for i in 0..N {
        let q = _mm256_cvtepi32_ps(clamp(nearest_int(mul(iscale, xt[i])), -nmax, nmax - 1));
        l[i] = q;
        w[i] = mul(xt[i], xt[i]);
        wx[i] = mul(w[i], xt[i]);
        sumlx = add(sumlx, mul(wx[i], q));
        suml2 = add(suml2, mul(mul(w[i], q), q));
    }
    for _ in 0..5 {
        let mut changed = zero;
        for i in 0..N {
            let li = l[i];
            let slx = sub(sumlx, mul(wx[i], li));
            let positive = gt(slx, zero);
            let sl2 = sub(suml2, mul(mul(w[i], li), li));
            let q = clamp(nearest_int(div(mul(xt[i], sl2), slx)), -nmax, nmax - 1);
            let new_l = _mm256_cvtepi32_ps(q);
            let differs = _mm256_cmp_ps::<_CMP_NEQ_UQ>(new_l, li);
            let slx2 = add(slx, mul(wx[i], new_l));
            let sl22 = add(sl2, mul(mul(w[i], new_l), new_l));
            let improves =
                _mm256_and_ps(gt(sl22, zero), gt(mul(mul(slx2, slx2), suml2), mul(mul(sumlx, sumlx), sl22)));
            let accept = _mm256_and_ps(_mm256_and_ps(positive, differs), improves);
            l[i] = select(accept, new_l, li);
            sumlx = select(accept, slx2, sumlx);
            suml2 = select(accept, sl22, suml2);
            changed = _mm256_or_ps(changed, accept);
        }
        // A lane without changes would repeat the same pass unchanged, so running converged lanes
        // on with the others is harmless; stop once no lane changes.
        if !any(changed) {
            break;
        }
    }
    let off = splat(nmaxf);
    for i in 0..N {
        l[i] = select(all_zero, zero, add(l[i], off));
    }
    let scale = select(gt(suml2, zero), div(sumlx, suml2), zero);
    (l, select(all_zero, zero, scale))
}

/// Q4_K/Q5_K sub-block fits for one super-block: without `qw`, quantize_row_q4/5_K_ref's
/// make_qkx2_quants with the given search parameters; with `qw`, the _impl's make_qkx3_quants.
/// Also returns the weight sums (zeros without `qw`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q45k(
    x: &[f32],
    qw: Option<&[f32]>,
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (SubFits, [f32; 8]) {
    use v::*;
    assert!(x.len() >= QK_K && qw.map_or(true, |w| w.len() >= QK_K));
    let xt = transpose::<32>(x.as_ptr());
    let mut wt = [_mm256_setzero_ps(); 32];
    let mut sw = [0f32; 8];
    let (l, scale, the_min) = match qw {
        None => {
            let mut s = _mm256_setzero_ps();
            for i in 0..32 {
                s = add(s, mul(xt[i], xt[i]));
            }
            let av_x = _mm256_sqrt_ps(div(s, splat(32.0)));
            for i in 0..32 {
                wt[i] = add(av_x, abs(xt[i]));
            }
            qkx_lanes::<32>(&xt, &wt, nmax, rmin, rdelta, nstep, false, false)
        }
        Some(qw) => {
            let sigma2 = splat(2.0 * sum_squares(&x[..QK_K]) / QK_K as f32);
            let qt = transpose::<32>(qw.as_ptr());
            let mut s = _mm256_setzero_ps();
            for i in 0..32 {
                wt[i] = mul(qt[i], _mm256_sqrt_ps(add(sigma2, mul(xt[i], xt[i]))));
                s = add(s, wt[i]);
            }
            _mm256_storeu_ps(sw.as_mut_ptr(), s);
            qkx_lanes::<32>(&xt, &wt, nmax, rmin, rdelta, nstep, false, true)
        }
    };
    let mut f = SubFits { scales: [0.0; 8], mins: [0.0; 8], levels: [0; QK_K] };
    _mm256_storeu_ps(f.scales.as_mut_ptr(), scale);
    _mm256_storeu_ps(f.mins.as_mut_ptr(), the_min);
    untranspose_levels::<32>(&l, &mut f.levels);
    (f, sw)
}

/// Q2_K sub-block fits (16 sub-blocks of 16: two lane groups): make_qkx2_quants with |x|
/// weights and absolute error, or with `qw` the _impl's make_qkx3_quants.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q2k(x: &[f32], qw: Option<&[f32]>) -> Fits16 {
    use v::*;
    assert!(x.len() >= QK_K && qw.map_or(true, |w| w.len() >= QK_K));
    let mut f = Fits16 { scales: [0.0; 16], mins: [0.0; 16], levels: [0; QK_K], sw: [0.0; 16] };
    let sigma2 = match qw {
        Some(_) => splat(sum_squares(&x[..QK_K]) / QK_K as f32),
        None => _mm256_setzero_ps(),
    };
    for g in 0..2 {
        let xt = transpose::<16>(x.as_ptr().add(128 * g));
        let mut wt = [_mm256_setzero_ps(); 16];
        let (l, scale, the_min) = match qw {
            None => {
                for i in 0..16 {
                    wt[i] = abs(xt[i]);
                }
                qkx_lanes::<16>(&xt, &wt, 3, -0.5, 0.1, 15, true, false)
            }
            Some(qw) => {
                let qt = transpose::<16>(qw.as_ptr().add(128 * g));
                let mut s = _mm256_setzero_ps();
                for i in 0..16 {
                    wt[i] = mul(qt[i], _mm256_sqrt_ps(add(sigma2, mul(xt[i], xt[i]))));
                    s = add(s, wt[i]);
                }
                _mm256_storeu_ps(f.sw.as_mut_ptr().add(8 * g), s);
                qkx_lanes::<16>(&xt, &wt, 3, -0.9, 0.05, 36, false, true)
            }
        };
        _mm256_storeu_ps(f.scales.as_mut_ptr().add(8 * g), scale);
        _mm256_storeu_ps(f.mins.as_mut_ptr().add(8 * g), the_min);
        untranspose_levels::<16>(&l, &mut f.levels[128 * g..]);
    }
    f
}

/// Q3_K no-imatrix fits: make_q3_quants(nmax 4, do_rmse) per sub-block. Levels offset +4.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q3k(x: &[f32]) -> ([i8; QK_K], [f32; 16]) {
    use v::*;
    assert!(x.len() >= QK_K);
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    for g in 0..2 {
        let xt = transpose::<16>(x.as_ptr().add(128 * g));
        let (l, s) = q3_lanes::<16>(&xt, 4);
        _mm256_storeu_ps(scales.as_mut_ptr().add(8 * g), s);
        untranspose_levels::<16>(&l, &mut levels[128 * g..]);
    }
    (levels.map(|v| v as i8), scales)
}

/// Q3_K imatrix fits: weights qw*sqrt(2σ² + x²), make_qx_quants(nmax 4). Returns the levels
/// (offset +4), the scales and the weight sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q3k_imatrix(x: &[f32], qw: &[f32]) -> ([i8; QK_K], [f32; 16], [f32; 16]) {
    use v::*;
    assert!(x.len() >= QK_K && qw.len() >= QK_K);
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut sw = [0f32; 16];
    let sigma2 = splat(2.0 * sum_squares(&x[..QK_K]) / QK_K as f32);
    for g in 0..2 {
        let xt = transpose::<16>(x.as_ptr().add(128 * g));
        let qt = transpose::<16>(qw.as_ptr().add(128 * g));
        let mut wt = [_mm256_setzero_ps(); 16];
        let mut s = _mm256_setzero_ps();
        for i in 0..16 {
            wt[i] = mul(qt[i], _mm256_sqrt_ps(add(sigma2, mul(xt[i], xt[i]))));
            s = add(s, wt[i]);
        }
        _mm256_storeu_ps(sw.as_mut_ptr().add(8 * g), s);
        let (l, sc) = qx_lanes::<16>(&xt, &wt, 4);
        _mm256_storeu_ps(scales.as_mut_ptr().add(8 * g), sc);
        untranspose_levels::<16>(&l, &mut levels[128 * g..]);
    }
    (levels.map(|v| v as i8), scales, sw)
}

/// Q6_K fits: make_qx_quants(nmax 32, rmse_type 1) with weights x², or the raw `qw`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q6k(x: &[f32], qw: Option<&[f32]>) -> ([i8; QK_K], [f32; 16]) {
    use v::*;
    assert!(x.len() >= QK_K && qw.map_or(true, |w| w.len() >= QK_K));
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    for g in 0..2 {
        let xt = transpose::<16>(x.as_ptr().add(128 * g));
        let wt = match qw {
            Some(qw) => transpose::<16>(qw.as_ptr().add(128 * g)),
            None => {
                let mut wt = [_mm256_setzero_ps(); 16];
                for i in 0..16 {
                    wt[i] = mul(xt[i], xt[i]);
                }
                wt
            }
        };
        let (l, sc) = qx_lanes::<16>(&xt, &wt, 32);
        _mm256_storeu_ps(scales.as_mut_ptr().add(8 * g), sc);
        untranspose_levels::<16>(&l, &mut levels[128 * g..]);
    }
    (levels.map(|v| v as i8), scales)
}

/// Final levels of one 16-element sub-block: nearest_int((x + m)/d) clamped to [lo, hi], stored
/// minus `lo` (the offset ggml adds). `m` = 0 reproduces ggml's x/d exactly (x + 0 only turns
/// -0 into +0, which rounds the same).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn requantize16_offset(x: &[f32], m: f32, d: f32, lo: i32, hi: i32, out: &mut [u8]) {
    use v::*;
    assert!(x.len() >= 16 && out.len() >= 16);
    let (mv, dv) = (splat(m), splat(d));
    for g in 0..2 {
        let xv = _mm256_loadu_ps(x.as_ptr().add(8 * g));
        let q = clamp(nearest_int(div(add(xv, mv), dv)), lo, hi);
        store_u8x8(_mm256_sub_epi32(q, _mm256_set1_epi32(lo)), out.as_mut_ptr().add(8 * g));
    }
}

/// Q4_K/Q5_K final levels for the sub-blocks whose stored scale is non-zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn requantize_k4(x: &[f32], scales: &[u8], d: f32, dmin: f32, nmax: i32, levels: &mut [u8; QK_K]) {
    use v::*;
    assert!(x.len() >= QK_K);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let (dv, mv) = (splat(dj), splat(dmin * m as f32));
        for g in 0..4 {
            let xv = _mm256_loadu_ps(x.as_ptr().add(32 * j + 8 * g));
            let q = clamp(nearest_int(div(add(xv, mv), dv)), 0, nmax);
            store_u8x8(q, levels.as_mut_ptr().add(32 * j + 8 * g));
        }
    }
}
