//! AVX2 kernels. A 32-value sub-block decodes to a `Chunk`: the magnitudes |q| as u8, a sign
//! carrier (any byte with the sign of q; q = 0 only where |q| = 0) and the i16 scales of its two
//! 16-value halves. One chunk meets 32 activations in three instructions:
//! `madd(maddubs(|q|, sign(a, q)), scales)`: 8 exact int32 lanes (|q|, |a| <= 127, so the i16 pair
//! sums of maddubs stay below 2·127·127 < 2¹⁵ and cannot saturate). The lanes of a block's 8 chunks
//! are added as int32, scaled once by d_w·d_a into 8 float lanes, and the lanes summed at the end,
//! as ggml's AVX2 kernels do. The 4-row kernels decode each chunk once and add in exactly the same
//! order as the 1-row ones, so batching never changes a result.

use std::arch::x86_64::*;

use super::{u16_at, u32_at, DotKernels, Q8K_BYTES, Q8K_QS};
use crate::quant::cpu;
use crate::quant::iq_tables::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS_IQ2XS,
    KVALUES_IQ4NL,
};
use crate::types::GgmlType;

/// The AVX2 kernels for `ty`, when the CPU has AVX2, FMA and F16C.
pub fn kernels(ty: GgmlType) -> Option<DotKernels> {
    use GgmlType as T;
    let f = cpu::features();
    if !(f.avx2 && f.fma && f.f16c) {
        return None;
    }
    type Pair = (fn(&[u8], &[u8]) -> f32, fn(&[u8], [&[u8]; 4]) -> [f32; 4]);
    // SAFETY (every closure): AVX2, FMA and F16C are present, checked just above.
    let (vec_dot, vec_dot_x4): Pair = match ty {
        T::IQ4_XS => (
            |w, a| unsafe { dot_iq4_xs(w, a) },
            |w, a| unsafe { dot_iq4_xs_x4(w, a) },
        ),
        T::IQ2_XXS => (
            |w, a| unsafe { dot_iq2_xxs(w, a) },
            |w, a| unsafe { dot_iq2_xxs_x4(w, a) },
        ),
        T::IQ2_XS => (
            |w, a| unsafe { dot_iq2_xs(w, a) },
            |w, a| unsafe { dot_iq2_xs_x4(w, a) },
        ),
        T::IQ2_S => (
            |w, a| unsafe { dot_iq2_s(w, a) },
            |w, a| unsafe { dot_iq2_s_x4(w, a) },
        ),
        T::IQ3_XXS => (
            |w, a| unsafe { dot_iq3_xxs(w, a) },
            |w, a| unsafe { dot_iq3_xxs_x4(w, a) },
        ),
        T::IQ3_S => (
            |w, a| unsafe { dot_iq3_s(w, a) },
            |w, a| unsafe { dot_iq3_s_x4(w, a) },
        ),
        T::IQ1_S => (
            |w, a| unsafe { dot_iq1_s(w, a) },
            |w, a| unsafe { dot_iq1_s_x4(w, a) },
        ),
        T::IQ1_M => (
            |w, a| unsafe { dot_iq1_m(w, a) },
            |w, a| unsafe { dot_iq1_m_x4(w, a) },
        ),
        _ => return None,
    };
    Some(DotKernels {
        act_type: GgmlType::Q8_K,
        quantize_act: super::super::quantize_act_q8_k,
        vec_dot,
        vec_dot_x4,
    })
}

/// One decoded 32-value sub-block (see the module comment).
#[derive(Clone, Copy)]
struct Chunk {
    mag: __m256i,
    sgn: __m256i,
    scales: __m256i,
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

/// The i16 scale vector: `lo` for the first 16 values (low 128 bits), `hi` for the last 16.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn scales2(lo: i32, hi: i32) -> __m256i {
    // both in every 32-bit lane, then bytes 0-1 repeated in the low half and 2-3 in the high half
    let v = _mm256_set1_epi32((lo as u32 & 0xffff | (hi as u32) << 16) as i32);
    let pick = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
        2, 3,
    );
    _mm256_shuffle_epi8(v, pick)
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

// ---- per-type decoders: `d` (the block's super-scale) and `chunk` (sub-block ib < 8) ----------

#[inline]
#[target_feature(enable = "f16c")]
unsafe fn d_first(b: &[u8]) -> f32 {
    f16_to_f32(u16_at(b, 0))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq4_xs(b: &[u8], ib: usize) -> Chunk {
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
unsafe fn chunk_iq2_xxs(b: &[u8], ib: usize) -> Chunk {
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
unsafe fn chunk_iq2_xs(b: &[u8], ib: usize) -> Chunk {
    let v = [0, 1, 2, 3].map(|l| u16_at(b, 2 + 8 * ib + 2 * l) as usize);
    let (g, s) = (&IQ2XS_GRID, &KEVEN_SIGNS);
    let [lo, hi] = super::two_nibble_scales(b[66 + ib]);
    Chunk {
        mag: rows4(g[v[0] & 511], g[v[1] & 511], g[v[2] & 511], g[v[3] & 511]),
        sgn: rows4(s[v[0] >> 9], s[v[1] >> 9], s[v[2] >> 9], s[v[3] >> 9]),
        scales: scales2(lo, hi),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq2_s(b: &[u8], ib: usize) -> Chunk {
    let qh = b[66 + ib] as usize;
    let idx = [0, 1, 2, 3].map(|l| b[2 + 4 * ib + l] as usize | ((qh << (8 - 2 * l)) & 0x300));
    let g = &IQ2S_GRID;
    let [lo, hi] = super::two_nibble_scales(b[74 + ib]);
    Chunk {
        mag: rows4(g[idx[0]], g[idx[1]], g[idx[2]], g[idx[3]]),
        sgn: signs_from_bits(u32_at(b, 34 + 4 * ib)),
        scales: scales2(lo, hi),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq3_xxs(b: &[u8], ib: usize) -> Chunk {
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
        scales: _mm256_set1_epi16((2 * (aux >> 28) + 1) as i16),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq3_s(b: &[u8], ib: usize) -> Chunk {
    let q = &b[2 + 8 * ib..2 + 8 * ib + 8];
    let qh = b[66 + ib] as usize;
    let g = |k: usize| IQ3S_GRID[q[k] as usize | (((qh >> k) & 1) << 8)] as i32;
    let ls = 2 * ((b[106 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i16 + 1;
    Chunk {
        mag: _mm256_setr_epi32(g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7)),
        sgn: signs_from_bits(u32_at(b, 74 + 4 * ib)),
        scales: _mm256_set1_epi16(ls),
    }
}

/// IQ1 levels 8·g + δ from grid rows g ∈ {-1, 0, 1} (`sign(8, g)` = 8g) and per-byte δ = ±1.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq1_levels(grid: __m256i, delta: __m256i) -> __m256i {
    _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), grid), delta)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq1_s(b: &[u8], ib: usize) -> Chunk {
    let qh = u16_at(b, 34 + 2 * ib) as usize;
    let idx = [0, 1, 2, 3].map(|l| b[2 + 4 * ib + l] as usize | (((qh >> (3 * l)) & 7) << 8));
    let g = &IQ1S_GRID;
    let grid = rows4(g[idx[0]], g[idx[1]], g[idx[2]], g[idx[3]]);
    let delta = _mm256_set1_epi8(if qh & 0x8000 != 0 { -1 } else { 1 });
    let ls = 2 * ((qh >> 12) & 7) as i16 + 1;
    signed_chunk(iq1_levels(grid, delta), _mm256_set1_epi16(ls))
}

#[inline]
#[target_feature(enable = "f16c")]
unsafe fn d_iq1_m(b: &[u8]) -> f32 {
    let sc = [0, 1, 2, 3].map(|i| u16_at(b, 48 + 2 * i));
    let bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
    f16_to_f32(bits)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_iq1_m(b: &[u8], ib: usize) -> Chunk {
    let (h0, h1) = (b[32 + 2 * ib] as usize, b[33 + 2 * ib] as usize);
    let q = &b[4 * ib..4 * ib + 4];
    let g = &IQ1S_GRID;
    let grid = rows4(
        g[q[0] as usize | ((h0 & 7) << 8)],
        g[q[1] as usize | ((h0 & 0x70) << 4)],
        g[q[2] as usize | ((h1 & 7) << 8)],
        g[q[3] as usize | ((h1 & 0x70) << 4)],
    );
    // δ per 8 values: bit 3 (even groups) or bit 7 (odd groups) of qh byte 2·ib + group/2,
    // spread to bytes, set → -1, clear → +1
    let qh = _mm256_set1_epi16(u16_at(b, 32 + 2 * ib) as i16);
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        1, 1,
    );
    let bit = _mm256_setr_epi64x(
        0x0808_0808_0808_0808,
        0x8080_8080_8080_8080u64 as i64,
        0x0808_0808_0808_0808,
        0x8080_8080_8080_8080u64 as i64,
    );
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, spread), bit), bit);
    let delta = _mm256_or_si256(set, _mm256_set1_epi8(1));
    let sc = (u16_at(b, 48 + 2 * (ib / 2)) >> (6 * (ib % 2))) as i32;
    let scales = scales2(2 * (sc & 7) + 1, 2 * ((sc >> 3) & 7) + 1);
    signed_chunk(iq1_levels(grid, delta), scales)
}

// ---- the shared kernel shape ------------------------------------------------------------------

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
    ($dot:ident, $dot_x4:ident, $bytes:expr, $d:ident, $chunk:ident, $factor:expr) => {
        /// SAFETY: the CPU must have AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $dot(w: &[u8], a: &[u8]) -> f32 {
            let n = w.len() / $bytes;
            assert!(a.len() >= n * Q8K_BYTES, "activation row too short");
            let mut acc = _mm256_setzero_ps();
            for (wb, ab) in w.chunks_exact($bytes).zip(a.chunks_exact(Q8K_BYTES)) {
                let qa = ab.as_ptr().add(Q8K_QS);
                let mut isum = _mm256_setzero_si256();
                for ib in 0..8 {
                    isum = _mm256_add_epi32(isum, chunk_dot($chunk(wb, ib), qa.add(32 * ib)));
                }
                let d = _mm256_set1_ps($d(wb) * act_d(ab.as_ptr()));
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc);
            }
            hsum(acc) * $factor
        }

        /// SAFETY: the CPU must have AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $dot_x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let n = w.len() / $bytes;
            assert!(
                a.iter().all(|r| r.len() >= n * Q8K_BYTES),
                "activation row too short"
            );
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, wb) in w.chunks_exact($bytes).enumerate() {
                let ab = a.map(|r| r.as_ptr().add(i * Q8K_BYTES));
                let mut isum = [_mm256_setzero_si256(); 4];
                for ib in 0..8 {
                    let c = $chunk(wb, ib);
                    for j in 0..4 {
                        let qa = ab[j].add(Q8K_QS + 32 * ib);
                        isum[j] = _mm256_add_epi32(isum[j], chunk_dot(c, qa));
                    }
                }
                let dw = $d(wb);
                for j in 0..4 {
                    let d = _mm256_set1_ps(dw * act_d(ab[j]));
                    acc[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum[j]), acc[j]);
                }
            }
            [
                hsum(acc[0]) * $factor,
                hsum(acc[1]) * $factor,
                hsum(acc[2]) * $factor,
                hsum(acc[3]) * $factor,
            ]
        }
    };
}

kernels!(dot_iq4_xs, dot_iq4_xs_x4, 136, d_first, chunk_iq4_xs, 1.0);
kernels!(
    dot_iq2_xxs,
    dot_iq2_xxs_x4,
    66,
    d_first,
    chunk_iq2_xxs,
    0.125
);
kernels!(dot_iq2_xs, dot_iq2_xs_x4, 74, d_first, chunk_iq2_xs, 0.125);
kernels!(dot_iq2_s, dot_iq2_s_x4, 82, d_first, chunk_iq2_s, 0.125);
kernels!(
    dot_iq3_xxs,
    dot_iq3_xxs_x4,
    98,
    d_first,
    chunk_iq3_xxs,
    0.25
);
kernels!(dot_iq3_s, dot_iq3_s_x4, 110, d_first, chunk_iq3_s, 1.0);
kernels!(dot_iq1_s, dot_iq1_s_x4, 50, d_first, chunk_iq1_s, 0.125);
kernels!(dot_iq1_m, dot_iq1_m_x4, 56, d_iq1_m, chunk_iq1_m, 0.125);
