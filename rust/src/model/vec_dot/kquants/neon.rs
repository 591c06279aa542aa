//! aarch64 NEON k-quant kernels (Q2_K..Q6_K against Q8_K activations).
//!
//! A weight super-block is decoded once into 16 registers of 16 signed levels (one per
//! sub-block, the level offset of Q3_K / Q6_K already applied, as in `Decoded`), its 16
//! sub-block scales as four int32x4 and, for the types with mins, its 16 mins as two int16x8.
//! Against each activation row the per-sub-block sums Σ q·a come from SDOT (dotprod) or widening
//! multiplies, then sumi = Σ sc·(those sums) and summ = Σ m·bsum in int32: the exact integers of
//! `block_ints`. The float step is `block_float` itself, so every kernel here returns the
//! portable kernels' bits.

use std::arch::aarch64::*;

use super::super::neon::{f16_at, prefetch_ahead, prefetch_at, quads_mull, quads_sdot};
use super::{act_d, block_float, dot_kernels, DotKernels, ACT_BSUMS, ACT_BYTES, ACT_QS};
use crate::quant::cpu;
use crate::types::GgmlType;

/// One decoded weight super-block.
struct Block {
    /// Levels of sub-block j (elements 16j..16j+16), offset applied.
    q: [int8x16_t; 16],
    /// Scales of sub-blocks 4k..4k+4 in `sc[k]`.
    sc: [int32x4_t; 4],
    /// Mins of sub-blocks 0..8 and 8..16 (zero for the types without mins).
    m: [int16x8_t; 2],
    d: f32,
    dmin: f32,
}

trait NeonBlock {
    const BYTES: usize;
    const MINS: bool;
    /// Safety: b..b+BYTES must be readable; the CPU must have NEON.
    unsafe fn decode(b: *const u8) -> Block;
}

/// Three little-endian u32 words at p, p+4, p+8 (the packed 12-byte scale arrays).
///
/// Safety: p..p+12 must be readable.
#[inline]
unsafe fn words3(p: *const u8) -> [u32; 3] {
    [0, 4, 8].map(|o| u32::from_le_bytes([*p.add(o), *p.add(o + 1), *p.add(o + 2), *p.add(o + 3)]))
}

/// 16 unsigned byte scales to the four int32x4 of `Block::sc`.
#[inline]
#[target_feature(enable = "neon")]
fn widen_u8_scales(s: uint8x16_t) -> [int32x4_t; 4] {
    let lo = vmovl_u8(vget_low_u8(s));
    let hi = vmovl_high_u8(s);
    [
        vmovl_u16(vget_low_u16(lo)),
        vmovl_high_u16(lo),
        vmovl_u16(vget_low_u16(hi)),
        vmovl_high_u16(hi),
    ]
    .map(|v| vreinterpretq_s32_u32(v))
}

/// 16 signed byte scales to the four int32x4 of `Block::sc`.
#[inline]
#[target_feature(enable = "neon")]
fn widen_i8_scales(s: int8x16_t) -> [int32x4_t; 4] {
    let lo = vmovl_s8(vget_low_s8(s));
    let hi = vmovl_high_s8(s);
    [
        vmovl_s16(vget_low_s16(lo)),
        vmovl_high_s16(lo),
        vmovl_s16(vget_low_s16(hi)),
        vmovl_high_s16(hi),
    ]
}

/// Bytes whose bit `bit` is set in `v` become `value`, the others 0.
#[inline]
#[target_feature(enable = "neon")]
fn bit_as(v: uint8x16_t, bit: usize, value: u8) -> uint8x16_t {
    vandq_u8(vtstq_u8(v, vdupq_n_u8(1 << bit)), vdupq_n_u8(value))
}

struct Q2K;
struct Q3K;
struct Q4K;
struct Q5K;
struct Q6K;

/// Q2_K: scales[16] (scale low nibble, min high) | qs[64] | d | dmin. Element 128h + 32s + l is
/// bits 2s..2s+2 of qs[32h + l].
impl NeonBlock for Q2K {
    const BYTES: usize = 84;
    const MINS: bool = true;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode(b: *const u8) -> Block {
        let raw = vld1q_u8(b);
        let mins = vshrq_n_u8::<4>(raw);
        let qs = [0, 16, 32, 48].map(|o| vld1q_u8(b.add(16 + o)));
        let mask = vdupq_n_u8(3);
        // sub-block j = 8h + 2s + t holds bits 2s of qs[32h + 16t ..]
        let q = std::array::from_fn(|j| {
            let (h, s, t) = (j / 8, (j / 2) % 4, j % 2);
            let v = qs[2 * h + t];
            let field = match s {
                0 => v,
                1 => vshrq_n_u8::<2>(v),
                2 => vshrq_n_u8::<4>(v),
                _ => vshrq_n_u8::<6>(v),
            };
            vreinterpretq_s8_u8(vandq_u8(field, mask))
        });
        Block {
            q,
            sc: widen_u8_scales(vandq_u8(raw, vdupq_n_u8(0x0F))),
            m: [
                vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(mins))),
                vreinterpretq_s16_u16(vmovl_high_u8(mins)),
            ],
            d: f16_at(b.add(80)),
            dmin: f16_at(b.add(82)),
        }
    }
}

/// Q3_K: hmask[32] | qs[64] | scales[12] | d. Element 32c + l (c = 4h + s): low bits as Q2_K, the
/// third bit is bit c of hmask[l] (set: +0, clear: -4); 6-bit scales minus 32.
impl NeonBlock for Q3K {
    const BYTES: usize = 110;
    const MINS: bool = false;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode(b: *const u8) -> Block {
        let hm = [vld1q_u8(b), vld1q_u8(b.add(16))];
        let qs = [0, 16, 32, 48].map(|o| vld1q_u8(b.add(32 + o)));
        let (mask, four) = (vdupq_n_u8(3), vdupq_n_u8(4));
        let q = std::array::from_fn(|j| {
            let (c, t) = (j / 2, j % 2);
            let (h, s) = (c / 4, c % 4);
            let v = qs[2 * h + t];
            let field = match s {
                0 => v,
                1 => vshrq_n_u8::<2>(v),
                2 => vshrq_n_u8::<4>(v),
                _ => vshrq_n_u8::<6>(v),
            };
            let level = vorrq_u8(vandq_u8(field, mask), bit_as(hm[t], c, 4));
            vreinterpretq_s8_u8(vsubq_u8(level, four))
        });
        // the 16 scales: low nibbles in bytes 0..8 (j < 8 low, j >= 8 high), top two bits of
        // scale j at bits 2(j/4) of byte 8 + j%4
        let [a0, a1, a2] = words3(b.add(96));
        const LO4: u32 = 0x0F0F_0F0F;
        const LO2: u32 = 0x0303_0303;
        let words = [
            (a0 & LO4) | ((a2 & LO2) << 4),
            (a1 & LO4) | (((a2 >> 2) & LO2) << 4),
            ((a0 >> 4) & LO4) | (((a2 >> 4) & LO2) << 4),
            ((a1 >> 4) & LO4) | (((a2 >> 6) & LO2) << 4),
        ];
        let s = vsubq_s8(
            vreinterpretq_s8_u32(vld1q_u32(words.as_ptr())),
            vdupq_n_s8(32),
        );
        Block {
            q,
            sc: widen_i8_scales(s),
            m: [vdupq_n_s16(0); 2],
            d: f16_at(b.add(108)),
            dmin: 0.0,
        }
    }
}

/// Q4_K / Q5_K's 8 six-bit scales and mins (get_scale_min_k4's packing) as 8 bytes each.
///
/// Safety: s..s+12 must be readable.
#[inline]
unsafe fn k4_scales_mins(s: *const u8) -> (u64, u64) {
    let [a0, a1, a2] = words3(s);
    const LO6: u32 = 0x3F3F_3F3F;
    const LO4: u32 = 0x0F0F_0F0F;
    const LO2: u32 = 0x0303_0303;
    let sc_hi = (a2 & LO4) | (((a0 >> 6) & LO2) << 4);
    let m_hi = ((a2 >> 4) & LO4) | (((a1 >> 6) & LO2) << 4);
    (
        (a0 & LO6) as u64 | (sc_hi as u64) << 32,
        (a1 & LO6) as u64 | (m_hi as u64) << 32,
    )
}

/// Q4_K / Q5_K: d | dmin | scales[12] | then (Q5_K) qh[32] | qs[128]. Element 32c + l is nibble
/// c%2 of qs[32(c/2) + l], plus for Q5_K 16 where bit c of qh[l] is set; scale and min c serve
/// both 16-element sub-blocks 2c and 2c+1.
///
/// Safety: the block at b must be readable, its nibbles at b + `qs_at`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn decode_q45(b: *const u8, qs_at: usize, qh: Option<[uint8x16_t; 2]>) -> Block {
    let (sc, m) = k4_scales_mins(b.add(4));
    let (sc, m) = (vmovl_u8(vcreate_u8(sc)), vmovl_u8(vcreate_u8(m)));
    let sc_pairs = [vzip1q_u16(sc, sc), vzip2q_u16(sc, sc)];
    let sc = [
        vmovl_u16(vget_low_u16(sc_pairs[0])),
        vmovl_high_u16(sc_pairs[0]),
        vmovl_u16(vget_low_u16(sc_pairs[1])),
        vmovl_high_u16(sc_pairs[1]),
    ]
    .map(|v| vreinterpretq_s32_u32(v));
    let m = [vzip1q_u16(m, m), vzip2q_u16(m, m)].map(|v| vreinterpretq_s16_u16(v));
    let qs: [uint8x16_t; 8] = std::array::from_fn(|i| vld1q_u8(b.add(qs_at + 16 * i)));
    let low = vdupq_n_u8(0x0F);
    // sub-block j = 2c + t: bytes 32(c/2) + 16t.. of qs, nibble c%2
    let q = std::array::from_fn(|j| {
        let (c, t) = (j / 2, j % 2);
        let v = qs[2 * (c / 2) + t];
        let mut level = if c % 2 == 0 {
            vandq_u8(v, low)
        } else {
            vshrq_n_u8::<4>(v)
        };
        if let Some(qh) = qh {
            level = vorrq_u8(level, bit_as(qh[t], c, 0x10));
        }
        vreinterpretq_s8_u8(level)
    });
    Block {
        q,
        sc,
        m,
        d: f16_at(b),
        dmin: f16_at(b.add(2)),
    }
}

impl NeonBlock for Q4K {
    const BYTES: usize = 144;
    const MINS: bool = true;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode(b: *const u8) -> Block {
        decode_q45(b, 16, None)
    }
}

impl NeonBlock for Q5K {
    const BYTES: usize = 176;
    const MINS: bool = true;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode(b: *const u8) -> Block {
        decode_q45(b, 48, Some([vld1q_u8(b.add(16)), vld1q_u8(b.add(32))]))
    }
}

/// Q6_K: ql[128] | qh[64] | scales[16] (i8) | d. In half h, element 128h + 32s + l has its low
/// nibble in ql[64h + 32(s%2) + l] (low for s < 2, high otherwise) and its top two bits at bits
/// 2s of qh[32h + l]; levels minus 32.
impl NeonBlock for Q6K {
    const BYTES: usize = 210;
    const MINS: bool = false;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode(b: *const u8) -> Block {
        let ql: [uint8x16_t; 8] = std::array::from_fn(|i| vld1q_u8(b.add(16 * i)));
        let qh: [uint8x16_t; 4] = std::array::from_fn(|i| vld1q_u8(b.add(128 + 16 * i)));
        let (low, top, bias) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30), vdupq_n_u8(32));
        // sub-block j = 8h + 2s + t
        let q = std::array::from_fn(|j| {
            let (h, s, t) = (j / 8, (j / 2) % 4, j % 2);
            let l = ql[4 * h + 2 * (s % 2) + t];
            let lo = if s < 2 {
                vandq_u8(l, low)
            } else {
                vshrq_n_u8::<4>(l)
            };
            let v = qh[2 * h + t];
            // the 2-bit field at bits 2s moved to bits 4..6
            let moved = match s {
                0 => vshlq_n_u8::<4>(v),
                1 => vshlq_n_u8::<2>(v),
                2 => v,
                _ => vshrq_n_u8::<2>(v),
            };
            let level = vorrq_u8(lo, vandq_u8(moved, top));
            vreinterpretq_s8_u8(vsubq_u8(level, bias))
        });
        Block {
            q,
            sc: widen_i8_scales(vld1q_s8(b.add(192) as *const i8)),
            m: [vdupq_n_s16(0); 2],
            d: f16_at(b.add(208)),
            dmin: 0.0,
        }
    }
}

/// Σ_j m_j·bsum_j of a block's mins and the activation block's 16 bsums at `bs`, in int32.
///
/// Safety: bs..bs+32 must be readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn min_sum(m: &[int16x8_t; 2], bs: *const u8) -> i32 {
    let b = [
        vld1q_s16(bs as *const i16),
        vld1q_s16(bs.add(16) as *const i16),
    ];
    let mut s = vmull_s16(vget_low_s16(m[0]), vget_low_s16(b[0]));
    s = vmlal_high_s16(s, m[0], b[0]);
    s = vmlal_s16(s, vget_low_s16(m[1]), vget_low_s16(b[1]));
    s = vmlal_high_s16(s, m[1], b[1]);
    vaddvq_s32(s)
}

/// The kernels for one way of forming the int8 sums (`$quads`): R = 1, 4 or 8 activation rows
/// against one weight row, and four weight rows against one activation row.
macro_rules! k_kernels {
    ($features:literal, $quads:ident, $sums:ident, $dot:ident, $rows4:ident) => {
        /// `block_ints` of a decoded block against the activation block at `ab`.
        ///
        /// Safety: ab..ab+ACT_BYTES must be readable.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $sums(k: &Block, mins: bool, ab: *const u8) -> (i32, i32) {
            let qa = ab.add(ACT_QS) as *const i8;
            let mut isum = vdupq_n_s32(0);
            for g in 0..4 {
                let p: [int32x4_t; 4] = std::array::from_fn(|i| {
                    let j = 4 * g + i;
                    $quads(k.q[j], vld1q_s8(qa.add(16 * j)))
                });
                // lane i: the sum of sub-block 4g + i
                let s = vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));
                isum = vmlaq_s32(isum, s, k.sc[g]);
            }
            let summ = if mins {
                min_sum(&k.m, ab.add(ACT_BSUMS))
            } else {
                0
            };
            (vaddvq_s32(isum), summ)
        }

        #[target_feature(enable = $features)]
        fn $dot<B: NeonBlock, const R: usize>(w: &[u8], a: [&[u8]; R]) -> [f32; R] {
            let n = w.len() / B::BYTES;
            assert!(
                a.iter().all(|ar| ar.len() >= n * ACT_BYTES),
                "activation row too short"
            );
            let mut acc = [0f32; R];
            for blk in 0..n {
                // SAFETY: block blk lies inside w and inside every activation row (asserted).
                unsafe {
                    let wb = w.as_ptr().add(blk * B::BYTES);
                    for off in (0..B::BYTES).step_by(64) {
                        prefetch_ahead(wb.add(off));
                    }
                    let k = B::decode(wb);
                    for r in 0..R {
                        let ab = &a[r][blk * ACT_BYTES..(blk + 1) * ACT_BYTES];
                        let (sumi, summ) = $sums(&k, B::MINS, ab.as_ptr());
                        acc[r] = block_float(acc[r], act_d(ab), k.d, k.dmin, sumi, summ, B::MINS);
                    }
                }
            }
            acc
        }

        #[target_feature(enable = $features)]
        fn $rows4<B: NeonBlock>(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
            let n = w[0].len() / B::BYTES;
            assert!(
                w.iter().all(|wr| wr.len() / B::BYTES == n),
                "weight rows of unequal length"
            );
            assert!(a.len() >= n * ACT_BYTES, "activation row too short");
            let mut acc = [0f32; 4];
            let ahead = super::super::rows4_prefetch_ahead(w[0].len());
            for blk in 0..n {
                let ab = &a[blk * ACT_BYTES..(blk + 1) * ACT_BYTES];
                for r in 0..4 {
                    // SAFETY: block blk lies inside every weight row and the activation row.
                    unsafe {
                        let wb = w[r].as_ptr().add(blk * B::BYTES);
                        for off in (0..B::BYTES).step_by(64) {
                            prefetch_at(wb.add(off), ahead);
                        }
                        let k = B::decode(wb);
                        let (sumi, summ) = $sums(&k, B::MINS, ab.as_ptr());
                        acc[r] = block_float(acc[r], act_d(ab), k.d, k.dmin, sumi, summ, B::MINS);
                    }
                }
            }
            acc
        }
    };
}

k_kernels!("neon,dotprod", quads_sdot, sums_sdot, dot_sdot, rows4_sdot);
k_kernels!("neon", quads_mull, sums_mull, dot_mull, rows4_mull);

/// The NEON kernel set of one block type, SDOT or widening multiplies.
fn set_of<B: NeonBlock>(sdot: bool) -> DotKernels {
    // SAFETY (every closure): NEON is present (checked by the caller), and dotprod where `sdot`.
    if sdot {
        dot_kernels(
            |w, a| unsafe { dot_sdot::<B, 1>(w, [a])[0] },
            |w, a| unsafe { dot_sdot::<B, 4>(w, a) },
            Some(|w, a| unsafe { rows4_sdot::<B>(w, a) }),
            Some(|w, a| unsafe { dot_sdot::<B, 8>(w, a) }),
        )
    } else {
        dot_kernels(
            |w, a| unsafe { dot_mull::<B, 1>(w, [a])[0] },
            |w, a| unsafe { dot_mull::<B, 4>(w, a) },
            Some(|w, a| unsafe { rows4_mull::<B>(w, a) }),
            Some(|w, a| unsafe { dot_mull::<B, 8>(w, a) }),
        )
    }
}

fn set_for(ty: GgmlType, sdot: bool) -> Option<DotKernels> {
    Some(match ty {
        GgmlType::Q2_K => set_of::<Q2K>(sdot),
        GgmlType::Q3_K => set_of::<Q3K>(sdot),
        GgmlType::Q4_K => set_of::<Q4K>(sdot),
        GgmlType::Q5_K => set_of::<Q5K>(sdot),
        GgmlType::Q6_K => set_of::<Q6K>(sdot),
        _ => return None,
    })
}

/// The NEON kernels for `ty` where the CPU has NEON (SDOT ones where it has dotprod).
pub(super) fn kernels(ty: GgmlType) -> Option<DotKernels> {
    let f = cpu::arm_features();
    if !f.neon {
        return None;
    }
    set_for(ty, f.dotprod)
}

#[cfg(all(test, target_arch = "aarch64"))]
mod tests {
    use super::super::{scalar_kernels, QK_K};
    use super::*;
    use crate::quant::{self, testdata};

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Where each type keeps its f16 d (and dmin) inside a block.
    fn scale_offsets(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            _ => &[208],
        }
    }

    /// Weight rows: quantized random and adversarial rows, and raw blocks the quantizer never
    /// writes (every bit set: maximal levels and scales; all clear; random bytes) with
    /// d = 1, d = 0 or a random finite d.
    fn weight_rows(ty: GgmlType, n: usize) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<(String, Vec<u8>)> = testdata::adversarial(n)
            .into_iter()
            .chain([
                ("heavy tailed", testdata::heavy_tailed(41, n)),
                ("gaussian", testdata::gaussian(42, n)),
            ])
            .map(|(s, x)| {
                (
                    s.to_string(),
                    quant::quantize("w", &x, n, ty, None).unwrap(),
                )
            })
            .collect();
        let bytes = ty.block_geometry().1;
        let nb = n / QK_K;
        let mut rng = testdata::Rng::new(7);
        for (name, fill, d) in [
            ("all ones, d = 1", Some(0xFF), Some(0x3C00u16)),
            ("all zero, d = 1", Some(0x00), Some(0x3C00)),
            ("all ones, d = 0", Some(0xFF), Some(0x0000)),
            ("random bytes, d = 1", None, Some(0x3C00)),
            ("random bytes and d", None, None),
        ] {
            let mut w: Vec<u8> = (0..nb * bytes)
                .map(|_| fill.unwrap_or(rng.next_u64() as u8))
                .collect();
            for b in 0..nb {
                for &o in scale_offsets(ty) {
                    // a random finite f16: exponent field below 31
                    let bits = d.unwrap_or((rng.next_u64() as u16) & 0xBBFF);
                    w[b * bytes + o..b * bytes + o + 2].copy_from_slice(&bits.to_le_bytes());
                }
            }
            rows.push((name.to_string(), w));
        }
        rows
    }

    /// Activation rows: quantized (random, zeros, constant, ±1e30 outliers, tiny values) and raw
    /// Q8_K blocks with extreme levels and arbitrary bsums under several d.
    fn act_rows(n: usize) -> Vec<(String, Vec<u8>)> {
        let mut outliers = testdata::heavy_tailed(31, n);
        outliers[n / 2 + 7] = 1e30;
        outliers[3] = -1e30;
        let tiny: Vec<f32> = testdata::gaussian(32, n)
            .iter()
            .map(|v| v * 1e-30)
            .collect();
        let mut rows: Vec<(String, Vec<u8>)> = [
            ("heavy tailed", testdata::heavy_tailed(33, n)),
            ("gaussian", testdata::gaussian(34, n)),
            ("zeros", vec![0.0; n]),
            ("constant", vec![-0.75; n]),
            ("outliers", outliers),
            ("tiny", tiny),
        ]
        .into_iter()
        .map(|(s, x)| {
            let mut a = vec![0u8; n / QK_K * ACT_BYTES];
            super::super::quantize_act_q8_k(&x, &mut a);
            (s.to_string(), a)
        })
        .collect();
        let mut rng = testdata::Rng::new(8);
        for (name, level, d) in [
            ("levels 127", Some(127u8), 1.0f32),
            ("levels -128", Some(0x80), 1.0),
            ("levels -127, d = 1e30", Some(0x81), 1e30),
            ("random levels", None, 0.37),
            ("random levels, d = 0", None, 0.0),
            ("random levels, d < 0", None, -2.5e-3),
        ] {
            let mut a: Vec<u8> = (0..n / QK_K * ACT_BYTES)
                .map(|_| level.unwrap_or(rng.next_u64() as u8))
                .collect();
            for blk in a.chunks_exact_mut(ACT_BYTES) {
                blk[..4].copy_from_slice(&d.to_le_bytes());
                if level.is_some() {
                    // consistent bsums: 16 equal levels each
                    let bsum = (16 * blk[ACT_QS] as i8 as i16).to_le_bytes();
                    for j in 0..16 {
                        blk[ACT_BSUMS + 2 * j..ACT_BSUMS + 2 * j + 2].copy_from_slice(&bsum);
                    }
                }
            }
            rows.push((name.to_string(), a));
        }
        rows
    }

    fn flavours() -> Vec<bool> {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            vec![false, true]
        } else {
            eprintln!("this CPU has no dotprod: only the widening-multiply kernels were tested");
            vec![false]
        }
    }

    /// Every NEON kernel (1, 4, 8 activation rows; 4 weight rows; both flavours) equals the
    /// scalar `vec_dot` bit for bit on every weight row × activation row.
    #[test]
    fn kernels_equal_the_scalar_reference_bit_for_bit() {
        for n in [256, 512, 2816] {
            let acts = act_rows(n);
            for ty in TYPES {
                let scalar = scalar_kernels(ty).unwrap();
                let ws = weight_rows(ty, n);
                let mut nonzero = 0;
                for sdot in flavours() {
                    let k = set_for(ty, sdot).unwrap();
                    let want: Vec<Vec<f32>> = ws
                        .iter()
                        .map(|(_, w)| acts.iter().map(|(_, a)| (scalar.vec_dot)(w, a)).collect())
                        .collect();
                    for (wi, (wname, w)) in ws.iter().enumerate() {
                        for (ai, (aname, a)) in acts.iter().enumerate() {
                            let got = (k.vec_dot)(w, a);
                            let what = format!("{ty} sdot={sdot} n={n} w='{wname}' a='{aname}'");
                            assert!(same(got, want[wi][ai]), "{what}: {got} vs {}", want[wi][ai]);
                            nonzero += (got != 0.0) as usize;
                        }
                        for s in 0..acts.len() {
                            let idx: [usize; 8] = std::array::from_fn(|j| (s + j) % acts.len());
                            let x4 =
                                (k.vec_dot_x4)(w, std::array::from_fn(|j| &acts[idx[j]].1[..]));
                            let x8 = (k.vec_dot_x8.unwrap())(w, idx.map(|i| &acts[i].1[..]));
                            for j in 0..8 {
                                let e = want[wi][idx[j]];
                                assert!(
                                    same(x8[j], e),
                                    "{ty} sdot={sdot} n={n} x8 w='{wname}' lane {j}"
                                );
                                if j < 4 {
                                    assert!(
                                        same(x4[j], e),
                                        "{ty} sdot={sdot} n={n} x4 w='{wname}' lane {j}"
                                    );
                                }
                            }
                        }
                    }
                    for s in 0..ws.len() {
                        let idx: [usize; 4] = std::array::from_fn(|j| (s + j) % ws.len());
                        for (ai, (aname, a)) in acts.iter().enumerate() {
                            let got = (k.vec_dot_4rows.unwrap())(idx.map(|i| &ws[i].1[..]), a);
                            for j in 0..4 {
                                let e = want[idx[j]][ai];
                                assert!(
                                    same(got[j], e),
                                    "{ty} sdot={sdot} n={n} 4rows a='{aname}' w='{}': {} vs {e}",
                                    ws[idx[j]].0,
                                    got[j]
                                );
                            }
                        }
                    }
                }
                // the comparison means something only if the dots are mostly not zero
                assert!(
                    nonzero > ws.len() * acts.len() / 2,
                    "{ty} n={n}: {nonzero} non-zero dots"
                );
            }
        }
    }

    /// The NEON sets are what `kernels` hands out on this machine (SDOT where the CPU has it).
    #[test]
    fn dispatch_picks_neon() {
        let f = cpu::arm_features();
        for ty in TYPES {
            let k = super::super::kernels(ty).unwrap();
            assert_eq!(k.vec_dot_4rows.is_some(), f.neon, "{ty}");
            assert_eq!(k.vec_dot_x8.is_some(), f.neon, "{ty}");
        }
        for ty in [GgmlType::Q8_0, GgmlType::IQ4_XS, GgmlType::Q8_K] {
            assert!(set_for(ty, false).is_none(), "{ty}");
        }
    }
}
