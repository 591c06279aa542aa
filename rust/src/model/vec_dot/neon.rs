//! aarch64 NEON versions of the Q8_0 kernels and of the Q8_0 / Q8_1 activation quantizers.
//!
//! Every function returns the portable kernel's exact bits. `vec_dot_q8_0_scalar` keeps 8 float
//! lanes, lane l adding d·(Σ of products 4l..4l+4) by a fused multiply-add, then `ops::reduce8`;
//! here lanes 0..4 and 4..8 are two float32x4 accumulators fed by `vfmaq_f32`, and `reduce8`'s
//! pairing (lo + hi, then (0 + 2) + (1 + 3)) ends the sum. The integer lane sums come from SDOT
//! where the CPU has the dotprod extension, from widening multiplies otherwise; both are exact.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{BLOCK, PREFETCH_AHEAD, QK};
use crate::quant::cpu;

/// Σ of each 4 adjacent int8 products of `a` and `b`, exactly (SDOT; `vdotq_s32` is unstable).
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(crate) fn quads_sdot(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut r = vdupq_n_s32(0);
    // SAFETY: SDOT only reads and writes the named registers; dotprod is enabled on this fn.
    unsafe {
        asm!(
            "sdot {r:v}.4s, {a:v}.16b, {b:v}.16b",
            r = inout(vreg) r,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    r
}

/// The same sums with widening multiplies (any int8 product fits i16: 128·128 = 2^14).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn quads_mull(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    let hi = vpaddlq_s16(vmull_high_s8(a, b));
    vpaddq_s32(lo, hi)
}

/// Four little-endian f16 values to f32 (FCVTL is base Advanced SIMD; the f16 intrinsics and
/// types are unstable). Exact, like `half`'s conversion.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn f16x4_to_f32(bits: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: FCVTL only reads and writes the named registers.
    unsafe {
        asm!(
            "fcvtl {o:v}.4s, {i:v}.4h",
            o = lateout(vreg) out,
            i = in(vreg) bits,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// The f16 scale stored at `p` (two bytes, little endian), as f32.
///
/// Safety: p..p+2 must be readable.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    vgetq_lane_f32::<0>(f16x4_to_f32(vdup_n_u16(bits)))
}

/// Hints the cache line `PREFETCH_AHEAD` bytes past `p` into L1 (a prefetch cannot fault).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn prefetch_ahead(p: *const u8) {
    prefetch_at(p, PREFETCH_AHEAD)
}

/// Hints the cache line `ahead` bytes past `p` into L1 (the 4-row kernels: `rows4_prefetch_ahead`).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn prefetch_at(p: *const u8, ahead: usize) {
    let q = p.wrapping_add(ahead);
    // SAFETY: PRFM is only a hint; it never faults or writes memory.
    unsafe {
        asm!("prfm pldl1keep, [{q}]", q = in(reg) q, options(nostack, readonly, preserves_flags))
    };
}

/// `ops::reduce8` of lanes lo = 0..4, hi = 4..8: (0+4, 1+5, 2+6, 3+7), then (0+2) + (1+3).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn reduce8(lo: float32x4_t, hi: float32x4_t) -> f32 {
    let q = vaddq_f32(lo, hi);
    let p = vadd_f32(vget_low_f32(q), vget_high_f32(q));
    vget_lane_f32::<0>(p) + vget_lane_f32::<1>(p)
}

/// The Q8_0 kernels for one way of forming the integer lane sums (`$quads`).
macro_rules! q8_0_kernels {
    ($features:literal, $quads:ident, $dot:ident, $x4:ident, $rows4:ident) => {
        /// One weight row against one activation row (`vec_dot_q8_0_scalar`'s bits).
        #[target_feature(enable = $features)]
        pub(crate) fn $dot(w: &[u8], a: &[u8]) -> f32 {
            let n = w.len().min(a.len()) / BLOCK;
            let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            for b in 0..n {
                let (wb, ab) = (
                    &w[b * BLOCK..(b + 1) * BLOCK],
                    &a[b * BLOCK..(b + 1) * BLOCK],
                );
                // SAFETY: both blocks hold 34 bytes: 2 of scale, then 32 levels.
                unsafe {
                    let d = vdupq_n_f32(f16_at(wb.as_ptr()) * f16_at(ab.as_ptr()));
                    let (qw, qa) = (
                        wb.as_ptr().add(2) as *const i8,
                        ab.as_ptr().add(2) as *const i8,
                    );
                    let s0 = $quads(vld1q_s8(qw), vld1q_s8(qa));
                    let s1 = $quads(vld1q_s8(qw.add(16)), vld1q_s8(qa.add(16)));
                    lo = vfmaq_f32(lo, d, vcvtq_f32_s32(s0));
                    hi = vfmaq_f32(hi, d, vcvtq_f32_s32(s1));
                }
            }
            reduce8(lo, hi)
        }

        /// One weight row against four activation rows, the weight block loaded once.
        #[target_feature(enable = $features)]
        pub(crate) fn $x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let n = w.len() / BLOCK;
            assert!(
                a.iter().all(|ai| ai.len() >= n * BLOCK),
                "activation row too short"
            );
            let mut acc = [[vdupq_n_f32(0.0); 2]; 4];
            for b in 0..n {
                // SAFETY: block b lies inside w and every activation row (asserted above).
                unsafe {
                    let wb = w.as_ptr().add(b * BLOCK);
                    let dw = f16_at(wb);
                    let qw = [
                        vld1q_s8(wb.add(2) as *const i8),
                        vld1q_s8(wb.add(18) as *const i8),
                    ];
                    for (j, aj) in a.iter().enumerate() {
                        let ab = aj.as_ptr().add(b * BLOCK);
                        let d = vdupq_n_f32(dw * f16_at(ab));
                        let s0 = $quads(qw[0], vld1q_s8(ab.add(2) as *const i8));
                        let s1 = $quads(qw[1], vld1q_s8(ab.add(18) as *const i8));
                        acc[j][0] = vfmaq_f32(acc[j][0], d, vcvtq_f32_s32(s0));
                        acc[j][1] = vfmaq_f32(acc[j][1], d, vcvtq_f32_s32(s1));
                    }
                }
            }
            acc.map(|[lo, hi]| reduce8(lo, hi))
        }

        /// Four weight rows against one activation row (generation), each row bit-identical to
        /// the one-row kernel; the activation block is loaded once, the rows prefetched.
        #[target_feature(enable = $features)]
        pub(crate) fn $rows4(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
            let n = a.len() / BLOCK;
            assert!(
                w.iter().all(|wi| wi.len() >= n * BLOCK),
                "weight row too short"
            );
            let mut acc = [[vdupq_n_f32(0.0); 2]; 4];
            let ahead = super::rows4_prefetch_ahead(w[0].len());
            for b in 0..n {
                // SAFETY: block b lies inside a and every weight row (asserted above).
                unsafe {
                    let ab = a.as_ptr().add(b * BLOCK);
                    let da = f16_at(ab);
                    let qa = [
                        vld1q_s8(ab.add(2) as *const i8),
                        vld1q_s8(ab.add(18) as *const i8),
                    ];
                    for (r, wr) in w.iter().enumerate() {
                        let wb = wr.as_ptr().add(b * BLOCK);
                        prefetch_at(wb, ahead);
                        let d = vdupq_n_f32(f16_at(wb) * da);
                        let s0 = $quads(vld1q_s8(wb.add(2) as *const i8), qa[0]);
                        let s1 = $quads(vld1q_s8(wb.add(18) as *const i8), qa[1]);
                        acc[r][0] = vfmaq_f32(acc[r][0], d, vcvtq_f32_s32(s0));
                        acc[r][1] = vfmaq_f32(acc[r][1], d, vcvtq_f32_s32(s1));
                    }
                }
            }
            acc.map(|[lo, hi]| reduce8(lo, hi))
        }
    };
}

q8_0_kernels!("neon,dotprod", quads_sdot, dot_sdot, x4_sdot, rows4_sdot);
q8_0_kernels!("neon", quads_mull, dot_mull, x4_mull, rows4_mull);

// Entry points: the SDOT kernels where the CPU has dotprod (checked once, cached).

/// Safety: the CPU must have NEON.
#[target_feature(enable = "neon")]
pub unsafe fn vec_dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    if cpu::arm_features().dotprod {
        // SAFETY: dotprod was detected at run time.
        unsafe { dot_sdot(w, a) }
    } else {
        dot_mull(w, a)
    }
}

/// Safety: the CPU must have NEON.
#[target_feature(enable = "neon")]
pub unsafe fn vec_dot_q8_0_x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    if cpu::arm_features().dotprod {
        // SAFETY: dotprod was detected at run time.
        unsafe { x4_sdot(w, a) }
    } else {
        x4_mull(w, a)
    }
}

/// Safety: the CPU must have NEON.
#[target_feature(enable = "neon")]
pub unsafe fn vec_dot_q8_0_4rows(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
    if cpu::arm_features().dotprod {
        // SAFETY: dotprod was detected at run time.
        unsafe { rows4_sdot(w, a) }
    } else {
        rows4_mull(w, a)
    }
}

/// Q8_0 (or, with `with_sum`, Q8_1) activation blocks, byte for byte the portable quantizer's:
/// amax, d = amax/127, q = round-half-even(x·127/amax) with Rust's saturating float → int8
/// cast (FCVTNS then two saturating narrows), d and s = d·Σq stored as f16 by `half`.
///
/// Safety: the CPU must have NEON.
#[target_feature(enable = "neon")]
pub unsafe fn quantize_act_q8(x: &[f32], out: &mut [u8], with_sum: bool) {
    let bytes = if with_sum { super::Q8_1_BLOCK } else { BLOCK };
    let off = bytes - QK;
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(bytes)) {
        // SAFETY: xb holds 32 f32, ob `bytes` bytes of which the last 32 are the levels.
        unsafe {
            let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(xb.as_ptr().add(4 * i)));
            let m01 = vmaxq_f32(vabsq_f32(v[0]), vabsq_f32(v[1]));
            let m23 = vmaxq_f32(vabsq_f32(v[2]), vabsq_f32(v[3]));
            let m45 = vmaxq_f32(vabsq_f32(v[4]), vabsq_f32(v[5]));
            let m67 = vmaxq_f32(vabsq_f32(v[6]), vabsq_f32(v[7]));
            let mut amax = vmaxvq_f32(vmaxq_f32(vmaxq_f32(m01, m23), vmaxq_f32(m45, m67)));
            if amax.is_nan() {
                // FMAX propagates NaN where f32::max skips it: take the portable fold instead
                amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            }
            let d = amax / 127.0;
            let id = vdupq_n_f32(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q32 = v.map(|vi| vcvtnq_s32_f32(vmulq_f32(vi, id)));
            let q16: [int16x8_t; 4] =
                std::array::from_fn(|i| vqmovn_high_s32(vqmovn_s32(q32[2 * i]), q32[2 * i + 1]));
            let q8 = [
                vqmovn_high_s16(vqmovn_s16(q16[0]), q16[1]),
                vqmovn_high_s16(vqmovn_s16(q16[2]), q16[3]),
            ];
            vst1q_s8(ob.as_mut_ptr().add(off) as *mut i8, q8[0]);
            vst1q_s8(ob.as_mut_ptr().add(off + 16) as *mut i8, q8[1]);
            ob[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
            if with_sum {
                let sum = vaddlvq_s8(q8[0]) as i32 + vaddlvq_s8(q8[1]) as i32;
                let s = half::f16::from_f32(d * sum as f32).to_bits();
                ob[2..4].copy_from_slice(&s.to_le_bytes());
            }
        }
    }
}

/// Q8_K activation blocks (d f32 | 256 levels | 16 sums of 16 levels), byte for byte
/// `quantize_row_q8_K_ref`'s: max = the first value of largest magnitude, iscale = -127/max,
/// q = nearest_int(iscale·x) (its magic-number add and mantissa mask, reproduced on 4 lanes so
/// even NaN and infinity land the same), min 127, truncated to i8; an all-zero block stays zeros.
///
/// Safety: the CPU must have NEON.
#[target_feature(enable = "neon")]
pub unsafe fn quantize_act_q8_k(x: &[f32], out: &mut [u8]) {
    const QK_K: usize = 256;
    const BYTES: usize = 292;
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(BYTES)) {
        // SAFETY: xb holds 256 f32.
        let v: [float32x4_t; 64] =
            std::array::from_fn(|i| unsafe { vld1q_f32(xb.as_ptr().add(4 * i)) });
        let mut m = vabsq_f32(v[0]);
        for vi in &v[1..] {
            m = vmaxq_f32(m, vabsq_f32(*vi));
        }
        let amax = vmaxvq_f32(m);
        let max = if amax.is_nan() {
            // the reference's `>` scan skips NaN where FMAX keeps it: scan as it does
            let (mut amax, mut max) = (0f32, 0f32);
            for &e in xb {
                if e.abs() > amax {
                    (amax, max) = (e.abs(), e);
                }
            }
            max
        } else {
            // the first element of largest magnitude, four lanes at a time
            let target = vdupq_n_f32(amax);
            let quad = (0..64)
                .find(|&i| vmaxvq_u32(vceqq_f32(vabsq_f32(v[i]), target)) != 0)
                .unwrap_or(0);
            let at = (4 * quad..4 * quad + 4).find(|&i| xb[i].abs() == amax);
            at.map_or(0.0, |i| xb[i])
        };
        if max == 0.0 {
            ob.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        let scale = vdupq_n_f32(iscale);
        let (magic, mantissa) = (vdupq_n_f32(12_582_912.0), vdupq_n_u32(0x007f_ffff));
        let (bias, top) = (vdupq_n_s32(0x0040_0000), vdupq_n_s32(127));
        let levels: [int32x4_t; 64] = v.map(|vi| {
            let shifted = vreinterpretq_u32_f32(vaddq_f32(vmulq_f32(scale, vi), magic));
            let q = vsubq_s32(vreinterpretq_s32_u32(vandq_u32(shifted, mantissa)), bias);
            vminq_s32(q, top)
        });
        for j in 0..16 {
            // `as i8` keeps the low byte: two truncating narrows
            let l = &levels[4 * j..4 * j + 4];
            let lo = vmovn_high_s32(vmovn_s32(l[0]), l[1]);
            let hi = vmovn_high_s32(vmovn_s32(l[2]), l[3]);
            let q = vmovn_high_s16(vmovn_s16(lo), hi);
            // SAFETY: ob holds 292 bytes; levels at 4.., sums at 260...
            unsafe { vst1q_s8(ob.as_mut_ptr().add(4 + 16 * j) as *mut i8, q) };
            let sum = vaddlvq_s8(q);
            ob[260 + 2 * j..262 + 2 * j].copy_from_slice(&sum.to_le_bytes());
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

#[cfg(all(test, target_arch = "aarch64"))]
mod tests {
    use super::*;
    use crate::quant::{self, testdata};
    use crate::types::GgmlType;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// f32 rows for the activations: random, and the cases most likely to expose a wrong order
    /// or a saturation (all-zero, constant, huge and tiny values, exact .5 ties, NaN, infinity).
    fn f32_rows(n: usize) -> Vec<(&'static str, Vec<f32>)> {
        let mut ties = vec![0f32; n];
        for (i, v) in ties.iter_mut().enumerate() {
            *v = ((i % 32) as f32 - 16.0) * 0.5 * 3.0 / 127.0;
        }
        ties.iter_mut().step_by(32).for_each(|v| *v = 3.0); // amax 3: x·127/3 lands on .5
        let mut outliers = testdata::heavy_tailed(7, n);
        outliers[3] = 1e30;
        outliers[(40) % n] = -1e30;
        outliers[(70) % n] = 1e-30;
        let mut nan = testdata::gaussian(8, n);
        nan[5] = f32::NAN;
        nan[37 % n] = f32::INFINITY;
        let mut subnormal = testdata::gaussian(9, n);
        subnormal.iter_mut().for_each(|v| *v *= 1e-40);
        let mut rows = testdata::adversarial(n);
        rows.extend([
            ("heavy tailed", testdata::heavy_tailed(1, n)),
            ("gaussian", testdata::gaussian(2, n)),
            ("zeros", vec![0.0; n]),
            ("constant", vec![-0.75; n]),
            ("ties", ties),
            ("outliers", outliers),
            ("nan and inf", nan),
            ("subnormal", subnormal),
        ]);
        rows
    }

    fn q8_act(x: &[f32]) -> Vec<u8> {
        let mut a = vec![0u8; x.len() / QK * BLOCK];
        super::super::quantize_act_q8_0_scalar(x, &mut a);
        a
    }

    /// Weight rows as raw Q8_0 blocks: quantized rows plus hand-made extremes (levels ±127 and
    /// -128, d = 0, the largest f16 scale) that the quantizer never writes.
    fn weight_rows(n: usize) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<(String, Vec<u8>)> = testdata::adversarial(n)
            .into_iter()
            .chain([("random", testdata::heavy_tailed(3, n))])
            .map(|(s, x)| {
                (
                    s.to_string(),
                    quant::quantize("w", &x, n, GgmlType::Q8_0, None).unwrap(),
                )
            })
            .collect();
        let nb = n / QK;
        for (name, level, d) in [
            ("max levels", 127u8, 0x3c00u16),
            ("min levels", 0x80, 0x3c00),
            ("d = 0", 0x7f, 0x0000),
            ("largest d", 0x81, 0x7bff),
        ] {
            let mut w = vec![level; nb * BLOCK];
            for b in 0..nb {
                w[b * BLOCK..b * BLOCK + 2].copy_from_slice(&d.to_le_bytes());
            }
            rows.push((name.to_string(), w));
        }
        rows
    }

    type Dot = fn(&[u8], &[u8]) -> f32;
    type X4 = fn(&[u8], [&[u8]; 4]) -> [f32; 4];
    type Rows4 = fn([&[u8]; 4], &[u8]) -> [f32; 4];

    /// Both flavours (SDOT where this CPU has it, widening multiplies always).
    fn flavours() -> Vec<(&'static str, Dot, X4, Rows4)> {
        let mut v: Vec<(&'static str, Dot, X4, Rows4)> = vec![(
            "mull",
            // SAFETY (these three): NEON is in the baseline of every aarch64 Linux target.
            |w, a| unsafe { dot_mull(w, a) },
            |w, a| unsafe { x4_mull(w, a) },
            |w, a| unsafe { rows4_mull(w, a) },
        )];
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            // SAFETY (each closure): dotprod was detected just above.
            v.push((
                "sdot",
                |w, a| unsafe { dot_sdot(w, a) },
                |w, a| unsafe { x4_sdot(w, a) },
                |w, a| unsafe { rows4_sdot(w, a) },
            ));
        } else {
            eprintln!("this CPU has no dotprod: only the widening-multiply kernels were tested");
        }
        v
    }

    #[test]
    fn q8_0_kernels_equal_the_scalar_reference_bit_for_bit() {
        for n in [32, 32 * 9, 32 * 80] {
            let acts: Vec<(&str, Vec<u8>)> = f32_rows(n)
                .into_iter()
                .map(|(s, x)| (s, q8_act(&x)))
                .collect();
            let ws = weight_rows(n);
            for (flavour, dot, x4, rows4) in flavours() {
                for (wname, w) in &ws {
                    for (aname, a) in &acts {
                        let want = super::super::vec_dot_q8_0_scalar(w, a);
                        let got = dot(w, a);
                        assert!(
                            same(got, want),
                            "{flavour} n={n} w={wname} a={aname}: {got} vs {want}"
                        );
                    }
                    for s in 0..acts.len() {
                        let quad: [&[u8]; 4] =
                            std::array::from_fn(|j| &acts[(s + j) % acts.len()].1[..]);
                        let got = x4(w, quad);
                        for j in 0..4 {
                            let want = super::super::vec_dot_q8_0_scalar(w, quad[j]);
                            assert!(same(got[j], want), "{flavour} x4 n={n} w={wname} lane {j}");
                        }
                    }
                }
                for s in 0..ws.len() {
                    let rows: [&[u8]; 4] = std::array::from_fn(|j| &ws[(s + j) % ws.len()].1[..]);
                    for (aname, a) in &acts {
                        let got = rows4(rows, a);
                        for j in 0..4 {
                            let want = super::super::vec_dot_q8_0_scalar(rows[j], a);
                            assert!(
                                same(got[j], want),
                                "{flavour} 4rows n={n} a={aname} row {j}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The comparison above can fail: kernels that add the lanes left to right, or multiply and
    /// add unfused, differ from the reference on some of these rows.
    #[test]
    fn a_different_float_order_is_caught() {
        let n = 32 * 80;
        let variant = |w: &[u8], a: &[u8], fused: bool| -> f32 {
            let mut acc = [0f32; 8];
            for (wb, ab) in w.chunks_exact(BLOCK).zip(a.chunks_exact(BLOCK)) {
                let d = super::super::scale(wb) * super::super::scale(ab);
                for (l, lane) in acc.iter_mut().enumerate() {
                    let s: i32 = (4 * l..4 * l + 4)
                        .map(|i| (wb[2 + i] as i8 as i32) * (ab[2 + i] as i8 as i32))
                        .sum();
                    *lane = if fused {
                        d.mul_add(s as f32, *lane)
                    } else {
                        d * s as f32 + *lane
                    };
                }
            }
            if fused {
                acc.iter().sum() // left to right, not reduce8's pairs
            } else {
                super::super::super::ops::reduce8(&acc)
            }
        };
        for fused in [true, false] {
            let caught = (0..16).any(|seed| {
                let x = testdata::heavy_tailed(100 + seed, n);
                let w = quant::quantize("w", &x, n, GgmlType::Q8_0, None).unwrap();
                let a = q8_act(&testdata::heavy_tailed(200 + seed, n));
                // SAFETY: NEON is in the aarch64 baseline.
                !same(variant(&w, &a, fused), unsafe { dot_mull(&w, &a) })
            });
            assert!(caught, "fused={fused}: the variant was never told apart");
        }
    }

    #[test]
    fn activation_quantizers_write_the_scalar_bytes() {
        for n in [32, 32 * 80] {
            for (name, x) in f32_rows(n) {
                for with_sum in [false, true] {
                    let bytes = if with_sum {
                        super::super::Q8_1_BLOCK
                    } else {
                        BLOCK
                    };
                    let (mut got, mut want) =
                        (vec![0u8; n / QK * bytes], vec![0u8; n / QK * bytes]);
                    // SAFETY: NEON is in the aarch64 baseline.
                    unsafe { quantize_act_q8(&x, &mut got, with_sum) };
                    if with_sum {
                        super::super::quantize_act_q8_1_scalar(&x, &mut want);
                    } else {
                        super::super::quantize_act_q8_0_scalar(&x, &mut want);
                    }
                    assert!(got == want, "n={n} '{name}' with_sum={with_sum}");
                }
            }
        }
    }

    #[test]
    fn q8_k_quantizer_writes_the_reference_bytes() {
        use crate::quant::kquants::q8_k::Q8K;
        use crate::quant::BlockQuant;
        for n in [256, 256 * 11] {
            let mut rows = f32_rows(n);
            // ties on nearest_int's half-even rounding: max 127 makes iscale -1
            let mut ties: Vec<f32> = (0..n).map(|i| (i % 64) as f32 * 0.5 - 16.0).collect();
            ties.iter_mut().step_by(256).for_each(|v| *v = -127.0);
            rows.push(("q8_k ties", ties));
            let mut two_max = testdata::gaussian(11, n);
            two_max[9] = 0.5;
            two_max[200] = -0.5; // same magnitude, later: the first one is the max
            rows.push(("equal magnitudes", two_max));
            let mut neg_inf = testdata::gaussian(12, n);
            neg_inf[77] = f32::NEG_INFINITY;
            rows.push(("-inf", neg_inf));
            let mut nan_first = testdata::gaussian(13, n);
            nan_first[0] = f32::NAN;
            rows.push(("NaN first", nan_first));
            rows.push(("all NaN", vec![f32::NAN; n]));
            rows.push(("negative zeros", vec![-0.0; n]));
            for (name, x) in rows {
                let (mut got, mut want) = (vec![0u8; n / 256 * 292], vec![0u8; n / 256 * 292]);
                // SAFETY: NEON is in the aarch64 baseline.
                unsafe { quantize_act_q8_k(&x, &mut got) };
                Q8K::quantize_row_ref(&x, &mut want, None);
                assert!(got == want, "n={n} '{name}'");
            }
        }
    }

    #[test]
    fn dispatch_uses_neon_unless_told_not_to() {
        let f = cpu::arm_features();
        let no_simd = std::env::var_os("PYQMOE_NO_SIMD").is_some_and(|v| v != "0");
        assert_eq!(f.neon, !no_simd);
        assert!(
            super::super::kernels(GgmlType::Q8_0)
                .unwrap()
                .vec_dot_4rows
                .is_some()
                == f.neon
        );
        assert!(cpu::describe().contains("neon") == f.neon);
    }
}
