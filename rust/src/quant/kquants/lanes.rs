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

use super::{get_scale_min_k4, sum_squares, QK_K};
use crate::quant::util::GROUP_MAX_EPS;

use std::arch::x86_64::*;

mod v {
    //! Small AVX2 helpers; `#[inline(always)]` so they compile into their AVX2 callers.
    use std::arch::x86_64::*;

    /// ggml's nearest_int on 8 lanes, bit-identical including out-of-range inputs.
    #[inline(always)]
    pub unsafe fn nearest_int(x: __m256) -> __m256i {
        let t = _mm256_castps_si256(_mm256_add_ps(x, _mm256_set1_ps(12_582_912.0)));
        _mm256_sub_epi32(
            _mm256_and_si256(t, _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x0040_0000),
        )
    }
    #[inline(always)]
    pub unsafe fn clamp(q: __m256i, lo: i32, hi: i32) -> __m256i {
        _mm256_max_epi32(
            _mm256_min_epi32(q, _mm256_set1_epi32(hi)),
            _mm256_set1_epi32(lo),
        )
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

/// `G` groups of 8 sub-blocks in lane layout: `[g][i]` holds element i of sub-blocks 8g..8g+8.
/// Interleaving G independent groups in one loop hides the latency of the serial reductions.
pub(crate) type Lanes<const N: usize, const G: usize> = [[__m256; N]; G];

/// Lane version of make_qkx2_quants (`guarded` false) or make_qkx3_quants (`guarded` true, with
/// weights given): returns the levels (as floats), the scales and ggml's `-min` per lane.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qkx_lanes<const N: usize, const G: usize>(
    xt: &Lanes<N, G>,
    wt: &Lanes<N, G>,
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    guarded: bool,
) -> (Lanes<N, G>, [__m256; G], [__m256; G]) {
    use v::*;
    let zero = _mm256_setzero_ps();
    let nmaxf = nmax as f32;
    let nmaxv = splat(nmaxf);
    let mut min = [zero; G];
    let mut max = [zero; G];
    let mut sum_w = [zero; G];
    let mut sum_x = [zero; G];
    for g in 0..G {
        min[g] = xt[g][0];
        max[g] = xt[g][0];
        sum_w[g] = wt[g][0];
        sum_x[g] = mul(sum_w[g], xt[g][0]);
    }
    for i in 1..N {
        for g in 0..G {
            let x = xt[g][i];
            min[g] = select(lt(x, min[g]), x, min[g]);
            max[g] = select(gt(x, max[g]), x, max[g]);
            sum_w[g] = add(sum_w[g], wt[g][i]);
            sum_x[g] = add(sum_x[g], mul(wt[g][i], x));
        }
    }
    let mut degenerate = [zero; G];
    let mut scale = [zero; G];
    let mut best = [zero; G];
    for g in 0..G {
        min[g] = select(gt(min[g], zero), zero, min[g]);
        degenerate[g] = if guarded {
            _mm256_cmp_ps::<_CMP_LE_OQ>(max[g], min[g])
        } else {
            _mm256_cmp_ps::<_CMP_EQ_OQ>(max[g], min[g])
        };
    }
    let min0 = min;
    let mut l = [[zero; N]; G];
    for g in 0..G {
        let iscale = div(nmaxv, sub(max[g], min[g]));
        scale[g] = div(splat(1.0), iscale);
        for i in 0..N {
            let q = _mm256_cvtepi32_ps(clamp(
                nearest_int(mul(iscale, sub(xt[g][i], min[g]))),
                0,
                nmax,
            ));
            l[g][i] = q;
            let diff = sub(add(mul(scale[g], q), min[g]), xt[g][i]);
            best[g] = add(
                best[g],
                mul(wt[g][i], if use_mad { abs(diff) } else { mul(diff, diff) }),
            );
        }
    }
    debug_assert!(nstep >= 1);
    let mut laux = [[zero; N]; G];
    for is in 0..=nstep {
        let numerator = splat(rmin + rdelta * is as f32 + nmaxf);
        let mut iscale = [zero; G];
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([zero; G], [zero; G], [zero; G]);
        for g in 0..G {
            iscale[g] = div(numerator, sub(max[g], min[g]));
        }
        for i in 0..N {
            for g in 0..G {
                let v = mul(iscale[g], sub(xt[g][i], min[g]));
                let q = if guarded {
                    // v > 0 ? nearest_int(MIN(v, nmax)) : 0; minps(v, n) is exactly v < n ? v : n.
                    let qi = nearest_int(_mm256_min_ps(v, nmaxv));
                    _mm256_cvtepi32_ps(_mm256_and_si256(qi, _mm256_castps_si256(gt(v, zero))))
                } else {
                    _mm256_cvtepi32_ps(clamp(nearest_int(v), 0, nmax))
                };
                laux[g][i] = q;
                let wl = mul(wt[g][i], q);
                sum_l[g] = add(sum_l[g], wl);
                sum_l2[g] = add(sum_l2[g], mul(wl, q));
                sum_xl[g] = add(sum_xl[g], mul(wl, xt[g][i]));
            }
        }
        let mut dpos = [zero; G];
        let mut d = [zero; G];
        let mut any_dpos = false;
        for g in 0..G {
            d[g] = sub(mul(sum_w[g], sum_l2[g]), mul(sum_l[g], sum_l[g]));
            dpos[g] = gt(d[g], zero);
            any_dpos |= any(dpos[g]);
        }
        if !any_dpos {
            continue;
        }
        let mut this_scale = [zero; G];
        let mut this_min = [zero; G];
        let mut cur = [zero; G];
        for g in 0..G {
            let ts = div(sub(mul(sum_w[g], sum_xl[g]), mul(sum_x[g], sum_l[g])), d[g]);
            let tm = div(
                sub(mul(sum_l2[g], sum_x[g]), mul(sum_l[g], sum_xl[g])),
                d[g],
            );
            let mpos = gt(tm, zero);
            this_min[g] = select(mpos, zero, tm);
            this_scale[g] = select(mpos, div(sum_xl[g], sum_l2[g]), ts);
        }
        for i in 0..N {
            for g in 0..G {
                let diff = sub(add(mul(this_scale[g], laux[g][i]), this_min[g]), xt[g][i]);
                cur[g] = add(
                    cur[g],
                    mul(wt[g][i], if use_mad { abs(diff) } else { mul(diff, diff) }),
                );
            }
        }
        for g in 0..G {
            let better = _mm256_and_ps(dpos[g], lt(cur[g], best[g]));
            if !any(better) {
                continue;
            }
            for i in 0..N {
                l[g][i] = select(better, laux[g][i], l[g][i]);
            }
            best[g] = select(better, cur[g], best[g]);
            scale[g] = select(better, this_scale[g], scale[g]);
            min[g] = select(better, this_min[g], min[g]);
        }
    }
    let mut neg_min = [zero; G];
    for g in 0..G {
        for i in 0..N {
            l[g][i] = select(degenerate[g], zero, l[g][i]);
        }
        scale[g] = select(degenerate[g], zero, scale[g]);
        neg_min[g] = neg(select(degenerate[g], min0[g], min[g]));
    }
    (l, scale, neg_min)
}

/// Signed value of largest magnitude per lane (the first on ties) and a mask of the lanes
/// whose magnitude is below GROUP_MAX_EPS.
#[inline(always)]
unsafe fn signed_absmax<const N: usize, const G: usize>(
    xt: &Lanes<N, G>,
) -> ([__m256; G], [__m256; G]) {
    use v::*;
    let zero = _mm256_setzero_ps();
    let (mut amax, mut max) = ([zero; G], [zero; G]);
    for i in 0..N {
        for g in 0..G {
            let ax = abs(xt[g][i]);
            let bigger = gt(ax, amax[g]);
            amax[g] = select(bigger, ax, amax[g]);
            max[g] = select(bigger, xt[g][i], max[g]);
        }
    }
    let mut all_zero = [zero; G];
    for g in 0..G {
        all_zero[g] = lt(amax[g], splat(GROUP_MAX_EPS));
    }
    (max, all_zero)
}

/// Lane version of make_qx_quants with rmse_type 1 and explicit weights `wt` (x² where ggml
/// passes none). Levels come back offset by +nmax, as ggml stores them.
#[inline(always)]
unsafe fn qx_lanes<const N: usize, const G: usize>(
    xt: &Lanes<N, G>,
    wt: &Lanes<N, G>,
    nmax: i32,
) -> (Lanes<N, G>, [__m256; G]) {
    use v::*;
    let zero = _mm256_setzero_ps();
    let nmaxf = nmax as f32;
    let (max, all_zero) = signed_absmax(xt);
    // w*x is the same for every candidate; ggml evaluates w*x*l as (w*x)*l.
    let mut wx = [[zero; N]; G];
    for g in 0..G {
        for i in 0..N {
            wx[g][i] = mul(wt[g][i], xt[g][i]);
        }
    }
    // The levels are a function of the scale, so keep each lane's chosen inverse scale and
    // compute the levels once at the end, as ggml recomputes them when a candidate wins.
    let mut chosen = [zero; G];
    let (mut sumlx, mut suml2) = ([zero; G], [zero; G]);
    let mut iscale = [zero; G];
    for g in 0..G {
        iscale[g] = div(splat(-nmaxf), max[g]);
        chosen[g] = iscale[g];
    }
    for i in 0..N {
        for g in 0..G {
            let q = _mm256_cvtepi32_ps(clamp(
                nearest_int(mul(iscale[g], xt[g][i])),
                -nmax,
                nmax - 1,
            ));
            sumlx[g] = add(sumlx[g], mul(wx[g][i], q));
            suml2[g] = add(suml2[g], mul(mul(wt[g][i], q), q));
        }
    }
    let mut scale = [zero; G];
    let mut best = [zero; G];
    for g in 0..G {
        let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(suml2[g], zero);
        scale[g] = select(nonzero, div(sumlx[g], suml2[g]), zero);
        best[g] = mul(scale[g], sumlx[g]);
    }
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let numerator = splat(-(nmaxf + 0.1f32 * is as f32));
        for g in 0..G {
            iscale[g] = div(numerator, max[g]);
            sumlx[g] = zero;
            suml2[g] = zero;
        }
        for i in 0..N {
            for g in 0..G {
                let q = _mm256_cvtepi32_ps(clamp(
                    nearest_int(mul(iscale[g], xt[g][i])),
                    -nmax,
                    nmax - 1,
                ));
                sumlx[g] = add(sumlx[g], mul(wx[g][i], q));
                suml2[g] = add(suml2[g], mul(mul(wt[g][i], q), q));
            }
        }
        for g in 0..G {
            let upd = _mm256_and_ps(
                gt(suml2[g], zero),
                gt(mul(sumlx[g], sumlx[g]), mul(best[g], suml2[g])),
            );
            let s = div(sumlx[g], suml2[g]);
            chosen[g] = select(upd, iscale[g], chosen[g]);
            scale[g] = select(upd, s, scale[g]);
            best[g] = select(upd, mul(s, sumlx[g]), best[g]);
        }
    }
    let off = splat(nmaxf);
    let mut l = [[zero; N]; G];
    for g in 0..G {
        for i in 0..N {
            let q = _mm256_cvtepi32_ps(clamp(
                nearest_int(mul(chosen[g], xt[g][i])),
                -nmax,
                nmax - 1,
            ));
            l[g][i] = select(all_zero[g], zero, add(q, off));
        }
        scale[g] = select(all_zero[g], zero, scale[g]);
    }
    (l, scale)
}

/// Lane version of make_q3_quants with do_rmse (weights x²). Levels offset by +nmax.
#[inline(always)]
unsafe fn q3_lanes<const N: usize, const G: usize>(
    xt: &Lanes<N, G>,
    nmax: i32,
) -> (Lanes<N, G>, [__m256; G]) {
    use v::*;
    let zero = _mm256_setzero_ps();
    let nmaxf = nmax as f32;
    let (max, all_zero) = signed_absmax(xt);
    let mut w = [[zero; N]; G];
    let mut wx = [[zero; N]; G];
    let mut l = [[zero; N]; G];
    let (mut sumlx, mut suml2) = ([zero; G], [zero; G]);
    let mut iscale = [zero; G];
    for g in 0..G {
        iscale[g] = div(splat(-nmaxf), max[g]);
    }
    for i in 0..N {
        for g in 0..G {
            let x = xt[g][i];
            let q = _mm256_cvtepi32_ps(clamp(nearest_int(mul(iscale[g], x)), -nmax, nmax - 1));
            l[g][i] = q;
            w[g][i] = mul(x, x);
            wx[g][i] = mul(w[g][i], x);
            sumlx[g] = add(sumlx[g], mul(wx[g][i], q));
            suml2[g] = add(suml2[g], mul(mul(w[g][i], q), q));
        }
    }
    for _ in 0..5 {
        let mut changed = zero;
        for i in 0..N {
            for g in 0..G {
                let li = l[g][i];
                let slx = sub(sumlx[g], mul(wx[g][i], li));
                let positive = gt(slx, zero);
                let sl2 = sub(suml2[g], mul(mul(w[g][i], li), li));
                let q = clamp(nearest_int(div(mul(xt[g][i], sl2), slx)), -nmax, nmax - 1);
                let new_l = _mm256_cvtepi32_ps(q);
                let differs = _mm256_cmp_ps::<_CMP_NEQ_UQ>(new_l, li);
                let slx2 = add(slx, mul(wx[g][i], new_l));
                let sl22 = add(sl2, mul(mul(w[g][i], new_l), new_l));
                let improves = _mm256_and_ps(
                    gt(sl22, zero),
                    gt(
                        mul(mul(slx2, slx2), suml2[g]),
                        mul(mul(sumlx[g], sumlx[g]), sl22),
                    ),
                );
                let accept = _mm256_and_ps(_mm256_and_ps(positive, differs), improves);
                l[g][i] = select(accept, new_l, li);
                sumlx[g] = select(accept, slx2, sumlx[g]);
                suml2[g] = select(accept, sl22, suml2[g]);
                changed = _mm256_or_ps(changed, accept);
            }
        }
        // A lane without changes would repeat the same pass unchanged, so running converged
        // lanes on with the others is harmless; stop once no lane changes.
        if !any(changed) {
            break;
        }
    }
    let off = splat(nmaxf);
    let mut scale = [zero; G];
    for g in 0..G {
        for i in 0..N {
            l[g][i] = select(all_zero[g], zero, add(l[g][i], off));
        }
        scale[g] = select(
            all_zero[g],
            zero,
            select(gt(suml2[g], zero), div(sumlx[g], suml2[g]), zero),
        );
    }
    (l, scale)
}

/// The search's levels of sub-block `j` (of a lane layout) in element order.
#[inline(always)]
pub(crate) unsafe fn sub_block_levels<const N: usize>(l: &[[__m256; N]], j: usize, out: &mut [u8]) {
    let p = l[j / 8].as_ptr() as *const f32;
    for (i, o) in out[..N].iter_mut().enumerate() {
        *o = *p.add(8 * i + j % 8) as u8;
    }
}

/// `G` groups of 8 consecutive `N`-element sub-blocks starting at `x`, in lane layout.
#[inline(always)]
unsafe fn load_lanes<const N: usize, const G: usize>(x: &[f32]) -> Lanes<N, G> {
    assert!(x.len() >= 8 * N * G);
    let mut out = [[_mm256_setzero_ps(); N]; G];
    for g in 0..G {
        out[g] = v::transpose::<N>(x.as_ptr().add(8 * N * g));
    }
    out
}

/// Per-lane sums of `wt` over the elements, stored to `sw` (8 per group).
#[inline(always)]
unsafe fn store_sums<const N: usize, const G: usize>(wt: &Lanes<N, G>, sw: &mut [f32]) {
    for g in 0..G {
        let mut s = _mm256_setzero_ps();
        for i in 0..N {
            s = v::add(s, wt[g][i]);
        }
        _mm256_storeu_ps(sw[8 * g..8 * g + 8].as_mut_ptr(), s);
    }
}

/// Importance weights qw*sqrt(sigma2 + x²) in lane layout, with group g's sigma2 = `sigma2[g]`.
#[inline(always)]
unsafe fn imatrix_weights<const N: usize, const G: usize>(
    xt: &Lanes<N, G>,
    qw: &[f32],
    sigma2: [f32; G],
) -> Lanes<N, G> {
    use v::*;
    let qt = load_lanes::<N, G>(qw);
    let mut wt = qt;
    for g in 0..G {
        let s2 = splat(sigma2[g]);
        for i in 0..N {
            wt[g][i] = mul(qt[g][i], _mm256_sqrt_ps(add(s2, mul(xt[g][i], xt[g][i]))));
        }
    }
    wt
}

/// Sub-block fits of one super-block in lane layout, with the floats the scale quantization needs.
pub(crate) struct LaneFits<const N: usize, const G: usize> {
    pub levels: Lanes<N, G>,
    pub scales: [f32; 16],
    pub mins: [f32; 16],
    pub sw: [f32; 16],
}

/// Q4_K/Q5_K sub-block fits of `G` consecutive super-blocks (group g = block g): without `qw`,
/// quantize_row_q4/5_K_ref's make_qkx2_quants with weights av_x + |x| and the given search
/// parameters; with `qw`, the _impl's make_qkx3_quants. Two blocks at once give the serial
/// reductions two independent chains.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q45k<const G: usize>(
    x: &[f32],
    qw: Option<&[f32]>,
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> LaneFits<32, G> {
    use v::*;
    assert!(G <= 2 && x.len() >= QK_K * G);
    let xt = load_lanes::<32, G>(x);
    let mut f = LaneFits {
        levels: xt,
        scales: [0.0; 16],
        mins: [0.0; 16],
        sw: [0.0; 16],
    };
    let (l, scale, neg_min) = match qw {
        None => {
            let mut wt = xt;
            for g in 0..G {
                let mut s = _mm256_setzero_ps();
                for i in 0..32 {
                    s = add(s, mul(xt[g][i], xt[g][i]));
                }
                let av_x = _mm256_sqrt_ps(div(s, splat(32.0)));
                for i in 0..32 {
                    wt[g][i] = add(av_x, abs(xt[g][i]));
                }
            }
            qkx_lanes(&xt, &wt, nmax, rmin, rdelta, nstep, false, false)
        }
        Some(qw) => {
            let sigma2: [f32; G] = std::array::from_fn(|g| {
                2.0 * sum_squares(&x[QK_K * g..QK_K * (g + 1)]) / QK_K as f32
            });
            let wt = imatrix_weights(&xt, qw, sigma2);
            store_sums(&wt, &mut f.sw);
            qkx_lanes(&xt, &wt, nmax, rmin, rdelta, nstep, false, true)
        }
    };
    f.levels = l;
    for g in 0..G {
        _mm256_storeu_ps(f.scales[8 * g..].as_mut_ptr(), scale[g]);
        _mm256_storeu_ps(f.mins[8 * g..].as_mut_ptr(), neg_min[g]);
    }
    f
}

/// Q2_K sub-block fits: make_qkx2_quants with |x| weights and absolute error, or with `qw` the
/// _impl's make_qkx3_quants.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q2k(x: &[f32], qw: Option<&[f32]>) -> LaneFits<16, 2> {
    use v::*;
    let xt = load_lanes::<16, 2>(x);
    let mut f = LaneFits {
        levels: xt,
        scales: [0.0; 16],
        mins: [0.0; 16],
        sw: [0.0; 16],
    };
    let (l, scale, neg_min) = match qw {
        None => {
            let mut wt = xt;
            for g in 0..2 {
                for i in 0..16 {
                    wt[g][i] = abs(xt[g][i]);
                }
            }
            qkx_lanes(&xt, &wt, 3, -0.5, 0.1, 15, true, false)
        }
        Some(qw) => {
            let s = sum_squares(&x[..QK_K]) / QK_K as f32;
            let wt = imatrix_weights(&xt, qw, [s, s]);
            store_sums(&wt, &mut f.sw);
            qkx_lanes(&xt, &wt, 3, -0.9, 0.05, 36, false, true)
        }
    };
    f.levels = l;
    for g in 0..2 {
        _mm256_storeu_ps(f.scales[8 * g..].as_mut_ptr(), scale[g]);
        _mm256_storeu_ps(f.mins[8 * g..].as_mut_ptr(), neg_min[g]);
    }
    f
}

/// Q3_K fits: without `qw`, make_q3_quants(nmax 4, do_rmse); with `qw`, weights
/// qw*sqrt(2σ² + x²) and make_qx_quants(nmax 4). Levels offset by +4.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q3k(x: &[f32], qw: Option<&[f32]>) -> LaneFits<16, 2> {
    let xt = load_lanes::<16, 2>(x);
    let mut f = LaneFits {
        levels: xt,
        scales: [0.0; 16],
        mins: [0.0; 16],
        sw: [0.0; 16],
    };
    let (l, scale) = match qw {
        None => q3_lanes(&xt, 4),
        Some(qw) => {
            let s = 2.0 * sum_squares(&x[..QK_K]) / QK_K as f32;
            let wt = imatrix_weights(&xt, qw, [s, s]);
            store_sums(&wt, &mut f.sw);
            qx_lanes(&xt, &wt, 4)
        }
    };
    f.levels = l;
    for g in 0..2 {
        _mm256_storeu_ps(f.scales[8 * g..].as_mut_ptr(), scale[g]);
    }
    f
}

/// Q3_K no-imatrix fits of two consecutive super-blocks at once: four lane groups double the
/// independent work in make_q3_quants' serial descent. Returns the levels (groups 2b, 2b+1 for
/// block b) and the 32 scales.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q3k_pair(x: &[f32]) -> (Lanes<16, 4>, [f32; 32]) {
    let xt = load_lanes::<16, 4>(x);
    let (l, scale) = q3_lanes(&xt, 4);
    let mut scales = [0f32; 32];
    for g in 0..4 {
        _mm256_storeu_ps(scales[8 * g..].as_mut_ptr(), scale[g]);
    }
    (l, scales)
}

/// Q6_K fits: make_qx_quants(nmax 32, rmse_type 1) with weights x², or the raw `qw`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fit_q6k(x: &[f32], qw: Option<&[f32]>) -> LaneFits<16, 2> {
    use v::*;
    let xt = load_lanes::<16, 2>(x);
    let mut f = LaneFits {
        levels: xt,
        scales: [0.0; 16],
        mins: [0.0; 16],
        sw: [0.0; 16],
    };
    let wt = match qw {
        Some(qw) => load_lanes::<16, 2>(qw),
        None => {
            let mut wt = xt;
            for g in 0..2 {
                for i in 0..16 {
                    wt[g][i] = mul(xt[g][i], xt[g][i]);
                }
            }
            wt
        }
    };
    let (l, scale) = qx_lanes(&xt, &wt, 32);
    f.levels = l;
    for g in 0..2 {
        _mm256_storeu_ps(f.scales[8 * g..].as_mut_ptr(), scale[g]);
    }
    f
}

/// Final levels of `n` (a multiple of 8) elements: nearest_int((x + m)/d) clamped to [lo, hi],
/// stored minus `lo` (the offset ggml adds). With m = 0 this is ggml's x/d exactly (x + 0 only
/// turns -0 into +0, which rounds the same).
#[inline(always)]
pub(crate) unsafe fn requantize(x: &[f32], m: f32, d: f32, lo: i32, hi: i32, out: &mut [u8]) {
    use v::*;
    assert!(out.len() >= x.len() && x.len().is_multiple_of(8));
    let (mv, dv) = (splat(m), splat(d));
    for k in 0..x.len() / 8 {
        let xv = _mm256_loadu_ps(x.as_ptr().add(8 * k));
        let q = clamp(nearest_int(div(add(xv, mv), dv)), lo, hi);
        store_u8x8(
            _mm256_sub_epi32(q, _mm256_set1_epi32(lo)),
            out.as_mut_ptr().add(8 * k),
        );
    }
}

/// Q4_K/Q5_K final levels: requantized where the stored scale is non-zero, else the search's.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn levels_k4(
    x: &[f32],
    fit: &[[__m256; 32]],
    scales: &[u8],
    d: f32,
    dmin: f32,
    nmax: i32,
    levels: &mut [u8; QK_K],
) {
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let dj = d * sc as f32;
        let out = &mut levels[32 * j..32 * j + 32];
        if dj == 0.0 {
            sub_block_levels(fit, j, out);
        } else {
            requantize(&x[32 * j..32 * j + 32], dmin * m as f32, dj, 0, nmax, out);
        }
    }
}

/// Final levels of the 16-element sub-block types given each sub-block's (d, m): requantized
/// where d != 0, else the search's levels.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn levels_16(
    x: &[f32],
    fit: &[[__m256; 16]],
    dm: &[(f32, f32); 16],
    lo: i32,
    hi: i32,
    levels: &mut [u8; QK_K],
) {
    for j in 0..16 {
        let (dj, m) = dm[j];
        let out = &mut levels[16 * j..16 * j + 16];
        if dj == 0.0 {
            sub_block_levels(fit, j, out);
        } else {
            requantize(&x[16 * j..16 * j + 16], m, dj, lo, hi, out);
        }
    }
}

/// Packs 2-bit levels as Q2_K/Q3_K store them (see `pack_2bit`).
#[inline(always)]
unsafe fn pack_2bit(levels: &[u8; QK_K], qs: &mut [u8]) {
    assert!(qs.len() >= 64);
    let p = levels.as_ptr();
    for h in 0..2 {
        let a = _mm256_loadu_si256(p.add(128 * h) as *const __m256i);
        let b = _mm256_loadu_si256(p.add(128 * h + 32) as *const __m256i);
        let c = _mm256_loadu_si256(p.add(128 * h + 64) as *const __m256i);
        let d = _mm256_loadu_si256(p.add(128 * h + 96) as *const __m256i);
        // Levels are < 4, so 16-bit shifts cannot carry bits across bytes.
        let r = _mm256_or_si256(
            _mm256_or_si256(a, _mm256_slli_epi16(b, 2)),
            _mm256_or_si256(_mm256_slli_epi16(c, 4), _mm256_slli_epi16(d, 6)),
        );
        _mm256_storeu_si256(qs.as_mut_ptr().add(32 * h) as *mut __m256i, r);
    }
}

/// Q2_K levels (0..3) into qs[64].
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_q2(levels: &[u8; QK_K], qs: &mut [u8]) {
    pack_2bit(levels, qs);
}

/// Q3_K levels (0..7): high bits into hmask[32] (bit h of byte m for element 32h+m), low two
/// bits into qs[64].
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_q3(levels: &[u8; QK_K], hmask: &mut [u8], qs: &mut [u8]) {
    assert!(hmask.len() >= 32);
    let one = _mm256_set1_epi8(1);
    let three = _mm256_set1_epi8(3);
    let mut hm = _mm256_setzero_si256();
    let mut low = [0u8; QK_K];
    for h in 0..8 {
        let v = _mm256_loadu_si256(levels.as_ptr().add(32 * h) as *const __m256i);
        let bit = _mm256_and_si256(_mm256_srli_epi16(v, 2), one);
        hm = _mm256_or_si256(hm, _mm256_sll_epi16(bit, _mm_cvtsi32_si128(h as i32)));
        _mm256_storeu_si256(
            low.as_mut_ptr().add(32 * h) as *mut __m256i,
            _mm256_and_si256(v, three),
        );
    }
    _mm256_storeu_si256(hmask.as_mut_ptr() as *mut __m256i, hm);
    pack_2bit(&low, qs);
}

/// Q4_K levels (0..15) into qs[128]: byte l of 32-byte group h holds elements 64h+l and 64h+l+32.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_q4(levels: &[u8; QK_K], qs: &mut [u8]) {
    assert!(qs.len() >= 128);
    for h in 0..4 {
        let a = _mm256_loadu_si256(levels.as_ptr().add(64 * h) as *const __m256i);
        let b = _mm256_loadu_si256(levels.as_ptr().add(64 * h + 32) as *const __m256i);
        let r = _mm256_or_si256(a, _mm256_slli_epi16(b, 4));
        _mm256_storeu_si256(qs.as_mut_ptr().add(32 * h) as *mut __m256i, r);
    }
}

/// Q5_K levels (0..31): fifth bits into qh[32], low nibbles into qs[128] as Q4_K.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_q5(levels: &[u8; QK_K], qh: &mut [u8], qs: &mut [u8]) {
    assert!(qh.len() >= 32 && qs.len() >= 128);
    let one = _mm256_set1_epi8(1);
    let low4 = _mm256_set1_epi8(0xF);
    let mut hm = _mm256_setzero_si256();
    for h in 0..4 {
        let a = _mm256_loadu_si256(levels.as_ptr().add(64 * h) as *const __m256i);
        let b = _mm256_loadu_si256(levels.as_ptr().add(64 * h + 32) as *const __m256i);
        let r = _mm256_or_si256(
            _mm256_and_si256(a, low4),
            _mm256_slli_epi16(_mm256_and_si256(b, low4), 4),
        );
        _mm256_storeu_si256(qs.as_mut_ptr().add(32 * h) as *mut __m256i, r);
        let ha = _mm256_and_si256(_mm256_srli_epi16(a, 4), one);
        let hb = _mm256_and_si256(_mm256_srli_epi16(b, 4), one);
        hm = _mm256_or_si256(hm, _mm256_sll_epi16(ha, _mm_cvtsi32_si128(2 * h as i32)));
        hm = _mm256_or_si256(
            hm,
            _mm256_sll_epi16(hb, _mm_cvtsi32_si128(2 * h as i32 + 1)),
        );
    }
    _mm256_storeu_si256(qh.as_mut_ptr() as *mut __m256i, hm);
}

/// Q6_K levels (0..63) into ql[128] and qh[64] (see q6_k's module docs).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_q6(levels: &[u8; QK_K], ql: &mut [u8], qh: &mut [u8]) {
    assert!(ql.len() >= 128 && qh.len() >= 64);
    let low4 = _mm256_set1_epi8(0xF);
    let three = _mm256_set1_epi8(3);
    for h in 0..2 {
        let p = levels.as_ptr().add(128 * h);
        let a = _mm256_loadu_si256(p as *const __m256i);
        let b = _mm256_loadu_si256(p.add(32) as *const __m256i);
        let c = _mm256_loadu_si256(p.add(64) as *const __m256i);
        let e = _mm256_loadu_si256(p.add(96) as *const __m256i);
        let q0 = _mm256_or_si256(
            _mm256_and_si256(a, low4),
            _mm256_slli_epi16(_mm256_and_si256(c, low4), 4),
        );
        let q1 = _mm256_or_si256(
            _mm256_and_si256(b, low4),
            _mm256_slli_epi16(_mm256_and_si256(e, low4), 4),
        );
        // Top two bits of each 6-bit level; levels < 64, so 16-bit shifts stay within bytes.
        let ha = _mm256_and_si256(_mm256_srli_epi16(a, 4), three);
        let hb = _mm256_and_si256(_mm256_srli_epi16(b, 4), three);
        let hc = _mm256_and_si256(_mm256_srli_epi16(c, 4), three);
        let he = _mm256_and_si256(_mm256_srli_epi16(e, 4), three);
        let qhv = _mm256_or_si256(
            _mm256_or_si256(ha, _mm256_slli_epi16(hb, 2)),
            _mm256_or_si256(_mm256_slli_epi16(hc, 4), _mm256_slli_epi16(he, 6)),
        );
        _mm256_storeu_si256(ql.as_mut_ptr().add(64 * h) as *mut __m256i, q0);
        _mm256_storeu_si256(ql.as_mut_ptr().add(64 * h + 32) as *mut __m256i, q1);
        _mm256_storeu_si256(qh.as_mut_ptr().add(32 * h) as *mut __m256i, qhv);
    }
}

/// make_qx_quants(nmax, x, L, rmse_type 1, Some(qw)) for one short group (Q3_K's 16 sub-block
/// scales) with its 19 candidate scales in lanes: each lane sums over the elements in ggml's
/// order, then the candidates are compared in ggml's order with ggml's test, so the chosen scale
/// and levels are the scalar function's.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn qx_quants_weighted(nmax: i32, x: &[f32], l: &mut [i8], qw: &[f32]) -> f32 {
    use v::*;
    let n = x.len();
    assert!(l.len() >= n && qw.len() >= n);
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    // Lane 0: ggml's first guess; lanes 1..19: is = -9..=9 without 0; the rest repeat lane 0.
    let mut iscales = [-nmaxf / max; 24];
    for (k, is) in (-9i32..=9).filter(|is| *is != 0).enumerate() {
        iscales[k + 1] = -(nmaxf + 0.1f32 * is as f32) / max;
    }
    let zero = _mm256_setzero_ps();
    let mut isv = [zero; 3];
    for g in 0..3 {
        isv[g] = _mm256_loadu_ps(iscales[8 * g..].as_ptr());
    }
    let (mut sumlx, mut suml2) = ([zero; 3], [zero; 3]);
    for i in 0..n {
        let (xv, wv) = (splat(x[i]), splat(qw[i]));
        let wx = mul(wv, xv);
        for g in 0..3 {
            let q = _mm256_cvtepi32_ps(clamp(nearest_int(mul(isv[g], xv)), -nmax, nmax - 1));
            sumlx[g] = add(sumlx[g], mul(wx, q));
            suml2[g] = add(suml2[g], mul(mul(wv, q), q));
        }
    }
    let (mut slx, mut sl2) = ([0f32; 24], [0f32; 24]);
    for g in 0..3 {
        _mm256_storeu_ps(slx[8 * g..].as_mut_ptr(), sumlx[g]);
        _mm256_storeu_ps(sl2[8 * g..].as_mut_ptr(), suml2[g]);
    }
    let mut chosen = 0;
    let mut scale = if sl2[0] != 0.0 { slx[0] / sl2[0] } else { 0.0 };
    let mut best = scale * slx[0];
    for k in 1..19 {
        if sl2[k] > 0.0 && slx[k] * slx[k] > best * sl2[k] {
            scale = slx[k] / sl2[k];
            best = scale * slx[k];
            chosen = k;
        }
    }
    let iscale = iscales[chosen];
    for i in 0..n {
        l[i] = (nmax + crate::quant::util::nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1)) as i8;
    }
    scale
}
