//! AVX2 kernels. A 32-value sub-block decodes to a `Chunk`: the magnitudes |q| as u8, a sign
//! carrier (any byte with the sign of q; q = 0 only where |q| = 0) and the i16 scales of its two
//! 16-value halves. One chunk meets 32 activations in three instructions:
//! `madd(maddubs(|q|, sign(a, q)), scales)`: 8 exact int32 lanes (|q|, |a| <= 127, so the i16 pair
//! sums of maddubs stay below 2·127·127 < 2¹⁵ and cannot saturate). The lanes of a block's 8 chunks
//! are added as int32, scaled once by d_w·d_a into 8 float lanes, and the lanes summed at the end,
//! as ggml's AVX2 kernels do.
//!
//! Per block, a `prep_*` function first gathers what is packed across sub-blocks (all 16 scales in
//! one vector, grid indices assembled from several fields), one block ahead of its use; `extra_*`
//! adds a per-row block term (IQ1_S's deltas against the Q8_K bsums). The 4-row kernels decode each
//! chunk once and add in exactly the same order as the 1-row ones, so batching never changes a
//! result.

use std::arch::x86_64::*;

use super::{u16_at, u32_at, DotKernels, Q8K_BYTES, Q8K_QS};
use crate::quant::cpu;
use crate::quant::iq_tables::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS_IQ2XS,
    KVALUES_IQ4NL,
};
use crate::types::GgmlType;

/// Offset of the 16 i16 sums of 16 levels in a Q8_K block.
const Q8K_BSUMS: usize = 260;

/// The AVX2 kernels for `ty`, when the CPU has AVX2, FMA and F16C.
pub fn kernels(ty: GgmlType) -> Option<DotKernels> {
    use GgmlType as T;
    let f = cpu::features();
    if !(f.avx2 && f.fma && f.f16c) {
        return None;
    }
    type Triple = (
        fn(&[u8], &[u8]) -> f32,
        fn(&[u8], [&[u8]; 4]) -> [f32; 4],
        super::super::X8Fn,
    );
    // SAFETY (every closure): AVX2, FMA and F16C are present, checked just above.
    let (vec_dot, vec_dot_x4, vec_dot_x8): Triple = match ty {
        T::IQ4_XS => (
            |w, a| unsafe { dot_iq4_xs(w, a) },
            |w, a| unsafe { dot_iq4_xs_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq4_xs_x4::<8>(w, a) },
        ),
        T::IQ2_XXS => (
            |w, a| unsafe { dot_iq2_xxs(w, a) },
            |w, a| unsafe { dot_iq2_xxs_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq2_xxs_x4::<8>(w, a) },
        ),
        T::IQ2_XS => (
            |w, a| unsafe { dot_iq2_xs(w, a) },
            |w, a| unsafe { dot_iq2_xs_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq2_xs_x4::<8>(w, a) },
        ),
        T::IQ2_S => (
            |w, a| unsafe { dot_iq2_s(w, a) },
            |w, a| unsafe { dot_iq2_s_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq2_s_x4::<8>(w, a) },
        ),
        T::IQ3_XXS => (
            |w, a| unsafe { dot_iq3_xxs(w, a) },
            |w, a| unsafe { dot_iq3_xxs_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq3_xxs_x4::<8>(w, a) },
        ),
        T::IQ3_S => (
            |w, a| unsafe { dot_iq3_s(w, a) },
            |w, a| unsafe { dot_iq3_s_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq3_s_x4::<8>(w, a) },
        ),
        T::IQ1_S => (
            |w, a| unsafe { dot_iq1_s(w, a) },
            |w, a| unsafe { dot_iq1_s_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq1_s_x4::<8>(w, a) },
        ),
        T::IQ1_M => (
            |w, a| unsafe { dot_iq1_m(w, a) },
            |w, a| unsafe { dot_iq1_m_x4::<4>(w, a) },
            |w, a| unsafe { dot_iq1_m_x4::<8>(w, a) },
        ),
        _ => return None,
    };
    Some(DotKernels {
        act_type: GgmlType::Q8_K,
        quantize_act: super::super::quantize_act_q8_k,
        vec_dot,
        vec_dot_x4,
        vec_dot_4rows: None,
        vec_dot_x8: Some(vec_dot_x8),
    })
}

/// One decoded 32-value sub-block (see the module comment).
#[derive(Clone, Copy)]
struct Chunk {
    mag: __m256i,
    sgn: __m256i,
    scales: __m256i,
}

/// What a block needs once, before its chunks: the super-scale d and, for types whose sub-block
/// scales are packed together, all 16 of them as i16 (`scales`: the 8 first-half scales in the low
/// 128 bits, the 8 second-half ones in the high 128 bits, sub-block order).
#[derive(Clone, Copy)]
struct Prep {
    d: f32,
    scales: __m256i,
}

/// vpshufb patterns repeating i16 element ib of each 128-bit half over that half.
static PICK: [[u8; 32]; 8] = pick_patterns();

const fn pick_patterns() -> [[u8; 32]; 8] {
    let mut t = [[0u8; 32]; 8];
    let mut ib = 0;
    while ib < 8 {
        let mut j = 0;
        while j < 32 {
            t[ib][j] = (2 * ib + j % 2) as u8;
            j += 1;
        }
        ib += 1;
    }
    t
}

/// Element ib of each 128-bit half of `v` (i16), repeated over the half.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pick(v: __m256i, ib: usize) -> __m256i {
    _mm256_shuffle_epi8(v, _mm256_loadu_si256(PICK[ib].as_ptr() as *const __m256i))
}

/// 2s+1 for every i16 s.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn odd(s: __m256i) -> __m256i {
    _mm256_add_epi16(_mm256_add_epi16(s, s), _mm256_set1_epi16(1))
}

/// IQ2_XS / IQ2_S: 8 scale bytes (low nibble: first 16 values, high: last 16) as 2s+1.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_scales(bytes: u64) -> __m256i {
    let v = _mm_cvtsi64_si128(bytes as i64);
    let m4 = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, m4);
    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    odd(_mm256_cvtepu8_epi16(_mm_unpacklo_epi64(lo, hi)))
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn prep_d(b: &[u8]) -> Prep {
    Prep {
        d: f16_to_f32(u16_at(b, 0)),
        scales: _mm256_setzero_si256(),
    }
}

/// ksigns_iq2xs expanded to bytes: 0xff (-1) where the sign bit is set, 0x01 elsewhere, so that
/// `_mm256_sign_epi8(a, s)` applies the 8 signs of a 7-bit index at once (ggml's keven_signs_q2xs).
static KEVEN_SIGNS: [u64; 128] = keven_signs();

const fn keven_signs() -> [u64; 128] {
    let mut t = [0u64; 128];
    let mut i = 0;
    while i < 128 {
        let s = KSIGNS_IQ2XS[i];
        let mut j = 0;
        while j < 8 {
            let byte: u64 = if (s >> j) & 1 != 0 { 0xff } else { 0x01 };
            t[i] |= byte << (8 * j);
            j += 1;
        }
        i += 1;
    }
    t
}

/// Four 8-byte grid rows (or sign rows), row 0 in the low 64 bits.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn rows4(r0: u64, r1: u64, r2: u64, r3: u64) -> __m256i {
    _mm256_set_epi64x(r3 as i64, r2 as i64, r1 as i64, r0 as i64)
}

/// 32 explicit sign bits (bit j: value j) as bytes 0xff (negative) / 0x01.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn signs_from_bits(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, spread), mask), mask);
    _mm256_or_si256(set, _mm256_set1_epi8(1))
}

/// A chunk of signed levels q (|q| <= 127): the sign carrier is q itself.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn signed_chunk(q: __m256i, scales: __m256i) -> Chunk {
    Chunk {
        mag: _mm256_sign_epi8(q, q),
        sgn: q,
        scales,
    }
}

/// An f16 stored little-endian as `bits`.
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

// ---- per-type decoders: `prep_*` (once per block) and `chunk_*` (sub-block ib < 8) -------------

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq4_xs(b: &[u8], _: &Prep, ib: usize) -> Chunk {
    let qs = _mm_loadu_si128(b[8 + 16 * ib..8 + 16 * ib + 16].as_ptr() as *const __m128i);
    let m4 = _mm_set1_epi8(0x0f);
    let nib = _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(qs, 4), m4),
        _mm_and_si128(qs, m4),
    );
    let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
    let q = _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nib);
    let ls = super::iq4xs_scale(b, ib);
    signed_chunk(q, _mm256_set1_epi16(ls as i16))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq2_xxs(b: &[u8], _: &Prep, ib: usize) -> Chunk {
    let at = 2 + 8 * ib;
    let aux = u32_at(b, at + 4) as usize;
    let g = &IQ2XXS_GRID;
    let s = &KEVEN_SIGNS;
    Chunk {
        mag: rows4(
            g[b[at] as usize],
            g[b[at + 1] as usize],
            g[b[at + 2] as usize],
            g[b[at + 3] as usize],
        ),
        sgn: rows4(
            s[aux & 127],
            s[(aux >> 7) & 127],
            s[(aux >> 14) & 127],
            s[(aux >> 21) & 127],
        ),
        scales: _mm256_set1_epi16((2 * (aux >> 28) + 1) as i16),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq2_xs(b: &[u8], p: &Prep, ib: usize) -> Chunk {
    let v = [0, 1, 2, 3].map(|l| u16_at(b, 2 + 8 * ib + 2 * l) as usize);
    let (g, s) = (&IQ2XS_GRID, &KEVEN_SIGNS);
    Chunk {
        mag: rows4(g[v[0] & 511], g[v[1] & 511], g[v[2] & 511], g[v[3] & 511]),
        sgn: rows4(s[v[0] >> 9], s[v[1] >> 9], s[v[2] >> 9], s[v[3] >> 9]),
        scales: pick(p.scales, ib),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq3_xxs(b: &[u8], p: &Prep, ib: usize) -> Chunk {
    let q = &b[2 + 8 * ib..2 + 8 * ib + 8];
    let g = |k: usize| IQ3XXS_GRID[q[k] as usize] as i32;
    let aux = u32_at(b, 66 + 4 * ib) as usize;
    let s = &KEVEN_SIGNS;
    Chunk {
        mag: _mm256_setr_epi32(g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7)),
        sgn: rows4(
            s[aux & 127],
            s[(aux >> 7) & 127],
            s[(aux >> 14) & 127],
            s[(aux >> 21) & 127],
        ),
        scales: pick(p.scales, ib),
    }
}

/// IQ3_XXS: the 8 sign-and-scale words are contiguous; scale = top 4 bits, for both halves.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn prep_iq3_xxs(b: &[u8]) -> Prep {
    let aux = _mm256_loadu_si256(b[66..98].as_ptr() as *const __m256i);
    let s = _mm256_srli_epi32(aux, 28);
    // i32 → i16 per 128-bit lane ([s0-3, s0-3 | s4-7, s4-7]), then s0-7 into both lanes
    let s = _mm256_packus_epi32(s, s);
    let s = _mm256_permute4x64_epi64(s, 0b10_00_10_00);
    Prep {
        scales: odd(s),
        ..prep_d(b)
    }
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn prep_iq2_xs(b: &[u8]) -> Prep {
    let scales = nibble_scales(u64::from_le_bytes(b[66..74].try_into().unwrap()));
    Prep {
        scales,
        ..prep_d(b)
    }
}

/// 32 grid indices qs | high << 8 (one byte of each per group, in group order) to idx[..32].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn indices32(qs: __m256i, high: __m256i, idx: &mut [u16]) {
    let lo = _mm256_unpacklo_epi8(qs, high); // groups 0-7 | 16-23
    let hi = _mm256_unpackhi_epi8(qs, high); // groups 8-15 | 24-31
    let out = idx[..32].as_mut_ptr() as *mut __m128i;
    _mm_storeu_si128(out, _mm256_castsi256_si128(lo));
    _mm_storeu_si128(out.add(1), _mm256_castsi256_si128(hi));
    _mm_storeu_si128(out.add(2), _mm256_extracti128_si256(lo, 1));
    _mm_storeu_si128(out.add(3), _mm256_extracti128_si256(hi, 1));
}

/// Row `i` of a grid, from an index assembled by a `prep_*` function.
///
/// A masked safe index (`g[i & (N - 1)]`) gets vectorized by LLVM into a vector AND plus one
/// `vpextrw` per index, which costs more than the lookup itself; the indices are in range by
/// construction instead (a low byte plus at most log2(N) - 8 high bits), checked in debug builds.
#[inline]
unsafe fn grid_row<T: Copy, const N: usize>(grid: &[T; N], i: u16) -> T {
    debug_assert!((i as usize) < N);
    // SAFETY: every prep_* function builds indices from a byte and (log2(N) - 8) masked bits.
    *grid.get_unchecked(i as usize)
}

/// Blocks whose grid indices are assembled from several fields, prepared once: d, the scales (as
/// in `Prep`) and the indices.
#[derive(Clone, Copy)]
struct PrepIdx<const N: usize> {
    d: f32,
    scales: __m256i,
    idx: [u16; N],
}

/// IQ2_S: d | qs[32] (index low bytes) | signs[32] | qh[8] (2 high index bits per group) |
/// scales[8].
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn prep_iq2_s(b: &[u8]) -> PrepIdx<32> {
    let mut p = PrepIdx {
        d: f16_to_f32(u16_at(b, 0)),
        scales: nibble_scales(u64::from_le_bytes(b[74..82].try_into().unwrap())),
        idx: [0; 32],
    };
    // the 4 two-bit fields of each qh byte, one byte each
    let w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b[66..74].as_ptr() as *const __m128i));
    let f = _mm256_or_si256(
        _mm256_or_si256(
            _mm256_and_si256(w, _mm256_set1_epi32(3)),
            _mm256_and_si256(_mm256_slli_epi32(w, 6), _mm256_set1_epi32(0x300)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_slli_epi32(w, 12), _mm256_set1_epi32(0x3_0000)),
            _mm256_and_si256(_mm256_slli_epi32(w, 18), _mm256_set1_epi32(0x300_0000)),
        ),
    );
    let qs = _mm256_loadu_si256(b[2..34].as_ptr() as *const __m256i);
    indices32(qs, f, &mut p.idx);
    p
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq2_s(b: &[u8], p: &PrepIdx<32>, ib: usize) -> Chunk {
    let i = &p.idx[4 * ib..4 * ib + 4];
    let g = |k: usize| grid_row(&IQ2S_GRID, i[k]);
    Chunk {
        mag: rows4(g(0), g(1), g(2), g(3)),
        sgn: signs_from_bits(u32_at(b, 34 + 4 * ib)),
        scales: pick(p.scales, ib),
    }
}

/// IQ3_S: d | qs[64] (index low bytes) | qh[8] (9th bits, one byte per sub-block) | signs[32] |
/// scales[4] (two 4-bit scales a byte, one per sub-block for both halves).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn prep_iq3_s(b: &[u8]) -> PrepIdx<64> {
    let v = _mm_cvtsi32_si128(u32_at(b, 106) as i32);
    let m4 = _mm_set1_epi8(0x0f);
    let s = _mm_unpacklo_epi8(
        _mm_and_si128(v, m4),
        _mm_and_si128(_mm_srli_epi16(v, 4), m4),
    );
    let s = _mm_cvtepu8_epi16(s);
    let mut p = PrepIdx {
        d: f16_to_f32(u16_at(b, 0)),
        scales: odd(_mm256_set_m128i(s, s)),
        idx: [0; 64],
    };
    // bit k of qh[ib] as byte 8·ib + k (0 or 1), sub-blocks 0-3 then 4-7
    let qh = _mm256_set1_epi64x(u64::from_le_bytes(b[66..74].try_into().unwrap()) as i64);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let one = _mm256_set1_epi8(1);
    for h in 0..2 {
        let k = 4 * h as i8;
        let spread = _mm256_setr_epi8(
            k,
            k,
            k,
            k,
            k,
            k,
            k,
            k,
            k + 1,
            k + 1,
            k + 1,
            k + 1,
            k + 1,
            k + 1,
            k + 1,
            k + 1,
            k + 2,
            k + 2,
            k + 2,
            k + 2,
            k + 2,
            k + 2,
            k + 2,
            k + 2,
            k + 3,
            k + 3,
            k + 3,
            k + 3,
            k + 3,
            k + 3,
            k + 3,
            k + 3,
        );
        let high = _mm256_min_epu8(_mm256_and_si256(_mm256_shuffle_epi8(qh, spread), bit), one);
        let qs = _mm256_loadu_si256(b[2 + 32 * h..34 + 32 * h].as_ptr() as *const __m256i);
        indices32(qs, high, &mut p.idx[32 * h..]);
    }
    p
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq3_s(b: &[u8], p: &PrepIdx<64>, ib: usize) -> Chunk {
    let i = &p.idx[8 * ib..8 * ib + 8];
    let g = |k: usize| grid_row(&IQ3S_GRID, i[k]) as i32;
    Chunk {
        mag: _mm256_setr_epi32(g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7)),
        sgn: signs_from_bits(u32_at(b, 74 + 4 * ib)),
        scales: pick(p.scales, ib),
    }
}

/// IQ1_M blocks, prepared once: d, the 16 scales (as `Prep::scales`), the 32 grid indices (11 bits)
/// of the 8-value groups, and their deltas ±1 as bytes.
#[derive(Clone, Copy)]
struct PrepIq1 {
    d: f32,
    scales: __m256i,
    idx: [u16; 32],
    delta: [i8; 32],
}

/// IQ1_S, prepared once: d, the grid part's scales 8·(2s+1) (as `Prep::scales`), the per-16
/// delta terms (2s+1)·δ in Q8_K bsums order, and the 32 grid indices.
#[derive(Clone, Copy)]
struct PrepIq1S {
    d: f32,
    scales: __m256i,
    deltas: __m256i,
    idx: [u16; 32],
}

/// IQ1_S: qs[32] | qh[8] u16: per sub-block 4 × 3 index bits, a 3-bit scale (bits 12-14) and the
/// delta sign (bit 15). As ggml does, the delta meets the activations' 16-value sums (bsums):
/// Σ ls·(8g + δ)·a = Σ 8·ls·g·a + Σ_halves ls·δ·bsum.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn prep_iq1_s(b: &[u8]) -> PrepIq1S {
    let qh = _mm_loadu_si128(b[34..50].as_ptr() as *const __m128i);
    let ls = _mm_or_si128(
        _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(qh, 12), _mm_set1_epi16(7)), 1),
        _mm_set1_epi16(1),
    );
    let neg = _mm_srai_epi16(qh, 15);
    let lsd = _mm_sub_epi16(_mm_xor_si128(ls, neg), neg); // ls·δ
    let scales = _mm_slli_epi16(ls, 3);
    // the 4 three-bit fields of each word, one byte each: bits 0-2, 8-10, 16-18, 24-26
    let w = _mm256_cvtepu16_epi32(qh);
    let f = _mm256_or_si256(
        _mm256_or_si256(
            _mm256_and_si256(w, _mm256_set1_epi32(7)),
            _mm256_and_si256(_mm256_slli_epi32(w, 5), _mm256_set1_epi32(0x700)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_slli_epi32(w, 10), _mm256_set1_epi32(0x7_0000)),
            _mm256_and_si256(_mm256_slli_epi32(w, 15), _mm256_set1_epi32(0x700_0000)),
        ),
    );
    let mut p = PrepIq1S {
        d: f16_to_f32(u16_at(b, 0)),
        scales: _mm256_set_m128i(scales, scales),
        deltas: _mm256_set_m128i(_mm_unpackhi_epi16(lsd, lsd), _mm_unpacklo_epi16(lsd, lsd)),
        idx: [0; 32],
    };
    let qs = _mm256_loadu_si256(b[2..34].as_ptr() as *const __m256i);
    indices32(qs, f, &mut p.idx);
    p
}

/// IQ1_S chunk ib: |g| and g of the grid rows, scale 8·ls.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq1_s(_: &[u8], p: &PrepIq1S, ib: usize) -> Chunk {
    let i = &p.idx[4 * ib..4 * ib + 4];
    let g = |k: usize| grid_row(&IQ1S_GRID, i[k]);
    signed_chunk(rows4(g(0), g(1), g(2), g(3)), pick(p.scales, ib))
}

/// IQ1_S's delta terms against one activation block's bsums (exact: |bsum| <= 16·127).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn extra_iq1_s(p: &PrepIq1S, a: *const u8) -> __m256i {
    // SAFETY (caller): `a` starts a whole Q8_K block, so its 32 bytes of bsums are readable.
    let bsums = _mm256_loadu_si256(a.add(Q8K_BSUMS) as *const __m256i);
    _mm256_madd_epi16(bsums, p.deltas)
}

/// IQ1_M: qs[32] | qh[16] (per group: 3 index bits and the delta sign, two groups a byte) |
/// scales (4 u16: 3-bit scales at bits 0/3 for sub-block 2w's halves and 6/9 for 2w+1, the f16
/// super-scale in the top nibbles).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn prep_iq1_m(b: &[u8]) -> PrepIq1 {
    let sc = [0, 1, 2, 3].map(|i| u16_at(b, 48 + 2 * i));
    let bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
    let v = _mm256_set1_epi64x(u64::from_le_bytes(b[48..56].try_into().unwrap()) as i64);
    // low half: fields 0 (even sub-blocks) and 6 (odd), high half: fields 3 and 9; interleaved
    // per word they come out in sub-block order
    let even = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 3, 3));
    let odd_ = _mm256_srlv_epi64(v, _mm256_setr_epi64x(6, 6, 9, 9));
    let s = _mm256_and_si256(_mm256_unpacklo_epi16(even, odd_), _mm256_set1_epi16(7));
    let mut p = PrepIq1 {
        d: f16_to_f32(bits),
        scales: odd(s),
        idx: [0; 32],
        delta: [0; 32],
    };
    let qh = _mm_loadu_si128(b[32..48].as_ptr() as *const __m128i);
    let m7 = _mm_set1_epi8(7);
    let (lo, hi) = (
        _mm_and_si128(qh, m7),
        _mm_and_si128(_mm_srli_epi16(qh, 4), m7),
    );
    let high = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
    let qs = _mm256_loadu_si256(b[..32].as_ptr() as *const __m256i);
    indices32(qs, high, &mut p.idx);
    // delta signs: bit 3 (even groups) and bit 7 (odd groups)
    let (b3, b7) = (_mm_set1_epi8(0x08), _mm_set1_epi8(0x80u8 as i8));
    let n3 = _mm_cmpeq_epi8(_mm_and_si128(qh, b3), b3);
    let n7 = _mm_cmpeq_epi8(_mm_and_si128(qh, b7), b7);
    let neg = _mm256_set_m128i(_mm_unpackhi_epi8(n3, n7), _mm_unpacklo_epi8(n3, n7));
    let delta = _mm256_or_si256(neg, _mm256_set1_epi8(1));
    _mm256_storeu_si256(p.delta.as_mut_ptr() as *mut __m256i, delta);
    p
}

/// IQ1 chunk ib: levels 8·g + δ from grid rows g ∈ {-1, 0, 1} (`sign(8, g)` = 8g), δ = ±1 per
/// 8-value group.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq1(p: &PrepIq1, ib: usize) -> Chunk {
    let i = &p.idx[4 * ib..4 * ib + 4];
    let g = |k: usize| grid_row(&IQ1S_GRID, i[k]);
    let grid = rows4(g(0), g(1), g(2), g(3));
    let d4 = u32::from_le_bytes([0, 1, 2, 3].map(|l| p.delta[4 * ib + l] as u8));
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let delta = _mm256_shuffle_epi8(_mm256_set1_epi32(d4 as i32), spread);
    let levels = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), grid), delta);
    signed_chunk(levels, pick(p.scales, ib))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq1_m(_: &[u8], p: &PrepIq1, ib: usize) -> Chunk {
    chunk_iq1(p, ib)
}

// ---- the shared kernel shape ------------------------------------------------------------------

/// No per-row block term.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn no_extra<P>(_: &P, _: *const u8) -> __m256i {
    _mm256_setzero_si256()
}

/// 8 exact int32 lane sums of one chunk against 32 activation levels at `a`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_dot(c: Chunk, a: *const u8) -> __m256i {
    let qa = _mm256_loadu_si256(a as *const __m256i);
    let pairs = _mm256_maddubs_epi16(c.mag, _mm256_sign_epi8(qa, c.sgn));
    _mm256_madd_epi16(pairs, c.scales)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
}

/// The f32 d of the Q8_K block at `a`.
#[inline]
unsafe fn act_d(a: *const u8) -> f32 {
    (a as *const f32).read_unaligned()
}

// (1-row kernel, 4-row kernel, block bytes, d, chunk decoder, FACTOR). The callers' slices are
// checked here, so the raw-pointer reads below stay in bounds: n whole weight blocks, and at least
// n Q8_K blocks in every activation row.
macro_rules! kernels {
    ($dot:ident, $dot_x4:ident, $bytes:expr, $prep:ident, $chunk:ident, $extra:ident, $factor:expr) => {
        /// SAFETY: the CPU must have AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $dot(w: &[u8], a: &[u8]) -> f32 {
            let n = w.len() / $bytes;
            assert!(a.len() >= n * Q8K_BYTES, "activation row too short");
            let mut acc = _mm256_setzero_ps();
            if n == 0 {
                return 0.0;
            }
            // Each block is prepared one iteration ahead: a prep that stores indices for its
            // chunks to load then has long retired (no store-forwarding stall per block).
            let mut next = $prep(&w[..$bytes]);
            for (i, (wb, ab)) in w
                .chunks_exact($bytes)
                .zip(a.chunks_exact(Q8K_BYTES))
                .enumerate()
            {
                let qa = ab.as_ptr().add(Q8K_QS);
                super::super::prefetch_block(wb.as_ptr(), $bytes);
                let p = next;
                if i + 1 < n {
                    next = $prep(&w[(i + 1) * $bytes..(i + 2) * $bytes]);
                }
                let mut isum = _mm256_setzero_si256();
                for ib in 0..8 {
                    isum = _mm256_add_epi32(isum, chunk_dot($chunk(wb, &p, ib), qa.add(32 * ib)));
                }
                isum = _mm256_add_epi32(isum, $extra(&p, ab.as_ptr()));
                let d = _mm256_set1_ps(p.d * act_d(ab.as_ptr()));
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc);
            }
            hsum(acc) * $factor
        }

        /// R activation rows (4 or 8), each weight chunk decoded once for all; every row's sums
        /// are the 1-row kernel's. SAFETY: the CPU must have AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $dot_x4<const R: usize>(w: &[u8], a: [&[u8]; R]) -> [f32; R] {
            let n = w.len() / $bytes;
            assert!(
                a.iter().all(|r| r.len() >= n * Q8K_BYTES),
                "activation row too short"
            );
            let mut acc = [_mm256_setzero_ps(); R];
            if n == 0 {
                return [0.0; R];
            }
            let mut next = $prep(&w[..$bytes]); // one block ahead, as in the 1-row kernel
            for (i, wb) in w.chunks_exact($bytes).enumerate() {
                let ab = a.map(|r| r.as_ptr().add(i * Q8K_BYTES));
                let p = next;
                if i + 1 < n {
                    next = $prep(&w[(i + 1) * $bytes..(i + 2) * $bytes]);
                }
                let mut isum = [_mm256_setzero_si256(); R];
                for ib in 0..8 {
                    let c = $chunk(wb, &p, ib);
                    for j in 0..R {
                        let qa = ab[j].add(Q8K_QS + 32 * ib);
                        isum[j] = _mm256_add_epi32(isum[j], chunk_dot(c, qa));
                    }
                }
                let dw = p.d;
                for j in 0..R {
                    isum[j] = _mm256_add_epi32(isum[j], $extra(&p, ab[j]));
                    let d = _mm256_set1_ps(dw * act_d(ab[j]));
                    acc[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum[j]), acc[j]);
                }
            }
            let mut out = [0f32; R];
            for j in 0..R {
                out[j] = hsum(acc[j]) * $factor;
            }
            out
        }
    };
}

kernels!(
    dot_iq4_xs,
    dot_iq4_xs_x4,
    136,
    prep_d,
    chunk_iq4_xs,
    no_extra,
    1.0
);
kernels!(
    dot_iq2_xxs,
    dot_iq2_xxs_x4,
    66,
    prep_d,
    chunk_iq2_xxs,
    no_extra,
    0.125
);
kernels!(
    dot_iq2_xs,
    dot_iq2_xs_x4,
    74,
    prep_iq2_xs,
    chunk_iq2_xs,
    no_extra,
    0.125
);
kernels!(
    dot_iq2_s,
    dot_iq2_s_x4,
    82,
    prep_iq2_s,
    chunk_iq2_s,
    no_extra,
    0.125
);
kernels!(
    dot_iq3_xxs,
    dot_iq3_xxs_x4,
    98,
    prep_iq3_xxs,
    chunk_iq3_xxs,
    no_extra,
    0.25
);
kernels!(
    dot_iq3_s,
    dot_iq3_s_x4,
    110,
    prep_iq3_s,
    chunk_iq3_s,
    no_extra,
    1.0
);
kernels!(
    dot_iq1_s,
    dot_iq1_s_x4,
    50,
    prep_iq1_s,
    chunk_iq1_s,
    extra_iq1_s,
    0.125
);
kernels!(
    dot_iq1_m,
    dot_iq1_m_x4,
    56,
    prep_iq1_m,
    chunk_iq1_m,
    no_extra,
    0.125
);
