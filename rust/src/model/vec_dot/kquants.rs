//! k-quant weights (Q2_K..Q6_K) against Q8_K activations, as ggml's CPU backend pairs them
//! (`vec_dot_type = Q8_K`).
//!
//! Per 256-element super-block everything up to the last step is exact integer arithmetic:
//! sumi = Σ_j sc_j·Σ_{i∈j} q_i·a_i over the 16-element sub-blocks j (levels q with their offset,
//! e.g. Q6_K's -32, already applied), and for the types with mins summ = Σ_j m_j·bsum_j (the
//! activations' sums of 16). Only then come floats, in one fixed order per block:
//!
//! ```text
//! acc += (d_a·d)·f32(sumi) − (d_a·dmin)·f32(summ)        (no min term for Q3_K / Q6_K)
//! ```
//!
//! The AVX2 kernels get the same integers another way (unsigned levels through
//! `_mm256_maddubs_epi16`, sub-block scales through `_mm256_madd_epi16`, a level offset folded in
//! as off·Σ_j sc_j·bsum_j) and then perform exactly these float operations, so the fast, scalar
//! and 4-row kernels all return the same bits. ggml instead accumulates the block terms in 8
//! float lanes; the two differ by float rounding only (see the tests for the bound).
//!
//! The offset trick relies on the activations' bsums being the sums of their levels, which holds
//! for every Q8_K block written by `quantize_act_q8_k` or ggml (ggml's all-zero blocks leave the
//! bsums unwritten, but their d = 0 zeroes the term).

// Index loops over the sub-blocks mirror the block layouts.
#![allow(clippy::needless_range_loop)]

use super::{quantize_act_q8_k, DotKernels, Rows4Fn, X8Fn};

#[cfg(target_arch = "aarch64")]
mod neon;
use crate::quant::kquants::{get_scale_min_k4, q3_k::scale_at, read_f16, QK_K};
use crate::types::GgmlType;

/// One Q8_K block: d (f32) | qs[256] (i8) | bsums[16] (i16).
const ACT_BYTES: usize = 292;
const ACT_QS: usize = 4;
const ACT_BSUMS: usize = 260;

/// The kernels for `ty` (Q2_K..Q6_K), AVX2 where the CPU has it (and PYQMOE_NO_SIMD is unset).
pub fn kernels(ty: GgmlType) -> Option<DotKernels> {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = avx2_kernels(ty) {
        return Some(k);
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(k) = neon::kernels(ty) {
        return Some(k);
    }
    scalar_kernels(ty)
}

fn dot_kernels(
    vec_dot: fn(&[u8], &[u8]) -> f32,
    vec_dot_x4: fn(&[u8], [&[u8]; 4]) -> [f32; 4],
    vec_dot_4rows: Option<Rows4Fn>,
    vec_dot_x8: Option<X8Fn>,
) -> DotKernels {
    DotKernels {
        act_type: GgmlType::Q8_K,
        quantize_act: quantize_act_q8_k,
        vec_dot,
        vec_dot_x4,
        vec_dot_4rows,
        vec_dot_x8,
    }
}

/// The portable kernels (also the reference the AVX2 ones are tested against, bit for bit).
pub fn scalar_kernels(ty: GgmlType) -> Option<DotKernels> {
    fn of<B: KBlock>() -> DotKernels {
        dot_kernels(vec_dot_scalar::<B>, vec_dot_x4_scalar::<B>, None, None)
    }
    Some(match ty {
        GgmlType::Q2_K => of::<Q2K>(),
        GgmlType::Q3_K => of::<Q3K>(),
        GgmlType::Q4_K => of::<Q4K>(),
        GgmlType::Q5_K => of::<Q5K>(),
        GgmlType::Q6_K => of::<Q6K>(),
        _ => return None,
    })
}

#[cfg(target_arch = "x86_64")]
fn avx2_kernels(ty: GgmlType) -> Option<DotKernels> {
    let f = crate::quant::cpu::features();
    if !(f.avx2 && f.fma && f.f16c) {
        return None;
    }
    // SAFETY (every closure): AVX2, FMA and F16C are present, checked just above.
    Some(match ty {
        GgmlType::Q2_K => dot_kernels(
            |w, a| unsafe { avx2::dot_q2_k::<1>(w, [a])[0] },
            |w, a| unsafe { avx2::dot_q2_k::<4>(w, a) },
            Some(|w, a| unsafe { avx2::rows4_q2_k(w, a) }),
            Some(|w, a| unsafe { avx2::dot_q2_k::<8>(w, a) }),
        ),
        GgmlType::Q3_K => dot_kernels(
            |w, a| unsafe { avx2::dot_q3_k::<1>(w, [a])[0] },
            |w, a| unsafe { avx2::dot_q3_k::<4>(w, a) },
            None,
            Some(|w, a| unsafe { avx2::dot_q3_k::<8>(w, a) }),
        ),
        GgmlType::Q4_K => dot_kernels(
            |w, a| unsafe { avx2::dot_q4_k::<1>(w, [a])[0] },
            |w, a| unsafe { avx2::dot_q4_k::<4>(w, a) },
            Some(|w, a| unsafe { avx2::rows4_q4_k(w, a) }),
            Some(|w, a| unsafe { avx2::dot_q4_k::<8>(w, a) }),
        ),
        GgmlType::Q5_K => dot_kernels(
            |w, a| unsafe { avx2::dot_q5_k::<1>(w, [a])[0] },
            |w, a| unsafe { avx2::dot_q5_k::<4>(w, a) },
            Some(|w, a| unsafe { avx2::rows4_q5_k(w, a) }),
            Some(|w, a| unsafe { avx2::dot_q5_k::<8>(w, a) }),
        ),
        GgmlType::Q6_K => dot_kernels(
            |w, a| unsafe { avx2::dot_q6_k::<1>(w, [a])[0] },
            |w, a| unsafe { avx2::dot_q6_k::<4>(w, a) },
            None,
            Some(|w, a| unsafe { avx2::dot_q6_k::<8>(w, a) }),
        ),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Portable kernels

/// One weight super-block as integers: value_i = d·sc_j·q_i − dmin·m_j for i in sub-block j (16).
pub(crate) struct Decoded {
    pub d: f32,
    pub dmin: f32,
    /// Levels with their offset applied (Q3_K: -4..3, Q6_K: -32..31, others unsigned).
    pub q: [i8; QK_K],
    pub sc: [i16; 16],
    /// Sub-block mins (all 0 for Q3_K and Q6_K).
    pub m: [i16; 16],
}

pub(crate) trait KBlock {
    const BYTES: usize;
    /// Whether the type has sub-block mins (Q2_K, Q4_K, Q5_K).
    const MINS: bool;
    fn decode(b: &[u8]) -> Decoded;
}

/// The 256 levels of a block, level(c, l) giving element 32c + l (as a byte, two's complement).
#[inline(always)]
fn levels(level: impl Fn(usize, usize) -> u8) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for c in 0..8 {
        for l in 0..32 {
            q[32 * c + l] = level(c, l) as i8;
        }
    }
    q
}

pub(crate) struct Q2K;
pub(crate) struct Q3K;
pub(crate) struct Q4K;
pub(crate) struct Q5K;
pub(crate) struct Q6K;

/// Q2_K: scales[16] | qs[64] | d | dmin. Element 128h + 32s + l is bits 2s..2s+2 of qs[32h + l].
impl KBlock for Q2K {
    const BYTES: usize = 84;
    const MINS: bool = true;
    fn decode(b: &[u8]) -> Decoded {
        let qs = &b[16..80];
        Decoded {
            d: read_f16(&b[80..82]),
            dmin: read_f16(&b[82..84]),
            q: levels(|c, l| (qs[32 * (c / 4) + l] >> (2 * (c % 4))) & 3),
            sc: std::array::from_fn(|j| (b[j] & 0xF) as i16),
            m: std::array::from_fn(|j| (b[j] >> 4) as i16),
        }
    }
}

/// Q3_K: hmask[32] | qs[64] | scales[12] | d. The low two bits as Q2_K, the third bit c of
/// hmask[l] for element 32c + l (set: +0, clear: -4); 6-bit scales minus 32.
impl KBlock for Q3K {
    const BYTES: usize = 110;
    const MINS: bool = false;
    fn decode(b: &[u8]) -> Decoded {
        let (hm, qs, s) = (&b[0..32], &b[32..96], &b[96..108]);
        Decoded {
            d: read_f16(&b[108..110]),
            dmin: 0.0,
            q: levels(|c, l| {
                let lo = (qs[32 * (c / 4) + l] >> (2 * (c % 4))) & 3;
                let hi = (hm[l] >> c) & 1;
                (lo | (hi << 2)).wrapping_sub(4)
            }),
            sc: std::array::from_fn(|j| scale_at(s, j) as i16),
            m: [0; 16],
        }
    }
}

/// Q4_K: d | dmin | scales[12] | qs[128]. Element 32c + l is nibble c%2 of qs[32(c/2) + l], with
/// the 6-bit scale and min of 32-element sub-block c.
impl KBlock for Q4K {
    const BYTES: usize = 144;
    const MINS: bool = true;
    fn decode(b: &[u8]) -> Decoded {
        let qs = &b[16..144];
        let sm: [(u8, u8); 8] = std::array::from_fn(|c| get_scale_min_k4(c, &b[4..16]));
        Decoded {
            d: read_f16(&b[0..2]),
            dmin: read_f16(&b[2..4]),
            q: levels(|c, l| (qs[32 * (c / 2) + l] >> (4 * (c % 2))) & 0xF),
            sc: std::array::from_fn(|j| sm[j / 2].0 as i16),
            m: std::array::from_fn(|j| sm[j / 2].1 as i16),
        }
    }
}

/// Q5_K: Q4_K's layout plus qh[32] before qs: bit c of qh[l] is the fifth bit of element 32c + l.
impl KBlock for Q5K {
    const BYTES: usize = 176;
    const MINS: bool = true;
    fn decode(b: &[u8]) -> Decoded {
        let (qh, qs) = (&b[16..48], &b[48..176]);
        let sm: [(u8, u8); 8] = std::array::from_fn(|c| get_scale_min_k4(c, &b[4..16]));
        Decoded {
            d: read_f16(&b[0..2]),
            dmin: read_f16(&b[2..4]),
            q: levels(|c, l| {
                let lo = (qs[32 * (c / 2) + l] >> (4 * (c % 2))) & 0xF;
                lo | (((qh[l] >> c) & 1) << 4)
            }),
            sc: std::array::from_fn(|j| sm[j / 2].0 as i16),
            m: std::array::from_fn(|j| sm[j / 2].1 as i16),
        }
    }
}

/// Q6_K: ql[128] | qh[64] | scales[16] (i8) | d. In half h, element 128h + 32s + l has its low
/// nibble in ql[64h + 32(s%2) + l] (low for s < 2, high otherwise) and its top two bits at bits
/// 2s..2s+2 of qh[32h + l]; levels minus 32.
impl KBlock for Q6K {
    const BYTES: usize = 210;
    const MINS: bool = false;
    fn decode(b: &[u8]) -> Decoded {
        let (ql, qh) = (&b[0..128], &b[128..192]);
        Decoded {
            d: read_f16(&b[208..210]),
            dmin: 0.0,
            q: levels(|c, l| {
                let (h, s) = (c / 4, c % 4);
                let lo = (ql[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0xF;
                let hi = (qh[32 * h + l] >> (2 * s)) & 3;
                (lo | (hi << 4)).wrapping_sub(32)
            }),
            sc: std::array::from_fn(|j| b[192 + j] as i8 as i16),
            m: [0; 16],
        }
    }
}

/// The exact integer sums of one block against one Q8_K block: (Σ_j sc_j·Σ q·a, Σ_j m_j·bsum_j).
#[inline]
fn block_ints<B: KBlock>(dec: &Decoded, a: &[u8]) -> (i32, i32) {
    let qa = &a[ACT_QS..ACT_QS + QK_K];
    let mut sumi = 0i32;
    for j in 0..16 {
        let mut s = 0i32;
        for l in 16 * j..16 * j + 16 {
            s += dec.q[l] as i32 * qa[l] as i8 as i32;
        }
        sumi += dec.sc[j] as i32 * s;
    }
    let mut summ = 0i32;
    if B::MINS {
        for j in 0..16 {
            let bsum = i16::from_le_bytes([a[ACT_BSUMS + 2 * j], a[ACT_BSUMS + 2 * j + 1]]);
            summ += dec.m[j] as i32 * bsum as i32;
        }
    }
    (sumi, summ)
}

/// The float step every kernel shares (the AVX2 ones do these same IEEE operations per lane).
#[inline(always)]
fn block_float(
    acc: f32,
    da: f32,
    dec_d: f32,
    dec_dmin: f32,
    sumi: i32,
    summ: i32,
    mins: bool,
) -> f32 {
    let main = (da * dec_d) * sumi as f32;
    if mins {
        acc + (main - (da * dec_dmin) * summ as f32)
    } else {
        acc + main
    }
}

#[inline]
fn act_d(a: &[u8]) -> f32 {
    f32::from_le_bytes([a[0], a[1], a[2], a[3]])
}

fn vec_dot_scalar<B: KBlock>(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0f32;
    for (wb, ab) in w.chunks_exact(B::BYTES).zip(a.chunks_exact(ACT_BYTES)) {
        let dec = B::decode(wb);
        let (sumi, summ) = block_ints::<B>(&dec, ab);
        acc = block_float(acc, act_d(ab), dec.d, dec.dmin, sumi, summ, B::MINS);
    }
    acc
}

/// Four activation rows, each weight block decoded once; the same operations as `vec_dot_scalar`.
fn vec_dot_x4_scalar<B: KBlock>(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let mut acc = [0f32; 4];
    for (i, wb) in w.chunks_exact(B::BYTES).enumerate() {
        let dec = B::decode(wb);
        for r in 0..4 {
            let ab = &a[r][i * ACT_BYTES..(i + 1) * ACT_BYTES];
            let (sumi, summ) = block_ints::<B>(&dec, ab);
            acc[r] = block_float(acc[r], act_d(ab), dec.d, dec.dmin, sumi, summ, B::MINS);
        }
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// AVX2 kernels

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Each block is taken as 8 chunks of 32 levels (elements 32c..32c+32, the order of the
    //! activations), each a register of unsigned bytes plus a register of 16-bit scales
    //! (scale of sub-block 2c for bytes 0..16, 2c+1 for bytes 16..32). A chunk meets each
    //! activation row with maddubs (levels ≤ 63, so pairs ≤ 2·63·128 < 2^15: no saturation) and
    //! madd with the scales; the 4-row kernels decode a chunk once and reuse it for all rows.

    use std::arch::x86_64::*;

    use super::{ACT_BSUMS, ACT_BYTES, ACT_QS};

    /// What a block gives beyond its chunks: d, dmin, and the 16 i16 weights of the bsums term
    /// (the mins, or the scales for the types whose levels carry an offset).
    struct Common {
        d: f32,
        dmin: f32,
        bsum_w: __m256i,
    }

    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Safety: p..p+4 must be readable.
    #[inline]
    unsafe fn u32_at(p: *const u8) -> u32 {
        u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)])
    }

    /// Bit `from` of every byte of `v` moved to bit `to` (other bits cleared). 16-bit shifts
    /// spill bits across the byte boundary only outside bit `to` of either byte (from, to < 8).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bit_to(v: __m256i, from: u32, to: u32, mask: i8) -> __m256i {
        let moved = if from <= to {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128((to - from) as i32))
        } else {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128((from - to) as i32))
        };
        _mm256_and_si256(moved, _mm256_set1_epi8(mask))
    }

    /// Field `shift` of every byte: (v >> shift) & mask (shift < 8).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn field(v: __m256i, shift: u32, mask: i8) -> __m256i {
        bit_to(v, shift, 0, mask)
    }

    /// Per-lane byte shuffles that broadcast 16-bit word 2k of the low lane and word 2k+1 of the
    /// high lane (k = 0..4) when both lanes hold the same 8 words.
    const PAIR_SHUFFLE: [[u8; 32]; 4] = {
        let mut m = [[0u8; 32]; 4];
        let mut k = 0;
        while k < 4 {
            let mut i = 0;
            while i < 8 {
                m[k][2 * i] = 4 * k as u8;
                m[k][2 * i + 1] = 4 * k as u8 + 1;
                m[k][16 + 2 * i] = 4 * k as u8 + 2;
                m[k][16 + 2 * i + 1] = 4 * k as u8 + 3;
                i += 1;
            }
            k += 1;
        }
        m
    };

    /// Broadcast word `c` (0..8) of 8 words held in both lanes, to all 16 words.
    const WORD_SHUFFLE: [[u8; 32]; 8] = {
        let mut m = [[0u8; 32]; 8];
        let mut c = 0;
        while c < 8 {
            let mut i = 0;
            while i < 16 {
                m[c][2 * i] = 2 * c as u8;
                m[c][2 * i + 1] = 2 * c as u8 + 1;
                i += 1;
            }
            c += 1;
        }
        m
    };

    /// 16 i16 scales (one per 16-element sub-block) laid out for `pair_scales`: the low 8 in
    /// both lanes, and the high 8 in both lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn split_scales(s16: __m256i) -> [__m256i; 2] {
        [
            _mm256_permute2x128_si256::<0x00>(s16, s16),
            _mm256_permute2x128_si256::<0x11>(s16, s16),
        ]
    }

    /// The scale register of chunk c for 16-element sub-blocks: [sc_2c ×8 | sc_2c+1 ×8].
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pair_scales(split: &[__m256i; 2], c: usize) -> __m256i {
        let mask = load(PAIR_SHUFFLE[c % 4].as_ptr());
        _mm256_shuffle_epi8(split[c / 4], mask)
    }

    // ---- per-type block decoding: `prep` once per block, then `chunk(c)` for c in 0..8 ----

    struct Q2 {
        qs: *const u8,
        split: [__m256i; 2],
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prep_q2(b: *const u8) -> (Q2, Common) {
        let raw = _mm_loadu_si128(b as *const __m128i);
        let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), _mm_set1_epi8(0x0F));
        let common = Common {
            d: f16_at(b.add(80)),
            dmin: f16_at(b.add(82)),
            bsum_w: _mm256_cvtepu8_epi16(hi),
        };
        let split = split_scales(_mm256_cvtepu8_epi16(lo));
        (
            Q2 {
                qs: b.add(16),
                split,
            },
            common,
        )
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_q2(st: &Q2, c: usize) -> (__m256i, __m256i) {
        let q = field(load(st.qs.add(32 * (c / 4))), 2 * (c % 4) as u32, 3);
        (q, pair_scales(&st.split, c))
    }

    struct Q3 {
        hm: __m256i,
        qs: *const u8,
        split: [__m256i; 2],
    }

    /// The 16 six-bit Q3_K scales minus 32, as i8, from their 12 packed bytes: low nibbles in
    /// bytes 0..8 (sub-blocks 0..8 low nibble, 8..16 high nibble), top bits in bytes 8..12
    /// (bits 2(j/4)..+2 of byte 8 + j%4).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q3_scales(s: *const u8) -> __m128i {
        let (a0, a1, a2) = (u32_at(s), u32_at(s.add(4)), u32_at(s.add(8)));
        const LO4: u32 = 0x0F0F_0F0F;
        const LO2: u32 = 0x0303_0303;
        let v = _mm_setr_epi32(
            ((a0 & LO4) | ((a2 & LO2) << 4)) as i32,
            ((a1 & LO4) | (((a2 >> 2) & LO2) << 4)) as i32,
            (((a0 >> 4) & LO4) | (((a2 >> 4) & LO2) << 4)) as i32,
            (((a1 >> 4) & LO4) | (((a2 >> 6) & LO2) << 4)) as i32,
        );
        _mm_sub_epi8(v, _mm_set1_epi8(32))
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prep_q3(b: *const u8) -> (Q3, Common) {
        let s16 = _mm256_cvtepi8_epi16(q3_scales(b.add(96)));
        let common = Common {
            d: f16_at(b.add(108)),
            dmin: 0.0,
            bsum_w: s16,
        };
        let st = Q3 {
            hm: load(b),
            qs: b.add(32),
            split: split_scales(s16),
        };
        (st, common)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_q3(st: &Q3, c: usize) -> (__m256i, __m256i) {
        let lo = field(load(st.qs.add(32 * (c / 4))), 2 * (c % 4) as u32, 3);
        let hi = bit_to(st.hm, c as u32, 2, 4);
        (_mm256_or_si256(lo, hi), pair_scales(&st.split, c))
    }

    /// Q4_K/Q5_K's 8 six-bit scales and mins (get_scale_min_k4) as ([sc0..sc8], [m0..m8]) bytes.
    /// Safety: s..s+12 must be readable.
    #[inline]
    unsafe fn k4_scales_mins(s: *const u8) -> (u64, u64) {
        let (a0, a1, a2) = (u32_at(s), u32_at(s.add(4)), u32_at(s.add(8)));
        const LO6: u32 = 0x3F3F_3F3F;
        const LO4: u32 = 0x0F0F_0F0F;
        const LO2: u32 = 0x0303_0303;
        let sc_lo = a0 & LO6;
        let sc_hi = (a2 & LO4) | (((a0 >> 6) & LO2) << 4);
        let m_lo = a1 & LO6;
        let m_hi = ((a2 >> 4) & LO4) | (((a1 >> 6) & LO2) << 4);
        (
            sc_lo as u64 | (sc_hi as u64) << 32,
            m_lo as u64 | (m_hi as u64) << 32,
        )
    }

    struct Q45 {
        qs: *const u8,
        qh: __m256i,
        /// The 8 scales as i16 in both lanes.
        scales: __m256i,
    }

    /// Shared Q4_K/Q5_K block start; `qs_off` is where the nibbles begin.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prep_q45(b: *const u8, qs_off: usize, qh: __m256i) -> (Q45, Common) {
        let (sc, m) = k4_scales_mins(b.add(4));
        let sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
        let m16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(m as i64));
        // each min twice: the bsums are per 16 elements, the mins per 32
        let m_pairs = _mm256_set_m128i(_mm_unpackhi_epi16(m16, m16), _mm_unpacklo_epi16(m16, m16));
        let common = Common {
            d: f16_at(b),
            dmin: f16_at(b.add(2)),
            bsum_w: m_pairs,
        };
        let st = Q45 {
            qs: b.add(qs_off),
            qh,
            scales: _mm256_set_m128i(sc16, sc16),
        };
        (st, common)
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prep_q4(b: *const u8) -> (Q45, Common) {
        prep_q45(b, 16, _mm256_setzero_si256())
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prep_q5(b: *const u8) -> (Q45, Common) {
        prep_q45(b, 48, load(b.add(16)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_q4(st: &Q45, c: usize) -> (__m256i, __m256i) {
        let q = field(load(st.qs.add(32 * (c / 2))), 4 * (c % 2) as u32, 0x0F);
        let sc = _mm256_shuffle_epi8(st.scales, load(WORD_SHUFFLE[c].as_ptr()));
        (q, sc)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_q5(st: &Q45, c: usize) -> (__m256i, __m256i) {
        let (lo, sc) = chunk_q4(st, c);
        (_mm256_or_si256(lo, bit_to(st.qh, c as u32, 4, 0x10)), sc)
    }

    struct Q6 {
        ql: *const u8,
        qh: *const u8,
        split: [__m256i; 2],
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prep_q6(b: *const u8) -> (Q6, Common) {
        let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192) as *const __m128i));
        let common = Common {
            d: f16_at(b.add(208)),
            dmin: 0.0,
            bsum_w: s16,
        };
        let st = Q6 {
            ql: b,
            qh: b.add(128),
            split: split_scales(s16),
        };
        (st, common)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_q6(st: &Q6, c: usize) -> (__m256i, __m256i) {
        let (h, s) = (c / 4, c % 4);
        let lo = field(
            load(st.ql.add(64 * h + 32 * (s % 2))),
            4 * (s / 2) as u32,
            0x0F,
        );
        let qh = load(st.qh.add(32 * h));
        // the 2-bit field at bits 2s..2s+2 moved to bits 4..6
        let moved = if s <= 2 {
            _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - 2 * s as i32))
        } else {
            _mm256_srli_epi16::<2>(qh)
        };
        let hi = _mm256_and_si256(moved, _mm256_set1_epi8(0x30));
        (_mm256_or_si256(lo, hi), pair_scales(&st.split, c))
    }

    /// Horizontal sums of four 8-lane i32 vectors: lane r of the result = Σ v[r].
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce4(v: [__m256i; 4]) -> __m128i {
        let a = _mm256_hadd_epi32(v[0], v[1]);
        let b = _mm256_hadd_epi32(v[2], v[3]);
        let c = _mm256_hadd_epi32(a, b);
        _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c))
    }

    /// One kernel per type for R = 1, 4 or 8 activation rows. `$mins`: the bsums term is a min
    /// term of its own; otherwise it is the level offset, subtracted as sumi −= off·Σ sc·bsum
    /// with off = 2^`$off_shift`.
    macro_rules! kdot {
        ($name:ident, $bytes:expr, $prep:ident, $chunk:ident, $mins:expr, $off_shift:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name<const R: usize>(w: &[u8], a: [&[u8]; R]) -> [f32; R] {
                const { assert!(R == 1 || R == 4 || R == 8) };
                let n = w.len() / $bytes;
                for ar in &a {
                    assert!(ar.len() >= n * ACT_BYTES, "activation row too short");
                }
                let zero = _mm256_setzero_si256();
                let mut acc = [_mm_setzero_ps(); 2];
                for blk in 0..n {
                    // SAFETY: block `blk` < n lies inside w and inside every row (asserted).
                    let wb = w.as_ptr().add(blk * $bytes);
                    super::super::prefetch_block(wb, $bytes);
                    let ab: [*const u8; R] =
                        std::array::from_fn(|r| a[r].as_ptr().add(blk * ACT_BYTES));
                    let (st, common) = $prep(wb);
                    let mut sums = [zero; R];
                    for c in 0..8 {
                        let (q, sc) = $chunk(&st, c);
                        for r in 0..R {
                            let qa = load(ab[r].add(ACT_QS + 32 * c));
                            let p = _mm256_madd_epi16(sc, _mm256_maddubs_epi16(q, qa));
                            sums[r] = _mm256_add_epi32(sums[r], p);
                        }
                    }
                    let mut mins = [zero; R];
                    for r in 0..R {
                        let bs = load(ab[r].add(ACT_BSUMS));
                        let t = _mm256_madd_epi16(common.bsum_w, bs);
                        if $mins {
                            mins[r] = t;
                        } else {
                            let off = _mm256_slli_epi32::<{ $off_shift }>(t);
                            sums[r] = _mm256_sub_epi32(sums[r], off);
                        }
                    }
                    // lanes in groups of four (R = 8: two groups), each lane `kdot`'s own steps
                    for g in 0..R.div_ceil(4) {
                        let (s, m) = if R == 1 {
                            let x = reduce4([sums[0], mins[0], zero, zero]);
                            (x, _mm_shuffle_epi32::<1>(x))
                        } else {
                            let pick = |v: &[__m256i; R]| std::array::from_fn(|i| v[4 * g + i]);
                            let s = reduce4(pick(&sums));
                            let m = if $mins {
                                reduce4(pick(&mins))
                            } else {
                                _mm_setzero_si128()
                            };
                            (s, m)
                        };
                        let mut da = [0f32; 4];
                        for (r, dr) in da.iter_mut().enumerate().take(R.min(4)) {
                            *dr = f32::from_le_bytes(*(ab[4 * g + r] as *const [u8; 4]));
                        }
                        let da = _mm_loadu_ps(da.as_ptr());
                        // block_float's operations, lane by lane
                        let main =
                            _mm_mul_ps(_mm_mul_ps(da, _mm_set1_ps(common.d)), _mm_cvtepi32_ps(s));
                        if $mins {
                            let dm = _mm_mul_ps(da, _mm_set1_ps(common.dmin));
                            acc[g] = _mm_add_ps(
                                acc[g],
                                _mm_sub_ps(main, _mm_mul_ps(dm, _mm_cvtepi32_ps(m))),
                            );
                        } else {
                            acc[g] = _mm_add_ps(acc[g], main);
                        }
                    }
                }
                let mut out = [0f32; 8];
                _mm_storeu_ps(out.as_mut_ptr(), acc[0]);
                _mm_storeu_ps(out.as_mut_ptr().add(4), acc[1]);
                std::array::from_fn(|r| out[r])
            }
        };
    }

    /// Four weight rows against ONE activation row (generation): each activation chunk and the
    /// bsums are loaded once and meet the four rows' decoded chunks, four independent integer
    /// chains. Per row the integers are `kdot`'s exact sums (int32 adds in another order give
    /// the same value) and the float step is `kdot`'s lane for lane, so row r's result is
    /// bit-identical to `$name::<1>(w[r], [a])`.
    macro_rules! kdot_rows4 {
        ($name:ident, $bytes:expr, $prep:ident, $chunk:ident, $mins:expr, $off_shift:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                let n = w[0].len() / $bytes;
                for wr in &w {
                    assert_eq!(wr.len() / $bytes, n, "weight rows of unequal length");
                }
                assert!(a.len() >= n * ACT_BYTES, "activation row too short");
                let zero = _mm256_setzero_si256();
                let mut acc = _mm_setzero_ps();
                let ahead = super::super::rows4_prefetch_ahead(w[0].len());
                for blk in 0..n {
                    // SAFETY: block `blk` < n lies inside every weight row and the activation
                    // row (asserted above).
                    let ab = a.as_ptr().add(blk * ACT_BYTES);
                    for wr in &w {
                        let wb = wr.as_ptr().add(blk * $bytes);
                        super::super::prefetch_block_ahead(wb, $bytes, ahead);
                    }
                    let (s0, c0) = $prep(w[0].as_ptr().add(blk * $bytes));
                    let (s1, c1) = $prep(w[1].as_ptr().add(blk * $bytes));
                    let (s2, c2) = $prep(w[2].as_ptr().add(blk * $bytes));
                    let (s3, c3) = $prep(w[3].as_ptr().add(blk * $bytes));
                    let (mut t0, mut t1, mut t2, mut t3) = (zero, zero, zero, zero);
                    for c in 0..8 {
                        let qa = load(ab.add(ACT_QS + 32 * c));
                        let (q, sc) = $chunk(&s0, c);
                        t0 = _mm256_add_epi32(
                            t0,
                            _mm256_madd_epi16(sc, _mm256_maddubs_epi16(q, qa)),
                        );
                        let (q, sc) = $chunk(&s1, c);
                        t1 = _mm256_add_epi32(
                            t1,
                            _mm256_madd_epi16(sc, _mm256_maddubs_epi16(q, qa)),
                        );
                        let (q, sc) = $chunk(&s2, c);
                        t2 = _mm256_add_epi32(
                            t2,
                            _mm256_madd_epi16(sc, _mm256_maddubs_epi16(q, qa)),
                        );
                        let (q, sc) = $chunk(&s3, c);
                        t3 = _mm256_add_epi32(
                            t3,
                            _mm256_madd_epi16(sc, _mm256_maddubs_epi16(q, qa)),
                        );
                    }
                    let bs = load(ab.add(ACT_BSUMS));
                    let m = [
                        _mm256_madd_epi16(c0.bsum_w, bs),
                        _mm256_madd_epi16(c1.bsum_w, bs),
                        _mm256_madd_epi16(c2.bsum_w, bs),
                        _mm256_madd_epi16(c3.bsum_w, bs),
                    ];
                    let s = if $mins {
                        reduce4([t0, t1, t2, t3])
                    } else {
                        reduce4([
                            _mm256_sub_epi32(t0, _mm256_slli_epi32::<{ $off_shift }>(m[0])),
                            _mm256_sub_epi32(t1, _mm256_slli_epi32::<{ $off_shift }>(m[1])),
                            _mm256_sub_epi32(t2, _mm256_slli_epi32::<{ $off_shift }>(m[2])),
                            _mm256_sub_epi32(t3, _mm256_slli_epi32::<{ $off_shift }>(m[3])),
                        ])
                    };
                    let da = _mm_set1_ps(f32::from_le_bytes(*(ab as *const [u8; 4])));
                    // block_float's operations, lane r for row r (kdot's order: da·d first)
                    let d = _mm_setr_ps(c0.d, c1.d, c2.d, c3.d);
                    let main = _mm_mul_ps(_mm_mul_ps(da, d), _mm_cvtepi32_ps(s));
                    if $mins {
                        let mi = reduce4(m);
                        let dm = _mm_mul_ps(da, _mm_setr_ps(c0.dmin, c1.dmin, c2.dmin, c3.dmin));
                        acc =
                            _mm_add_ps(acc, _mm_sub_ps(main, _mm_mul_ps(dm, _mm_cvtepi32_ps(mi))));
                    } else {
                        acc = _mm_add_ps(acc, main);
                    }
                }
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), acc);
                out
            }
        };
    }

    /// Like `kdot_rows4`, but row after row inside each block (each row's decode state held
    /// only during its own 8 chunks; the activation chunks are re-read from L1): for the types
    /// whose per-block state is too large to keep four rows of it in registers.
    macro_rules! kdot_rows4_rm {
        ($name:ident, $bytes:expr, $prep:ident, $chunk:ident, $mins:expr, $off_shift:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                let n = w[0].len() / $bytes;
                for wr in &w {
                    assert_eq!(wr.len() / $bytes, n, "weight rows of unequal length");
                }
                assert!(a.len() >= n * ACT_BYTES, "activation row too short");
                let zero = _mm256_setzero_si256();
                let mut acc = _mm_setzero_ps();
                let ahead = super::super::rows4_prefetch_ahead(w[0].len());
                for blk in 0..n {
                    // SAFETY: block `blk` < n lies inside every weight row and the activation
                    // row (asserted above).
                    let ab = a.as_ptr().add(blk * ACT_BYTES);
                    let bs = load(ab.add(ACT_BSUMS));
                    let mut t = [zero; 4];
                    let mut m = [zero; 4];
                    let mut d = [0f32; 4];
                    let mut dmin = [0f32; 4];
                    for r in 0..4 {
                        let wb = w[r].as_ptr().add(blk * $bytes);
                        super::super::prefetch_block_ahead(wb, $bytes, ahead);
                        let (st, common) = $prep(wb);
                        let mut sum = zero;
                        for c in 0..8 {
                            let qa = load(ab.add(ACT_QS + 32 * c));
                            let (q, sc) = $chunk(&st, c);
                            sum = _mm256_add_epi32(
                                sum,
                                _mm256_madd_epi16(sc, _mm256_maddubs_epi16(q, qa)),
                            );
                        }
                        let mr = _mm256_madd_epi16(common.bsum_w, bs);
                        if $mins {
                            m[r] = mr;
                            t[r] = sum;
                        } else {
                            t[r] = _mm256_sub_epi32(sum, _mm256_slli_epi32::<{ $off_shift }>(mr));
                        }
                        d[r] = common.d;
                        dmin[r] = common.dmin;
                    }
                    let s = reduce4(t);
                    let da = _mm_set1_ps(f32::from_le_bytes(*(ab as *const [u8; 4])));
                    // block_float's operations, lane r for row r (kdot's order: da·d first)
                    let main =
                        _mm_mul_ps(_mm_mul_ps(da, _mm_loadu_ps(d.as_ptr())), _mm_cvtepi32_ps(s));
                    if $mins {
                        let mi = reduce4(m);
                        let dm = _mm_mul_ps(da, _mm_loadu_ps(dmin.as_ptr()));
                        acc =
                            _mm_add_ps(acc, _mm_sub_ps(main, _mm_mul_ps(dm, _mm_cvtepi32_ps(mi))));
                    } else {
                        acc = _mm_add_ps(acc, main);
                    }
                }
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), acc);
                out
            }
        };
    }

    // Measured (see the speed test): chunk by chunk pays off for Q4_K, whose per-row state is
    // small; row by row for Q2_K and Q5_K. Q3_K and Q6_K gained nothing either way (their decode,
    // done per row anyway, dominates), so they have no 4-row kernel.
    kdot_rows4!(rows4_q4_k, 144, prep_q4, chunk_q4, true, 0);
    kdot_rows4_rm!(rows4_q2_k, 84, prep_q2, chunk_q2, true, 0);
    kdot_rows4_rm!(rows4_q5_k, 176, prep_q5, chunk_q5, true, 0);

    kdot!(dot_q2_k, 84, prep_q2, chunk_q2, true, 0);
    kdot!(dot_q3_k, 110, prep_q3, chunk_q3, false, 2);
    kdot!(dot_q4_k, 144, prep_q4, chunk_q4, true, 0);
    kdot!(dot_q5_k, 176, prep_q5, chunk_q5, true, 0);
    kdot!(dot_q6_k, 210, prep_q6, chunk_q6, false, 5);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::quant::{self, testdata};

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// Unit roundoff of f32.
    const U: f64 = f32::EPSILON as f64 / 2.0;

    fn decode(ty: GgmlType, b: &[u8]) -> Decoded {
        match ty {
            GgmlType::Q2_K => Q2K::decode(b),
            GgmlType::Q3_K => Q3K::decode(b),
            GgmlType::Q4_K => Q4K::decode(b),
            GgmlType::Q5_K => Q5K::decode(b),
            GgmlType::Q6_K => Q6K::decode(b),
            _ => unreachable!(),
        }
    }

    fn block_bytes(ty: GgmlType) -> usize {
        ty.block_geometry().1
    }

    fn quantize_acts(x: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; x.len() / QK_K * ACT_BYTES];
        quantize_act_q8_k(x, &mut out);
        out
    }

    /// The activations' values d·q, exact in f64.
    fn act_values(a: &[u8]) -> Vec<f64> {
        let mut v = vec![];
        for blk in a.chunks_exact(ACT_BYTES) {
            let d = act_d(blk) as f64;
            v.extend(
                blk[ACT_QS..ACT_QS + QK_K]
                    .iter()
                    .map(|q| d * *q as i8 as f64),
            );
        }
        v
    }

    /// M = Σ_i |a_i|·(|d·sc|·(|q_i| + off) + |dmin·m|): every partial sum and product a kernel
    /// forms is bounded by M, so k roundings of f32 cost at most k·u·M (u = 2^-24, first order).
    /// `off` is the level offset where a kernel handles it apart from the levels (0: the offset
    /// is inside q_i, as in our kernels, whose integer parts are exact). ggml's AVX2 Q6_K kernel
    /// subtracts 32·Σ sc·bsum in other float lanes than the ones holding Σ sc·q_u·a, and those
    /// lanes cancel only after rounding: its error scales with off = 32 (Q3_K: 4).
    fn magnitude(ty: GgmlType, w: &[u8], a: &[u8], split_offset: bool) -> f64 {
        let off = match (split_offset, ty) {
            (true, GgmlType::Q3_K) => 4.0,
            (true, GgmlType::Q6_K) => 32.0,
            _ => 0.0,
        };
        let av = act_values(a);
        let mut m = 0f64;
        for (k, wb) in w.chunks_exact(block_bytes(ty)).enumerate() {
            let dec = decode(ty, wb);
            for i in 0..QK_K {
                let j = i / 16;
                let q = (dec.q[i] as f64 + off).abs() + off;
                let scaled = (dec.d as f64 * dec.sc[j] as f64).abs() * q;
                let min = (dec.dmin as f64 * dec.m[j] as f64).abs();
                m += av[k * QK_K + i].abs() * (scaled + min);
            }
        }
        m
    }

    /// Our kernels round each block 6 times at most (sumi and summ to f32, d_a·d, d_a·dmin, two
    /// products and the subtraction) and accumulate across nb blocks: (nb + 7)·u·M. ggml's AVX2
    /// kernel converts, scales with one FMA per block into 8 float lanes, and adds the lanes and
    /// the min term at the end: about (nb + 8)·u·M' (M' with the split offset). Their
    /// difference: within (2nb + 16)·u·M'.
    fn ggml_tolerance(nb: usize, m: f64) -> f64 {
        (2.0 * nb as f64 + 16.0) * U * m
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    fn data_path(ty: GgmlType) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/llamacpp/vec_dot")
            .join(format!("{}.gguf", ty.to_string().to_lowercase()))
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn matches_llama_cpp() {
        for ty in TYPES {
            let path = data_path(ty);
            let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let t = |name: &str| f.tensor(name).unwrap_or_else(|| panic!("{ty}: no {name}"));
            let (tw, tx, ta) = (t("w"), t("x"), t("act"));
            assert_eq!(tw.ty, ty);
            // Q8_K blocks, stored as raw bytes (I8) when the writer does not know the type
            assert!(
                ta.ty == GgmlType::Q8_K || ta.ty == GgmlType::I8,
                "{ty}: act {}",
                ta.ty
            );
            let n_cols = tw.dims[0] as usize;
            let n_rows = tw.dims[1] as usize;
            let n_tok = tx.dims[1] as usize;
            assert_eq!(n_cols % QK_K, 0);
            let nb = n_cols / QK_K;
            let (w, act) = (f.tensor_data(tw), f.tensor_data(ta));
            assert_eq!(act.len(), n_tok * nb * ACT_BYTES);
            let x = f32s(f.tensor_data(tx));
            let dot = f32s(f.tensor_data(t("dot")));
            let dot_generic = f32s(f.tensor_data(t("dot_generic")));
            assert_eq!(dot.len(), n_rows * n_tok);
            let wrow = nb * block_bytes(ty);
            let arow = nb * ACT_BYTES;

            // (a) our activation quantizer writes ggml's bytes
            let fast = kernels(ty).unwrap();
            let scalar = scalar_kernels(ty).unwrap();
            for tok in 0..n_tok {
                let mut q = vec![0u8; arow];
                (fast.quantize_act)(&x[tok * n_cols..(tok + 1) * n_cols], &mut q);
                assert!(
                    q == act[tok * arow..(tok + 1) * arow],
                    "{ty}: act row {tok}"
                );
            }

            // (b) the dots agree with ggml's AVX2 and generic kernels to float rounding
            let mut worst = 0f64;
            for r in 0..n_rows {
                let wr = &w[r * wrow..(r + 1) * wrow];
                for tok in 0..n_tok {
                    let ar = &act[tok * arow..(tok + 1) * arow];
                    let tol = ggml_tolerance(nb, magnitude(ty, wr, ar, true));
                    let want = dot[tok * n_rows + r];
                    for (k, name) in [(&fast, "fast"), (&scalar, "scalar")] {
                        let got = (k.vec_dot)(wr, ar);
                        let err = (got as f64 - want as f64).abs();
                        assert!(
                            err <= tol,
                            "{ty} {name} row {r} tok {tok}: {got} vs ggml {want}"
                        );
                        worst = worst.max(err / tol);
                    }
                    let g = dot_generic[tok * n_rows + r];
                    assert!(
                        (g as f64 - want as f64).abs() <= tol,
                        "{ty}: ggml generic {g} vs AVX2 {want} (the bound is too tight)"
                    );
                }
                for t0 in 0..n_tok {
                    let tok = |j: usize| (t0 + j) % n_tok;
                    let rows: [&[u8]; 4] =
                        std::array::from_fn(|j| &act[tok(j) * arow..(tok(j) + 1) * arow]);
                    for k in [&fast, &scalar] {
                        let four = (k.vec_dot_x4)(wr, rows);
                        for j in 0..4 {
                            let want = dot[tok(j) * n_rows + r];
                            let tol = ggml_tolerance(nb, magnitude(ty, wr, rows[j], true));
                            assert!(
                                (four[j] as f64 - want as f64).abs() <= tol,
                                "{ty} x4 row {r} tok {}: {} vs ggml {want}",
                                tok(j),
                                four[j]
                            );
                        }
                    }
                }
            }
            eprintln!(
                "{ty}: {n_rows}x{n_cols}, {n_tok} tokens; worst |ours - ggml| / bound = {worst:.3}"
            );
        }
    }

    #[test]
    fn decoded_blocks_match_the_dequantizers() {
        let n = 2 * QK_K;
        let mut rows = testdata::adversarial(n);
        rows.push(("random", testdata::heavy_tailed(5, n)));
        for ty in TYPES {
            for (name, x) in &rows {
                let wq = quant::quantize("w", x, n, ty, None).unwrap();
                let deq = quant::dequantize("w", &wq, n, ty).unwrap();
                for (k, wb) in wq.chunks_exact(block_bytes(ty)).enumerate() {
                    let dec = decode(ty, wb);
                    for i in 0..QK_K {
                        let j = i / 16;
                        let v = (dec.d * dec.sc[j] as f32) * dec.q[i] as f32
                            - dec.dmin * dec.m[j] as f32;
                        assert!(same(v, deq[k * QK_K + i]), "{ty} '{name}' element {i}");
                    }
                }
            }
        }
    }

    /// Activation rows for the random and adversarial checks.
    fn act_rows(n: usize) -> Vec<(&'static str, Vec<u8>)> {
        let mut outlier = testdata::heavy_tailed(31, n);
        outlier[n / 2 + 7] = 3.0e4;
        let tiny: Vec<f32> = testdata::gaussian(32, n)
            .iter()
            .map(|v| v * 1e-30)
            .collect();
        let rows: Vec<(&'static str, Vec<f32>)> = vec![
            ("heavy tailed", testdata::heavy_tailed(33, n)),
            ("gaussian", testdata::gaussian(34, n)),
            ("zeros", vec![0.0; n]),
            ("constant", vec![-0.75; n]),
            ("outlier", outlier),
            ("tiny", tiny),
        ];
        rows.into_iter()
            .map(|(s, x)| (s, quantize_acts(&x)))
            .collect()
    }

    /// Weight rows (quantized): random ones and testdata's adversarial set.
    fn weight_rows(ty: GgmlType, n: usize) -> Vec<(&'static str, Vec<u8>)> {
        let mut rows = testdata::adversarial(n);
        rows.push(("random a", testdata::heavy_tailed(41, n)));
        rows.push(("random b", testdata::gaussian(42, n)));
        let mut outlier = testdata::gaussian(43, n);
        outlier[5] = 50.0;
        rows.push(("huge outlier", outlier));
        rows.into_iter()
            .map(|(s, x)| (s, quant::quantize("w", &x, n, ty, None).unwrap()))
            .collect()
    }

    /// Fast == scalar bit for bit, x4 == four single calls bit for bit, and both within float
    /// rounding of the f64 dot of the dequantized rows.
    #[test]
    fn fast_scalar_x4_and_f64_reference_agree() {
        for n in [256, 512, 2816] {
            let nb = n / QK_K;
            let acts = act_rows(n);
            for ty in TYPES {
                let fast = kernels(ty).unwrap();
                let scalar = scalar_kernels(ty).unwrap();
                for (wname, wq) in weight_rows(ty, n) {
                    let wd = quant::dequantize("w", &wq, n, ty).unwrap();
                    let mut singles = vec![];
                    for (aname, aq) in &acts {
                        let what = format!("{ty} n={n} w='{wname}' a='{aname}'");
                        let f = (fast.vec_dot)(&wq, aq);
                        let s = (scalar.vec_dot)(&wq, aq);
                        assert!(same(f, s), "{what}: fast {f} != scalar {s}");
                        singles.push(s);
                        // f64 reference: the crate's dequantized weights (≤ 4 roundings each,
                        // bounded by M too) times the activations' exact values.
                        let av = act_values(aq);
                        let exact: f64 = wd.iter().zip(&av).map(|(w, a)| *w as f64 * a).sum();
                        let m = magnitude(ty, &wq, aq, false);
                        if m.is_finite() {
                            let tol = (nb as f64 + 12.0) * U * m;
                            let err = (s as f64 - exact).abs();
                            assert!(err <= tol, "{what}: {s} vs exact {exact} (tol {tol:e})");
                        }
                    }
                    for start in [0, 2] {
                        let rows: [&[u8]; 4] =
                            std::array::from_fn(|j| acts[start + j].1.as_slice());
                        for (k, name) in [(&fast, "fast"), (&scalar, "scalar")] {
                            let four = (k.vec_dot_x4)(&wq, rows);
                            for j in 0..4 {
                                assert!(
                                    same(four[j], singles[start + j]),
                                    "{ty} n={n} w='{wname}' {name} x4 lane {j}: {} vs {}",
                                    four[j],
                                    singles[start + j]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The types whose AVX2 kernel sets have a 4-weight-rows kernel.
    const ROWS4_TYPES: [GgmlType; 3] = [GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::Q5_K];

    /// The first group (and lane) where `rows4` differs from `vec_dot` row by row, bit for bit:
    /// every window of four consecutive weight rows (cyclically) against every activation row.
    fn rows4_mismatch(
        k: &DotKernels,
        rows4: Rows4Fn,
        ws: &[(&'static str, Vec<u8>)],
        acts: &[(&'static str, Vec<u8>)],
    ) -> Option<String> {
        for start in 0..ws.len() {
            let idx: [usize; 4] = std::array::from_fn(|j| (start + j) % ws.len());
            let w: [&[u8]; 4] = idx.map(|i| ws[i].1.as_slice());
            for (aname, aq) in acts {
                let four = rows4(w, aq);
                for j in 0..4 {
                    let single = (k.vec_dot)(w[j], aq);
                    if !same(four[j], single) {
                        return Some(format!(
                            "w='{}' (lane {j}) a='{aname}': 4rows {} vs vec_dot {single}",
                            ws[idx[j]].0, four[j]
                        ));
                    }
                }
            }
        }
        None
    }

    /// 4rows == vec_dot bit for bit, lane by lane, on random and adversarial rows; and the check
    /// itself catches a kernel that swaps two rows.
    #[test]
    fn x8_matches_vec_dot_bit_for_bit() {
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let Some(k) = kernels(ty) else { continue };
            let Some(x8) = k.vec_dot_x8 else {
                assert!(
                    !crate::quant::cpu::features().avx2,
                    "{ty}: AVX2 kernels have an x8 variant"
                );
                continue;
            };
            for n in [256, 2816] {
                let acts: Vec<Vec<u8>> = act_rows(n).into_iter().map(|(_, a)| a).collect();
                let oct: [&[u8]; 8] = std::array::from_fn(|j| &acts[j % acts.len()][..]);
                for (name, w) in weight_rows(ty, n) {
                    let got = x8(&w, oct);
                    for (j, g) in got.iter().enumerate() {
                        let want = (k.vec_dot)(&w, oct[j]);
                        assert_eq!(g.to_bits(), want.to_bits(), "{ty} n={n} {name} lane {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn rows4_matches_vec_dot_bit_for_bit() {
        let f = crate::quant::cpu::features();
        let avx2 = cfg!(target_arch = "x86_64") && f.avx2 && f.fma && f.f16c;
        for n in [256, 512, 2816] {
            let acts = act_rows(n);
            for ty in TYPES {
                let k = kernels(ty).unwrap();
                assert!(scalar_kernels(ty).unwrap().vec_dot_4rows.is_none());
                let Some(rows4) = k.vec_dot_4rows else {
                    assert!(
                        !(avx2 && ROWS4_TYPES.contains(&ty)),
                        "{ty}: no 4rows kernel"
                    );
                    continue;
                };
                let ws = weight_rows(ty, n);
                if let Some(e) = rows4_mismatch(&k, rows4, &ws, &acts) {
                    panic!("{ty} n={n}: {e}");
                }
                // the same check must fail for rows 1 and 2 swapped
                let swapped: Rows4Fn = match ty {
                    GgmlType::Q2_K => |w, a| swap12(kernels(GgmlType::Q2_K), w, a),
                    GgmlType::Q3_K => |w, a| swap12(kernels(GgmlType::Q3_K), w, a),
                    GgmlType::Q4_K => |w, a| swap12(kernels(GgmlType::Q4_K), w, a),
                    GgmlType::Q5_K => |w, a| swap12(kernels(GgmlType::Q5_K), w, a),
                    _ => |w, a| swap12(kernels(GgmlType::Q6_K), w, a),
                };
                assert!(
                    rows4_mismatch(&k, swapped, &ws, &acts).is_some(),
                    "{ty} n={n}: a row swap went unnoticed"
                );
            }
        }
    }

    fn swap12(k: Option<DotKernels>, w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        let v = (k.unwrap().vec_dot_4rows.unwrap())(w, a);
        [v[0], v[2], v[1], v[3]]
    }

    /// Q2_K..Q6_K get Q8_K kernels here; other types are left to the other families.
    #[test]
    fn dispatch() {
        for ty in TYPES {
            let k = kernels(ty).unwrap();
            assert_eq!(k.act_type, GgmlType::Q8_K);
            assert_eq!(k.act_row_bytes(512), 2 * ACT_BYTES);
        }
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::IQ4_XS,
            GgmlType::Q8_K,
        ] {
            assert!(
                kernels(ty).is_none() && scalar_kernels(ty).is_none(),
                "{ty}"
            );
        }
    }
}

#[cfg(test)]
mod bench {
    //! `cargo test --release --lib kquants::bench -- --ignored --nocapture`: ns per 256-element
    //! block of one long row, fast vs scalar, 1 and 4 activation rows, and vec_dot vs 4rows on four
    //! weight rows against one activation row. Also leaves the rows in
    //! /tmp/kdot_bench_* for timing ggml's kernels on the same bytes.
    use super::*;
    use crate::quant::{self, testdata};
    use std::time::Instant;

    fn time(mut f: impl FnMut() -> f32) -> f64 {
        let mut best = f64::MAX;
        let mut sink = 0f32;
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..20 {
                sink += f();
            }
            best = best.min(t.elapsed().as_secs_f64() / 20.0);
        }
        std::hint::black_box(sink);
        best
    }

    #[test]
    #[ignore]
    fn kquant_dot_speed() {
        let n = 256 * 512;
        let nb = (n / QK_K) as f64;
        let x: Vec<Vec<u8>> = (0..4)
            .map(|s| {
                let mut q = vec![0u8; n / QK_K * ACT_BYTES];
                quantize_act_q8_k(&testdata::heavy_tailed(100 + s, n), &mut q);
                q
            })
            .collect();
        std::fs::write("/tmp/kdot_bench_act", &x[0]).unwrap();
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q5_K,
            GgmlType::Q3_K,
            GgmlType::Q2_K,
        ] {
            let w = quant::quantize("w", &testdata::heavy_tailed(7, n), n, ty, None).unwrap();
            std::fs::write(
                format!("/tmp/kdot_bench_{}", ty.to_string().to_lowercase()),
                &w,
            )
            .unwrap();
            let fast = kernels(ty).unwrap();
            let scalar = scalar_kernels(ty).unwrap();
            let rows = [x[0].as_slice(), &x[1], &x[2], &x[3]];
            // four weight rows (distinct data) against one activation row, as in generation
            let ws: Vec<Vec<u8>> = (0..4)
                .map(|s| {
                    let x = testdata::heavy_tailed(200 + s, n);
                    quant::quantize("w", &x, n, ty, None).unwrap()
                })
                .collect();
            let wrows = [ws[0].as_slice(), &ws[1], &ws[2], &ws[3]];
            let w1 = time(|| wrows.iter().map(|wr| (fast.vec_dot)(wr, &x[0])).sum());
            let w4 = fast
                .vec_dot_4rows
                .map(|r4| time(|| r4(wrows, &x[0]).iter().sum()));
            let f1 = time(|| (fast.vec_dot)(&w, &x[0]));
            let f4 = time(|| (fast.vec_dot_x4)(&w, rows)[3]);
            let s1 = time(|| (scalar.vec_dot)(&w, &x[0]));
            let s4 = time(|| (scalar.vec_dot_x4)(&w, rows)[3]);
            let ns = |t: f64| t * 1e9 / nb;
            eprintln!(
                "{ty}: fast {:.1} ns/block, x4 {:.1} ns/block/row; scalar {:.1}, x4 {:.1}",
                ns(f1),
                ns(f4) / 4.0,
                ns(s1),
                ns(s4) / 4.0
            );
            match w4 {
                Some(w4) => eprintln!(
                    "{ty}: 4 weight rows: vec_dot {:.1} ns/block/row, 4rows {:.1} ({:.2}x)",
                    ns(w1) / 4.0,
                    ns(w4) / 4.0,
                    w1 / w4
                ),
                None => eprintln!("{ty}: no 4rows kernel"),
            }
        }
    }
}
