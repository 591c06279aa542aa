//! Numeric helpers shared by the k-quants and the imatrix paths of the legacy types, following
//! the static helpers of ggml's `ggml-quants.c` operation by operation (same evaluation order,
//! no fused multiply-add), so that the bytes they lead to are ggml's.
//!
//! Conventions: `l` arrays hold the chosen integer levels; where ggml returns a scale and writes a
//! min through a pointer, these return `(scale, min)`.

// Index loops over several parallel arrays mirror ggml's loops and keep the evaluation order visible.
#![allow(clippy::needless_range_loop)]

/// Groups whose largest magnitude is below this are treated as all zero (ggml's `GROUP_MAX_EPS`).
pub const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: adding 1.5 * 2^23 leaves the rounded integer in the low mantissa bits
/// (round half to even). Valid for |x| <= 4194303; outside that range, and for Inf/NaN, it returns
/// the same deterministic garbage as ggml, which callers then clamp.
#[inline(always)]
pub fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0f32;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The per-element weight `make_qx_quants` uses when no importance weights are given.
#[inline(always)]
fn rmse_weight(rmse_type: i32, x: f32) -> f32 {
    match rmse_type {
        1 => x * x,
        2 => 1.0,
        3 => x.abs(),
        _ => x.abs().sqrt(),
    }
}

/// Index and value of the element of largest magnitude (the first one on ties).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (amax, max)
}

/// ggml's `make_qx_quants`: symmetric quantization of `x` to levels in [-nmax, nmax-1], stored in
/// `l` offset by +nmax. `rmse_type` 0: plain rounding; negative: one least-squares step, returning
/// the average of the two scales; positive: least squares plus a search over 18 nearby scales.
/// `qw` replaces the rmse_type-derived weights when given. Returns the scale.
pub fn make_qx_quants(
    nmax: i32,
    x: &[f32],
    l: &mut [i8],
    mut rmse_type: i32,
    qw: Option<&[f32]>,
) -> f32 {
    let n = x.len();
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let clamp = |v: i32| v.clamp(-nmax, nmax - 1);
    if rmse_type == 0 {
        for (q, &v) in l.iter_mut().zip(x) {
            *q = (nmax + clamp(nearest_int(iscale * v))) as i8;
        }
        return 1.0 / iscale;
    }
    let return_early = rmse_type < 0;
    if return_early {
        rmse_type = -rmse_type;
    }
    let weight = |i: usize| match qw {
        Some(w) => w[i],
        None => rmse_weight(rmse_type, x[i]),
    };
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = clamp(nearest_int(iscale * x[i]));
        l[i] = (q + nmax) as i8;
        let w = weight(i);
        let qf = q as f32;
        sumlx += w * x[i] * qf;
        suml2 += w * qf * qf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    if return_early {
        return if suml2 > 0.0 {
            0.5 * (scale + 1.0 / iscale)
        } else {
            1.0 / iscale
        };
    }
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1f32 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let qf = clamp(nearest_int(iscale * x[i])) as f32;
            let w = weight(i);
            sumlx += w * x[i] * qf;
            suml2 += w * qf * qf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                l[i] = (nmax + clamp(nearest_int(iscale * x[i]))) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants`: symmetric levels in [-nmax, nmax-1] (stored +nmax) weighted by x²;
/// with `do_rmse`, coordinate descent on single levels for up to 5 passes. Returns the scale.
pub fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8], do_rmse: bool) -> f32 {
    let n = x.len();
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let clamp = |v: i32| v.clamp(-nmax, nmax - 1);
    if do_rmse {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for i in 0..n {
            let q = clamp(nearest_int(iscale * x[i]));
            l[i] = q as i8;
            let w = x[i] * x[i];
            sumlx += w * x[i] * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        for _ in 0..5 {
            let mut n_changed = 0;
            for i in 0..n {
                let w = x[i] * x[i];
                let li = l[i] as f32;
                let mut slx = sumlx - w * x[i] * li;
                if slx > 0.0 {
                    let mut sl2 = suml2 - w * li * li;
                    let new_l = clamp(nearest_int(x[i] * sl2 / slx));
                    if new_l != l[i] as i32 {
                        let nl = new_l as f32;
                        slx += w * x[i] * nl;
                        sl2 += w * nl * nl;
                        if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                            l[i] = new_l as i8;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed += 1;
                        }
                    }
                }
            }
            if n_changed == 0 {
                break;
            }
        }
        for q in l[..n].iter_mut() {
            *q += nmax as i8;
        }
        return if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    }
    for (q, &v) in l.iter_mut().zip(x) {
        *q = (clamp(nearest_int(iscale * v)) + nmax) as i8;
    }
    1.0 / iscale
}

/// ggml's `make_qkx2_quants`: asymmetric levels in [0, nmax] with a min <= 0, fitted by weighted
/// least squares over `nstep + 1` candidate scales `(rmin + rdelta*is + nmax) / (max - min)`.
/// `use_mad` minimises weighted absolute instead of squared error. `laux` is scratch of x's
/// length. Returns `(scale, -min)`, as ggml returns the scale and stores `-min`.
#[allow(clippy::too_many_arguments)]
pub fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let qf = q as f32;
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qkx3_quants`: as `make_qkx2_quants`, but weights default to x² and the level
/// computation is guarded against the non-finite values a degenerate min can produce.
#[allow(clippy::too_many_arguments)]
pub fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let weight = |i: usize| match weights {
        Some(w) => w[i],
        None => x[i] * x[i],
    };
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weight(0);
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weight(i);
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut best_mad = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_mad += weight(i) * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let v = iscale * (x[i] - min);
            let q = if v > 0.0 {
                nearest_int(if v < nmaxf { v } else { nmaxf })
            } else {
                0
            };
            laux[i] = q as u8;
            let w = weight(i);
            let qf = q as f32;
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += weight(i) * err(diff);
            }
            if mad < best_mad {
                l[..n].copy_from_slice(&laux[..n]);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants`: quantizes non-negative `x` (sub-block scales or mins) to levels in
/// [0, nmax] with importance weights: a search over 8 nearby scales, then coordinate descent.
/// Returns the scale.
pub fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], quant_weights: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    for &v in x {
        // C's MAX(max, v): `max > v ? max : v`
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / max;
    for i in 0..n {
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += quant_weights[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1f32 * is as f32 + nmaxf) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..n {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += quant_weights[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).min(nmax);
        l[i] = q as u8;
        let w = quant_weights[i];
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = quant_weights[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::{gaussian, importance};

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(3.49), 3);
        assert_eq!(nearest_int(-7.51), -8);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(nearest_int(-4_194_303.0), -4_194_303);
        // Out of range: ggml's deterministic result, which callers clamp.
        assert_eq!(nearest_int(f32::INFINITY), -0x40_0000);
        assert_eq!(nearest_int(f32::NAN), 0);
    }

    fn dequant_err(x: &[f32], scale: f32, levels: &[i32]) -> f32 {
        x.iter()
            .zip(levels)
            .map(|(v, q)| (v - scale * *q as f32).powi(2))
            .sum::<f32>()
    }

    #[test]
    fn qx_quants_fit_and_search_beats_plain_rounding() {
        let x = gaussian(1, 16);
        let mut l0 = [0i8; 16];
        let mut l1 = [0i8; 16];
        let s0 = make_qx_quants(4, &x, &mut l0, 0, None);
        let s1 = make_qx_quants(4, &x, &mut l1, 1, None);
        let w: Vec<f32> = x.iter().map(|v| v * v).collect();
        let err = |s: f32, l: &[i8]| {
            x.iter()
                .zip(l)
                .zip(&w)
                .map(|((v, q), w)| w * (v - s * (*q as f32 - 4.0)).powi(2))
                .sum::<f32>()
        };
        assert!(l0.iter().chain(&l1).all(|q| (0..8).contains(q)));
        assert!(
            err(s1, &l1) <= err(s0, &l0) * 1.0001,
            "{} > {}",
            err(s1, &l1),
            err(s0, &l0)
        );
        // All-zero input gives zero scale and levels.
        assert_eq!(make_qx_quants(32, &[0.0; 16], &mut l1, 1, None), 0.0);
        assert!(l1.iter().all(|q| *q == 0));
        // Explicit weights are used instead of rmse_type's.
        let qw = importance(3, 16);
        let sw = make_qx_quants(32, &x, &mut l1, 1, Some(&qw));
        assert!(sw.is_finite() && sw != 0.0);
        // rmse_type < 0 returns early with the average of the two scale estimates.
        let se = make_qx_quants(4, &x, &mut l1, -1, None);
        assert!(se.is_finite() && se != 0.0);
    }

    #[test]
    fn q3_quants_descent_does_not_increase_error() {
        for seed in 0..20 {
            let x = gaussian(seed, 16);
            let mut a = [0i8; 16];
            let mut b = [0i8; 16];
            let sa = make_q3_quants(4, &x, &mut a, false);
            let sb = make_q3_quants(4, &x, &mut b, true);
            let la: Vec<i32> = a.iter().map(|q| *q as i32 - 4).collect();
            let lb: Vec<i32> = b.iter().map(|q| *q as i32 - 4).collect();
            assert!(la.iter().chain(&lb).all(|q| (-4..4).contains(q)));
            // x²-weighted error: descent only accepts improvements of the weighted fit.
            let werr = |s: f32, l: &[i32]| {
                x.iter()
                    .zip(l)
                    .map(|(v, q)| v * v * (v - s * *q as f32).powi(2))
                    .sum::<f32>()
            };
            assert!(
                werr(sb, &lb) <= werr(sa, &la) * 1.0001 + 1e-12,
                "seed {seed}"
            );
            assert!(dequant_err(&x, sb, &lb).is_finite());
        }
    }

    #[test]
    fn qkx_quants_stay_in_range_and_fit() {
        for seed in 0..20 {
            let x = gaussian(100 + seed, 32);
            let w: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let mut l = [0u8; 32];
            let mut aux = [0u8; 32];
            let (s2, m2) = make_qkx2_quants(15, &x, &w, &mut l, &mut aux, -1.0, 0.1, 20, false);
            assert!(l.iter().all(|q| *q <= 15) && s2 > 0.0 && m2 >= 0.0);
            let err2: f32 = x
                .iter()
                .zip(&l)
                .map(|(v, q)| (s2 * *q as f32 - m2 - v).powi(2))
                .sum();
            let (s3, m3) =
                make_qkx3_quants(15, &x, Some(&w), &mut l, &mut aux, -0.9, 0.05, 36, false);
            assert!(l.iter().all(|q| *q <= 15) && s3 > 0.0 && m3 >= 0.0);
            let err3: f32 = x
                .iter()
                .zip(&l)
                .map(|(v, q)| (s3 * *q as f32 - m3 - v).powi(2))
                .sum();
            // Both fits should be far better than the span/15 step would suggest for a bad fit.
            let span = x.iter().cloned().fold(f32::MIN, f32::max)
                - x.iter().cloned().fold(f32::MAX, f32::min);
            let bound = 32.0 * (span / 15.0).powi(2);
            assert!(
                err2 < bound && err3 < bound,
                "seed {seed}: {err2} {err3} {bound}"
            );
        }
        // Constant non-negative input: min clamps to 0 and the fit is exact.
        let mut l = [0u8; 16];
        let mut aux = [0u8; 16];
        let (s, m) = make_qkx2_quants(
            3, &[0.0; 16], &[1.0; 16], &mut l, &mut aux, -0.5, 0.1, 15, true,
        );
        assert_eq!((s, m), (0.0, 0.0));
        let (s, m) = make_qkx3_quants(
            3,
            &[-2.0; 16],
            None,
            &mut l,
            &mut aux,
            -0.9,
            0.05,
            36,
            false,
        );
        assert!(s.is_finite() && m.is_finite());
    }

    #[test]
    fn qp_quants_fit_positive_scales() {
        let x: Vec<f32> = importance(7, 16).iter().map(|v| v * 0.01).collect();
        let w = importance(8, 16);
        let mut l = [0u8; 16];
        let s = make_qp_quants(15, &x, &mut l, &w);
        assert!(s > 0.0 && l.iter().all(|q| *q <= 15));
        let mut l = [9u8; 8];
        assert_eq!(make_qp_quants(63, &[0.0; 8], &mut l, &[1.0; 8]), 0.0);
        assert!(l.iter().all(|q| *q == 0));
    }
}
