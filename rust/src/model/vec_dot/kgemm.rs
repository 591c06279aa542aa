//! Prompt-batch GEMM for k-quant weights (Q4_K, Q5_K, Q6_K) against Q8_K activations with
//! AVX512-VNNI: 16 weight rows × 4 tokens per register tile.
//!
//! Each weight super-block of 16 consecutive rows is decoded once into an interleaved form —
//! register s holds, in lane r, row r's four levels 4s..4s+4 as unsigned bytes — so one
//! `vpdpbusd` against a broadcast dword of a token's activations adds four products to each of
//! the 16 rows. The decode (gathers across the rows) is paid once per block per batch, the dot
//! products once per token, which is where ggml's repacked layouts get their speed without
//! changing the file.
//!
//! The results are bit-identical to `kquants::vec_dot` of the same row and token: per super-block
//! the integers sumi and summ are exact (int32 sums in any order are the same value) and the float
//! step is `block_float`'s, lane for lane.

// Index loops over rows, steps and sub-blocks mirror the block layouts.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{Gemm16, Gemm16Fn};
use crate::quant::cpu;
use crate::types::GgmlType;

/// One Q8_K block: d (f32) | qs[256] (i8) | bsums[16] (i16).
const ACT_BYTES: usize = 292;
const ACT_QS: usize = 4;
const ACT_BSUMS: usize = 260;

/// Rows one call multiplies.
pub const ROWS: usize = 16;

/// The 16-row GEMM for `ty`, where the CPU has AVX512-F/BW/VNNI and the type has one.
pub fn gemm16(ty: GgmlType) -> Option<Gemm16> {
    let f = cpu::features();
    if !(f.avx512f && f.avx512bw && f.avx512vnni) {
        return None;
    }
    let plain = |run: Gemm16Fn| Gemm16 { run, prepare: None };
    // SAFETY (every closure): AVX512-F, -BW and -VNNI are present, checked just above.
    Some(match ty {
        GgmlType::Q4_K => {
            plain(|w, rb, g, xs, out, st| unsafe { gemm::<Q4K>(w, rb, g, xs, out, st) })
        }
        GgmlType::Q5_K => {
            plain(|w, rb, g, xs, out, st| unsafe { gemm::<Q5K>(w, rb, g, xs, out, st) })
        }
        GgmlType::Q6_K => {
            plain(|w, rb, g, xs, out, st| unsafe { gemm::<Q6K>(w, rb, g, xs, out, st) })
        }
        GgmlType::Q8_0 => Gemm16 {
            run: |w, rb, g, xs, out, st| unsafe { gemm_q8_0(w, rb, g, xs, out, st) },
            prepare: Some(prepare_q8_0),
        },
        GgmlType::IQ4_XS => Gemm16 {
            run: |w, rb, g, xs, out, st| unsafe { gemm_iq4_xs(w, rb, g, xs, out, st) },
            prepare: Some(prepare_q8_k_i16),
        },
        _ => return None,
    })
}

/// One super-block of 16 rows, decoded: `q[s]` lane r = row r's levels 4s..4s+4 (unsigned),
/// `sc[j]` lane r = row r's scale of sub-block j, `pair[i]` lane r = the two i16 weights that meet
/// the activations' bsums 2i and 2i+1 (the mins for Q4_K/Q5_K, the scales for Q6_K's offset).
#[derive(Clone, Copy)]
struct Decoded16 {
    q: [__m512i; 64],
    sc: [__m512i; 16],
    pair: [__m512i; 8],
    d: __m512,
    dmin: __m512,
}

/// A k-quant type's block layout, as the GEMM needs it.
trait Kind {
    const BYTES: usize;
    /// Elements per scale (32 for Q4_K/Q5_K, 16 for Q6_K).
    const SUB: usize;
    /// Min term (Q4_K/Q5_K); otherwise the levels carry an offset of 32 (Q6_K).
    const MINS: bool;
    /// Fills `dec` from the block at `p` of row 0; row r's block is at p + row_off lane r.
    unsafe fn decode(p: *const u8, row_bytes: usize, row_off: __m512i, dec: &mut Decoded16);
}

/// Byte offsets of 16 consecutive rows `row_bytes` apart, one per lane (the gathers' index).
#[inline(always)]
unsafe fn row_offsets(row_bytes: usize) -> __m512i {
    _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(row_bytes as i32),
    )
}

/// The 8 float lanes of a row kernel summed lane by lane as `ops::reduce8` (and the AVX2
/// kernels' hsum) does: lanes l and l+4 first, then (0+2)+(1+3).
#[inline(always)]
unsafe fn reduce8_lanes(v: &[__m512; 8]) -> __m512 {
    let mut q = [_mm512_setzero_ps(); 4];
    for l in 0..4 {
        q[l] = _mm512_add_ps(v[l], v[l + 4]);
    }
    _mm512_add_ps(_mm512_add_ps(q[0], q[2]), _mm512_add_ps(q[1], q[3]))
}

/// The dword at byte `off` of each row's block.
#[inline(always)]
unsafe fn gather(p: *const u8, row_off: __m512i, off: usize) -> __m512i {
    _mm512_i32gather_epi32::<1>(
        _mm512_add_epi32(row_off, _mm512_set1_epi32(off as i32)),
        p as *const i32,
    )
}

/// Byte `i` (0..4) of each lane.
#[inline(always)]
unsafe fn byte(v: __m512i, i: u32) -> __m512i {
    _mm512_and_si512(
        _mm512_srlv_epi32(v, _mm512_set1_epi32(8 * i as i32)),
        _mm512_set1_epi32(0xff),
    )
}

/// Two f16 at byte `off` of each row's block (low half first) as f32 vectors.
#[inline(always)]
unsafe fn f16_pair(p: *const u8, row_off: __m512i, off: usize) -> (__m512, __m512) {
    let v = gather(p, row_off, off);
    let lo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    let hi = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v)));
    (lo, hi)
}

/// Q4_K/Q5_K's 12 scale bytes: 8 six-bit scales and mins (`get_scale_min_k4`), 16 rows at a time.
#[inline(always)]
unsafe fn scales_mins_k4(p: *const u8, row_off: __m512i, dec: &mut Decoded16) {
    let mut s = [_mm512_setzero_si512(); 3];
    for (i, si) in s.iter_mut().enumerate() {
        *si = gather(p, row_off, 4 + 4 * i);
    }
    let m63 = _mm512_set1_epi32(63);
    let m15 = _mm512_set1_epi32(15);
    for j in 0..4u32 {
        let (b0, b1, b2) = (byte(s[0], j), byte(s[1], j), byte(s[2], j));
        let sc_lo = _mm512_and_si512(b0, m63);
        let m_lo = _mm512_and_si512(b1, m63);
        let sc_hi = _mm512_or_si512(
            _mm512_and_si512(b2, m15),
            _mm512_slli_epi32::<4>(_mm512_srli_epi32::<6>(b0)),
        );
        let m_hi = _mm512_or_si512(
            _mm512_srli_epi32::<4>(b2),
            _mm512_slli_epi32::<4>(_mm512_srli_epi32::<6>(b1)),
        );
        let j = j as usize;
        dec.sc[j] = sc_lo;
        dec.sc[j + 4] = sc_hi;
        dec.pair[j] = _mm512_or_si512(m_lo, _mm512_slli_epi32::<16>(m_lo));
        dec.pair[j + 4] = _mm512_or_si512(m_hi, _mm512_slli_epi32::<16>(m_hi));
    }
}

/// 16×16 dword transpose: lane r of out[c] = lane c of rows[r]. (Loops, not closures: a closure
/// would not inherit the caller's target features, and its intrinsics would become calls.)
#[inline(always)]
unsafe fn transpose16(rows: &[__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in (0..16).step_by(2) {
        t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
    }
    // u[4i + k], 128-bit lane L: rows 4i..4i+4 of column 4L + k
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        for h in 0..2 {
            let (a, b) = (t[4 * i + h], t[4 * i + 2 + h]);
            u[4 * i + 2 * h] = _mm512_unpacklo_epi64(a, b);
            u[4 * i + 2 * h + 1] = _mm512_unpackhi_epi64(a, b);
        }
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for k in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[k], u[4 + k]);
        let v1 = _mm512_shuffle_i32x4::<0xee>(u[k], u[4 + k]);
        let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + k], u[12 + k]);
        let v3 = _mm512_shuffle_i32x4::<0xee>(u[8 + k], u[12 + k]);
        out[k] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
        out[4 + k] = _mm512_shuffle_i32x4::<0xdd>(v0, v2);
        out[8 + k] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
        out[12 + k] = _mm512_shuffle_i32x4::<0xdd>(v1, v3);
    }
    out
}

/// Dwords `off/4 .. off/4 + 16` of each of the 16 rows' blocks, transposed: lane r of out[i] is
/// row r's dword at byte off + 4i. `valid` dwords are read (the rest are zero, never touched).
#[inline(always)]
unsafe fn load_t(p: *const u8, row_bytes: usize, off: usize, valid: u32) -> [__m512i; 16] {
    let mask: __mmask16 = if valid >= 16 {
        0xffff
    } else {
        (1u16 << valid) - 1
    };
    let mut rows = [_mm512_setzero_si512(); 16];
    for (r, row) in rows.iter_mut().enumerate() {
        *row = _mm512_maskz_loadu_epi32(mask, p.add(r * row_bytes + off) as *const i32);
    }
    transpose16(&rows)
}

/// Splits 16 rows' qs dwords (`raw[u]` = bytes 4u.. of a 32-byte run) into the low- and
/// high-nibble level registers of one 64-level chunk starting at dec.q[first].
#[inline(always)]
unsafe fn nibbles(raw: &[__m512i], dec: &mut Decoded16, first: usize) {
    let m4 = _mm512_set1_epi8(0x0f);
    for (u, &v) in raw.iter().enumerate().take(8) {
        dec.q[first + u] = _mm512_and_si512(v, m4);
        dec.q[first + 8 + u] = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4);
    }
}

struct Q4K;
struct Q5K;
struct Q6K;

impl Kind for Q4K {
    const BYTES: usize = 144;
    const SUB: usize = 32;
    const MINS: bool = true;
    #[inline(always)]
    unsafe fn decode(p: *const u8, row_bytes: usize, row_off: __m512i, dec: &mut Decoded16) {
        (dec.d, dec.dmin) = f16_pair(p, row_off, 0);
        scales_mins_k4(p, row_off, dec);
        // chunk c of 64 levels: low nibbles of qs[32c..32c+32], then their high nibbles
        for half in 0..2 {
            let raw = load_t(p, row_bytes, 16 + 64 * half, 16);
            nibbles(&raw[..8], dec, 32 * half);
            nibbles(&raw[8..], dec, 32 * half + 16);
        }
    }
}

impl Kind for Q5K {
    const BYTES: usize = 176;
    const SUB: usize = 32;
    const MINS: bool = true;
    #[inline(always)]
    unsafe fn decode(p: *const u8, row_bytes: usize, row_off: __m512i, dec: &mut Decoded16) {
        (dec.d, dec.dmin) = f16_pair(p, row_off, 0);
        scales_mins_k4(p, row_off, dec);
        // bytes 16..80: qh (8 dwords) and qs[0..32]; 80..144: qs[32..96]; 144..176: qs[96..128]
        let a = load_t(p, row_bytes, 16, 16);
        let b = load_t(p, row_bytes, 80, 16);
        let c = load_t(p, row_bytes, 144, 8);
        nibbles(&a[8..], dec, 0);
        nibbles(&b[..8], dec, 16);
        nibbles(&b[8..], dec, 32);
        nibbles(&c[..8], dec, 48);
        // the fifth bit: bit 2c (low nibbles) or 2c+1 (high nibbles) of qh[4u..4u+4]
        let bit = _mm512_set1_epi8(1);
        for ch in 0..4 {
            for u in 0..8 {
                let h = a[u];
                let lo =
                    _mm512_and_si512(_mm512_srlv_epi32(h, _mm512_set1_epi32(2 * ch as i32)), bit);
                let hi = _mm512_and_si512(
                    _mm512_srlv_epi32(h, _mm512_set1_epi32(2 * ch as i32 + 1)),
                    bit,
                );
                let (i, j) = (16 * ch + u, 16 * ch + 8 + u);
                dec.q[i] = _mm512_or_si512(dec.q[i], _mm512_slli_epi32::<4>(lo));
                dec.q[j] = _mm512_or_si512(dec.q[j], _mm512_slli_epi32::<4>(hi));
            }
        }
    }
}

impl Kind for Q6K {
    const BYTES: usize = 210;
    const SUB: usize = 16;
    const MINS: bool = false;
    #[inline(always)]
    unsafe fn decode(p: *const u8, row_bytes: usize, row_off: __m512i, dec: &mut Decoded16) {
        // d is the f16 at 208: read 206..210 (never past the block) and take the high half
        let (_, d) = f16_pair(p, row_off, 206);
        dec.d = d;
        dec.dmin = _mm512_setzero_ps();
        let m4 = _mm512_set1_epi8(0x0f);
        let m2 = _mm512_set1_epi8(0x03);
        // element 128n + 32k + l: nibble (k < 2: low, else high) of ql[64n + 32(k & 1) + l],
        // bits 2k..2k+2 of qh[32n + l] on top
        let qh = load_t(p, row_bytes, 128, 16);
        for n in 0..2 {
            let ql = load_t(p, row_bytes, 64 * n, 16);
            for u in 0..8 {
                for k in 0..4 {
                    let raw = ql[8 * (k & 1) + u];
                    let nib = if k < 2 {
                        _mm512_and_si512(raw, m4)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi32::<4>(raw), m4)
                    };
                    let hb = _mm512_and_si512(
                        _mm512_srlv_epi32(qh[8 * n + u], _mm512_set1_epi32(2 * k as i32)),
                        m2,
                    );
                    dec.q[32 * n + 8 * k + u] = _mm512_or_si512(nib, _mm512_slli_epi32::<4>(hb));
                }
            }
        }
        // 16 signed 8-bit scales, in element order; pairs meet the bsums for the offset term
        let mut s = [_mm512_setzero_si512(); 4];
        for (i, si) in s.iter_mut().enumerate() {
            *si = gather(p, row_off, 192 + 4 * i);
        }
        for j in 0..16 {
            let shifted = _mm512_sllv_epi32(s[j / 4], _mm512_set1_epi32(24 - 8 * (j % 4) as i32));
            dec.sc[j] = _mm512_srai_epi32::<24>(shifted);
        }
        for i in 0..8 {
            dec.pair[i] = _mm512_or_si512(
                _mm512_and_si512(dec.sc[2 * i], _mm512_set1_epi32(0xffff)),
                _mm512_slli_epi32::<16>(dec.sc[2 * i + 1]),
            );
        }
    }
}

/// T tokens (at `a[t]`, this block's Q8_K bytes) against G decoded blocks of 16 rows each (one
/// activation broadcast feeds G row groups), added to acc[g · n_tok + t0 + t] (lane r = row r of
/// group g) with `block_float`'s float steps.
#[inline(always)]
unsafe fn tile<K: Kind, const G: usize, const T: usize>(
    dec: &[Decoded16; G],
    a: [*const u8; T],
    acc: &mut [__m512],
    t0: usize,
    n_tok: usize,
) {
    let zero = _mm512_setzero_si512();
    let steps = K::SUB / 4;
    let mut sumi = [[zero; T]; G];
    for j in 0..256 / K::SUB {
        let mut dsum = [[zero; T]; G];
        for s in 0..steps {
            let i = j * steps + s;
            let mut wq = [zero; G];
            for g in 0..G {
                wq[g] = dec[g].q[i];
            }
            for t in 0..T {
                let av =
                    _mm512_set1_epi32((a[t].add(ACT_QS + 4 * i) as *const i32).read_unaligned());
                for g in 0..G {
                    dsum[g][t] = _mm512_dpbusd_epi32(dsum[g][t], wq[g], av);
                }
            }
        }
        for g in 0..G {
            for t in 0..T {
                let scaled = _mm512_mullo_epi32(dsum[g][t], dec[g].sc[j]);
                sumi[g][t] = _mm512_add_epi32(sumi[g][t], scaled);
            }
        }
    }
    let mut bterm = [[zero; T]; G];
    for i in 0..8 {
        for t in 0..T {
            let bs =
                _mm512_set1_epi32((a[t].add(ACT_BSUMS + 4 * i) as *const i32).read_unaligned());
            for g in 0..G {
                bterm[g][t] = _mm512_dpwssd_epi32(bterm[g][t], dec[g].pair[i], bs);
            }
        }
    }
    for t in 0..T {
        let da = _mm512_set1_ps((a[t] as *const f32).read_unaligned());
        for g in 0..G {
            let dg = &dec[g];
            let o = &mut acc[g * n_tok + t0 + t];
            if K::MINS {
                let main = _mm512_mul_ps(_mm512_mul_ps(da, dg.d), _mm512_cvtepi32_ps(sumi[g][t]));
                let min =
                    _mm512_mul_ps(_mm512_mul_ps(da, dg.dmin), _mm512_cvtepi32_ps(bterm[g][t]));
                *o = _mm512_add_ps(*o, _mm512_sub_ps(main, min));
            } else {
                // levels stored +32: sumi − 32·Σ sc·bsum is the exact signed sum
                let s = _mm512_sub_epi32(sumi[g][t], _mm512_slli_epi32::<5>(bterm[g][t]));
                *o = _mm512_add_ps(
                    *o,
                    _mm512_mul_ps(_mm512_mul_ps(da, dg.d), _mm512_cvtepi32_ps(s)),
                );
            }
        }
    }
}

/// `groups` groups of 16 rows (row g·16 + r at w + (g·16 + r)·row_bytes), two at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm<K: Kind>(
    w: &[u8],
    row_bytes: usize,
    groups: usize,
    xs: &[&[u8]],
    out: &mut [f32],
    out_stride: usize,
) {
    let n_tok = xs.len();
    let nb = row_bytes / K::BYTES;
    assert!(
        groups == 0 || w.len() >= (groups * ROWS - 1) * row_bytes + nb * K::BYTES,
        "weight rows"
    );
    assert!(row_bytes * ROWS < i32::MAX as usize);
    assert!(
        xs.iter().all(|x| x.len() >= nb * ACT_BYTES),
        "activation row too short"
    );
    assert!(n_tok == 0 || groups == 0 || out.len() >= (n_tok - 1) * out_stride + groups * ROWS);
    let mut g0 = 0;
    while g0 < groups {
        let (wg, og) = (&w[g0 * ROWS * row_bytes..], &mut out[g0 * ROWS..]);
        // SAFETY (both): the groups' rows and every activation row hold nb blocks (asserted).
        if g0 + 2 <= groups {
            groups_of::<K, 2>(wg, row_bytes, nb, xs, og, out_stride);
            g0 += 2;
        } else {
            groups_of::<K, 1>(wg, row_bytes, nb, xs, og, out_stride);
            g0 += 1;
        }
    }
}

/// G groups of 16 rows against every token; the caller checked the sizes.
#[inline(always)]
unsafe fn groups_of<K: Kind, const G: usize>(
    w: &[u8],
    row_bytes: usize,
    nb: usize,
    xs: &[&[u8]],
    out: &mut [f32],
    out_stride: usize,
) {
    let n_tok = xs.len();
    let row_off = row_offsets(row_bytes);
    let mut acc = vec![_mm512_setzero_ps(); G * n_tok];
    let empty = Decoded16 {
        q: [_mm512_setzero_si512(); 64],
        sc: [_mm512_setzero_si512(); 16],
        pair: [_mm512_setzero_si512(); 8],
        d: _mm512_setzero_ps(),
        dmin: _mm512_setzero_ps(),
    };
    let mut dec = [empty; G];
    for blk in 0..nb {
        for (g, dg) in dec.iter_mut().enumerate() {
            let p = w.as_ptr().add(g * ROWS * row_bytes + blk * K::BYTES);
            K::decode(p, row_bytes, row_off, dg);
        }
        let at = |t: usize| xs[t].as_ptr().add(blk * ACT_BYTES);
        let mut t = 0;
        while t + 4 <= n_tok {
            let a = [at(t), at(t + 1), at(t + 2), at(t + 3)];
            tile::<K, G, 4>(&dec, a, &mut acc, t, n_tok);
            t += 4;
        }
        while t < n_tok {
            tile::<K, G, 1>(&dec, [at(t)], &mut acc, t, n_tok);
            t += 1;
        }
    }
    for g in 0..G {
        for t in 0..n_tok {
            let o = t * out_stride + g * ROWS;
            _mm512_storeu_ps(out[o..o + ROWS].as_mut_ptr(), acc[g * n_tok + t]);
        }
    }
}

/// Q8_0 rows × Q8_0 activations, 16 rows × 2 tokens per register tile, bit-identical to
/// `vec_dot_q8_0`: there each block adds d_w·d_a·(Σ of products 4l..4l+4) into float lane l by FMA
/// and the 8 lanes are summed by `reduce8` at the end; here step s of a block is lane s, so each
/// token keeps 8 accumulators (lane r = row r). vpdpbusd multiplies unsigned by signed bytes, so
/// the activations go in offset by +128 and each step starts from −128·Σ of its 4 weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_q8_0(
    w: &[u8],
    row_bytes: usize,
    groups: usize,
    xs: &[&[u8]],
    out: &mut [f32],
    out_stride: usize,
) {
    for g in 0..groups {
        let w = &w[g * ROWS * row_bytes..];
        gemm_q8_0_group(w, row_bytes, xs, &mut out[g * ROWS..], out_stride);
    }
}

/// Q8_0 activation rows in the form `gemm_q8_0` reads, made once per multiply: per token, the nb
/// block scales as f32, then the nb × 32 levels offset by +128 (unsigned bytes). Returns the
/// buffer and its row length.
pub fn prepare_q8_0(xs: &[&[u8]]) -> (Vec<u8>, usize) {
    let nb = xs.first().map_or(0, |x| x.len() / 34);
    let row = nb * 36;
    let mut buf = vec![0u8; xs.len() * row];
    for (x, dst) in xs.iter().zip(buf.chunks_exact_mut(row.max(1))) {
        let (scales, levels) = dst.split_at_mut(4 * nb);
        for ((blk, d), l) in x
            .chunks_exact(34)
            .zip(scales.chunks_exact_mut(4))
            .zip(levels.chunks_exact_mut(32))
        {
            let f = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            d.copy_from_slice(&f.to_le_bytes());
            // +128 on a two's-complement byte is flipping its top bit: 8 bytes at a time
            for (lo, q) in l.chunks_exact_mut(8).zip(blk[2..].chunks_exact(8)) {
                let v = u64::from_le_bytes(q.try_into().expect("8 bytes")) ^ 0x8080_8080_8080_8080;
                lo.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    (buf, row)
}

/// One group of 16 rows; `xs` are `prepare_q8_0` rows.
#[inline(always)]
unsafe fn gemm_q8_0_group(
    w: &[u8],
    row_bytes: usize,
    xs: &[&[u8]],
    out: &mut [f32],
    out_stride: usize,
) {
    const BLOCK: usize = 34;
    let n_tok = xs.len();
    let nb = row_bytes / BLOCK;
    assert!(
        w.len() >= (ROWS - 1) * row_bytes + nb * BLOCK,
        "16 weight rows"
    );
    assert!(row_bytes * ROWS < i32::MAX as usize);
    assert!(
        xs.iter().all(|x| x.len() >= nb * 36),
        "prepared activation row too short"
    );
    assert!(n_tok == 0 || out.len() >= (n_tok - 1) * out_stride + ROWS);
    let row_off = row_offsets(row_bytes);
    // every block of the 16 rows, decoded once: levels, step corrections, scales
    let mut wq = vec![_mm512_setzero_si512(); nb * 8];
    let mut start = vec![_mm512_setzero_si512(); nb * 8];
    let mut dw = vec![_mm512_setzero_ps(); nb];
    let bias = _mm512_set1_epi8(-128);
    for blk in 0..nb {
        // SAFETY: block `blk` < nb of all 16 rows lies inside w (asserted above).
        let p = w.as_ptr().add(blk * BLOCK);
        dw[blk] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(gather(p, row_off, 0)));
        let levels = load_t(p, row_bytes, 2, 8);
        for s in 0..8 {
            wq[blk * 8 + s] = levels[s];
            // −128·Σ w = Σ (−128)·w: the unsigned operand is the byte 0x80 = 128, negated after
            let corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, levels[s]);
            start[blk * 8 + s] = _mm512_sub_epi32(_mm512_setzero_si512(), corr);
        }
    }
    let mut t = 0;
    while t < n_tok {
        let pair = t + 1 < n_tok;
        let t1 = if pair { t + 1 } else { t };
        // SAFETY: rows hold nb f32 scales, then nb × 32 levels (asserted above)
        let a = [xs[t].as_ptr().add(4 * nb), xs[t1].as_ptr().add(4 * nb)];
        let das = [xs[t].as_ptr() as *const f32, xs[t1].as_ptr() as *const f32];
        let mut acc = [[_mm512_setzero_ps(); 8]; 2];
        for blk in 0..nb {
            // SAFETY: block `blk` < nb lies inside both activation rows (asserted above).
            let ab = [a[0].add(blk * 32), a[1].add(blk * 32)];
            let d = [
                _mm512_mul_ps(dw[blk], _mm512_set1_ps(das[0].add(blk).read_unaligned())),
                _mm512_mul_ps(dw[blk], _mm512_set1_ps(das[1].add(blk).read_unaligned())),
            ];
            for s in 0..8 {
                let (lv, st) = (wq[blk * 8 + s], start[blk * 8 + s]);
                for j in 0..2 {
                    let av = _mm512_set1_epi32((ab[j].add(4 * s) as *const i32).read_unaligned());
                    let lane = _mm512_dpbusd_epi32(st, av, lv);
                    acc[j][s] = _mm512_fmadd_ps(d[j], _mm512_cvtepi32_ps(lane), acc[j][s]);
                }
            }
        }
        for j in 0..if pair { 2 } else { 1 } {
            let r = reduce8_lanes(&acc[j]);
            let o = (t + j) * out_stride;
            _mm512_storeu_ps(out[o..o + ROWS].as_mut_ptr(), r);
        }
        t += 2;
    }
}

/// Q8_K activation rows as i16 for `gemm_iq4_xs`, made once per multiply: per token the nb block
/// scales d as f32, then the nb × 256 levels as little-endian i16. Returns the buffer and its row
/// length.
pub fn prepare_q8_k_i16(xs: &[&[u8]]) -> (Vec<u8>, usize) {
    let nb = xs.first().map_or(0, |x| x.len() / ACT_BYTES);
    let row = nb * (4 + 512);
    let mut buf = vec![0u8; xs.len() * row];
    for (x, dst) in xs.iter().zip(buf.chunks_exact_mut(row.max(1))) {
        let (scales, levels) = dst.split_at_mut(4 * nb);
        for ((blk, d), l) in x
            .chunks_exact(ACT_BYTES)
            .zip(scales.chunks_exact_mut(4))
            .zip(levels.chunks_exact_mut(512))
        {
            d.copy_from_slice(&blk[..4]);
            for (o, &q) in l.chunks_exact_mut(2).zip(&blk[ACT_QS..ACT_QS + 256]) {
                o.copy_from_slice(&(q as i8 as i16).to_le_bytes());
            }
        }
    }
    (buf, row)
}

/// IQ4_XS rows × Q8_K activations, 16 rows × 2 tokens per tile, bit-identical to the AVX2
/// `vec_dot` (`iquants::avx2`): there a block's 8 chunks of 32 add, per int32 lane l, the
/// products of elements 4l..4l+4 times the chunk's scale, the lanes are scaled once by d_w·d_a
/// into 8 float lanes by FMA, and summed pairwise at the end. Here weights are decoded once per
/// batch into i16 pairs (level × scale) and meet the activations as i16 with `vpdpwssd`, two
/// instructions per step of 4 elements into lane l's accumulator, so every lane integer is the
/// same; each token keeps the 8 float lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_iq4_xs(
    w: &[u8],
    row_bytes: usize,
    groups: usize,
    xs: &[&[u8]],
    out: &mut [f32],
    out_stride: usize,
) {
    for g in 0..groups {
        let w = &w[g * ROWS * row_bytes..];
        gemm_iq4_xs_group(w, row_bytes, xs, &mut out[g * ROWS..], out_stride);
    }
}

/// One group of 16 IQ4_XS rows; `xs` are `prepare_q8_k_i16` rows.
#[inline(always)]
unsafe fn gemm_iq4_xs_group(
    w: &[u8],
    row_bytes: usize,
    xs: &[&[u8]],
    out: &mut [f32],
    out_stride: usize,
) {
    const BLOCK: usize = 136;
    let n_tok = xs.len();
    let nb = row_bytes / BLOCK;
    assert!(
        w.len() >= (ROWS - 1) * row_bytes + nb * BLOCK,
        "16 weight rows"
    );
    assert!(row_bytes * ROWS < i32::MAX as usize);
    assert!(
        xs.iter().all(|x| x.len() >= nb * 516),
        "prepared activation row too short"
    );
    assert!(n_tok == 0 || out.len() >= (n_tok - 1) * out_stride + ROWS);
    let row_off = row_offsets(row_bytes);
    let table = _mm512_broadcast_i32x4(_mm_loadu_si128(
        crate::quant::iq_tables::KVALUES_IQ4NL.as_ptr() as *const __m128i,
    ));
    let (m4, odd) = (_mm512_set1_epi8(0x0f), 0xaaaa_aaaau32);
    // every block of the 16 rows, decoded once: per step s two i16-pair registers, and d
    let mut wp = vec![_mm512_setzero_si512(); nb * 128];
    let mut dw = vec![_mm512_setzero_ps(); nb];
    for blk in 0..nb {
        // SAFETY: block `blk` < nb of all 16 rows lies inside w (asserted above).
        let p = w.as_ptr().add(blk * BLOCK);
        let head = gather(p, row_off, 0);
        dw[blk] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
        let scales_h = _mm512_srli_epi32::<16>(head);
        let scales_l = gather(p, row_off, 4);
        let qs = [load_t(p, row_bytes, 8, 16), load_t(p, row_bytes, 72, 16)];
        for ib in 0..8 {
            // ls = (4 bits of scales_l | 2 bits of scales_h << 4) − 32, in both i16 halves
            let lo = _mm512_and_si512(
                _mm512_srlv_epi32(scales_l, _mm512_set1_epi32(4 * ib as i32)),
                _mm512_set1_epi32(0xf),
            );
            let hi = _mm512_and_si512(
                _mm512_srlv_epi32(scales_h, _mm512_set1_epi32(2 * ib as i32)),
                _mm512_set1_epi32(3),
            );
            let ls = _mm512_sub_epi32(
                _mm512_or_si512(lo, _mm512_slli_epi32::<4>(hi)),
                _mm512_set1_epi32(32),
            );
            let ls16 = _mm512_or_si512(
                _mm512_and_si512(ls, _mm512_set1_epi32(0xffff)),
                _mm512_slli_epi32::<16>(ls),
            );
            for l in 0..8 {
                // step 8ib + l: low (l < 4) or high nibbles of qs dword 4ib + l % 4
                let raw = qs[ib / 4][4 * (ib % 4) + l % 4];
                let nib = if l < 4 {
                    _mm512_and_si512(raw, m4)
                } else {
                    _mm512_and_si512(_mm512_srli_epi32::<4>(raw), m4)
                };
                let v = _mm512_shuffle_epi8(table, nib);
                // bytes b0..b3 of each lane -> i16 pairs (b0, b1) and (b2, b3)
                let even = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(v));
                let oddb = _mm512_srai_epi16::<8>(v);
                let pair0 = _mm512_mask_blend_epi16(odd, even, _mm512_slli_epi32::<16>(oddb));
                let pair1 = _mm512_mask_blend_epi16(odd, _mm512_srli_epi32::<16>(even), oddb);
                let s = 8 * ib + l;
                wp[blk * 128 + 2 * s] = _mm512_mullo_epi16(pair0, ls16);
                wp[blk * 128 + 2 * s + 1] = _mm512_mullo_epi16(pair1, ls16);
            }
        }
    }
    let mut t = 0;
    while t < n_tok {
        let pair = t + 1 < n_tok;
        let t1 = if pair { t + 1 } else { t };
        // SAFETY: rows hold nb f32 scales, then nb × 256 i16 levels (asserted above)
        let das = [xs[t].as_ptr() as *const f32, xs[t1].as_ptr() as *const f32];
        let a = [xs[t].as_ptr().add(4 * nb), xs[t1].as_ptr().add(4 * nb)];
        let mut acc = [[_mm512_setzero_ps(); 8]; 2];
        for blk in 0..nb {
            let mut isum = [[_mm512_setzero_si512(); 8]; 2];
            for s in 0..64 {
                let (w0, w1) = (wp[blk * 128 + 2 * s], wp[blk * 128 + 2 * s + 1]);
                for j in 0..2 {
                    let ap = a[j].add(blk * 512 + 8 * s);
                    let a0 = _mm512_set1_epi32((ap as *const i32).read_unaligned());
                    let a1 = _mm512_set1_epi32((ap.add(4) as *const i32).read_unaligned());
                    let lane = &mut isum[j][s % 8];
                    *lane = _mm512_dpwssd_epi32(*lane, w0, a0);
                    *lane = _mm512_dpwssd_epi32(*lane, w1, a1);
                }
            }
            for j in 0..2 {
                let d = _mm512_mul_ps(dw[blk], _mm512_set1_ps(das[j].add(blk).read_unaligned()));
                for l in 0..8 {
                    acc[j][l] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum[j][l]), acc[j][l]);
                }
            }
        }
        for j in 0..if pair { 2 } else { 1 } {
            // IQ4_XS's factor is 1: nothing to multiply
            let r = reduce8_lanes(&acc[j]);
            let o = (t + j) * out_stride;
            _mm512_storeu_ps(out[o..o + ROWS].as_mut_ptr(), r);
        }
        t += 2;
    }
}

/// Runs a GEMM the way `matmul` does: activations prepared first where it wants them.
#[cfg(test)]
fn run_gemm(
    g: &Gemm16,
    w: &[u8],
    rb: usize,
    groups: usize,
    xs: &[&[u8]],
    out: &mut [f32],
    stride: usize,
) {
    match g.prepare {
        Some(prepare) => {
            let (buf, row) = prepare(xs);
            let rows: Vec<&[u8]> = buf.chunks_exact(row.max(1)).collect();
            (g.run)(w, rb, groups, &rows, out, stride)
        }
        None => (g.run)(w, rb, groups, xs, out, stride),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vec_dot::kernels;
    use crate::quant::{self, testdata};

    fn vnni() -> bool {
        let f = cpu::features();
        f.avx512f && f.avx512bw && f.avx512vnni
    }

    /// 16 weight rows: random, adversarial (testdata's set) and a huge outlier, quantized.
    fn weight_matrix(ty: GgmlType, n: usize, n_rows: usize) -> Vec<u8> {
        let mut rows = testdata::adversarial(n);
        rows.push(("random a", testdata::heavy_tailed(41, n)));
        rows.push(("random b", testdata::gaussian(42, n)));
        let mut outlier = testdata::gaussian(43, n);
        outlier[5] = 50.0;
        rows.push(("huge outlier", outlier));
        let mut seed = 100;
        while rows.len() < n_rows {
            rows.push(("gaussian", testdata::gaussian(seed, n)));
            seed += 1;
        }
        rows.truncate(n_rows);
        rows.iter()
            .flat_map(|(_, x)| quant::quantize("w", x, n, ty, None).unwrap())
            .collect()
    }

    fn act_rows(n: usize, k: &crate::model::vec_dot::DotKernels) -> Vec<Vec<u8>> {
        let mut outlier = testdata::heavy_tailed(31, n);
        outlier[n / 2 + 7] = 3.0e4;
        let mut xs = vec![
            testdata::heavy_tailed(33, n),
            vec![0.0; n],
            vec![-0.75; n],
            outlier,
            testdata::gaussian(34, n)
                .iter()
                .map(|v| v * 1e-30)
                .collect(),
            vec![1e30; n],
        ];
        for s in 0..5 {
            xs.push(testdata::gaussian(200 + s, n));
        }
        xs.iter()
            .map(|x| {
                let mut q = vec![0u8; k.act_row_bytes(n)];
                (k.quantize_act)(x, &mut q);
                q
            })
            .collect()
    }

    /// Every (row, token) of the GEMM equals the type's vec_dot bit for bit, for token counts
    /// that exercise the 4-token tiles and the single-token tail.
    #[test]
    fn gemm16_matches_vec_dot_bit_for_bit() {
        if !vnni() {
            eprintln!("AVX512-VNNI absent: gemm16 is not used on this CPU, nothing to compare");
            assert!(gemm16(GgmlType::Q4_K).is_none());
            return;
        }
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::IQ4_XS,
        ] {
            let k = kernels(ty).unwrap();
            let g = gemm16(ty).unwrap();
            // 1, 2 and 3 groups of 16 rows: the single- and two-group tiles
            for (n, groups) in [(256, 3), (768, 1), (2048, 2)] {
                let n_rows = groups * ROWS;
                let w = weight_matrix(ty, n, n_rows);
                let rb = w.len() / n_rows;
                let acts = act_rows(n, &k);
                for n_tok in [1, 3, 4, 5, 11] {
                    let xs: Vec<&[u8]> = acts.iter().take(n_tok).map(|a| a.as_slice()).collect();
                    let stride = n_rows + 3;
                    let mut out = vec![f32::NAN; stride * n_tok];
                    run_gemm(&g, &w, rb, groups, &xs, &mut out, stride);
                    for r in 0..n_rows {
                        for t in 0..n_tok {
                            let want = (k.vec_dot)(&w[r * rb..(r + 1) * rb], xs[t]);
                            let got = out[t * stride + r];
                            assert!(
                                got.to_bits() == want.to_bits(),
                                "{ty:?} n={n} row {r} token {t}: gemm {got} vs vec_dot {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Raw random bytes as blocks (every bit pattern of levels, scales and mins; finite d).
    #[test]
    fn gemm16_matches_vec_dot_on_random_block_bytes() {
        if !vnni() {
            return;
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::IQ4_XS,
        ] {
            let k = kernels(ty).unwrap();
            let g = gemm16(ty).unwrap();
            let (elems, bytes) = ty.block_geometry();
            let nb = 3;
            let mut w: Vec<u8> = (0..ROWS * nb * bytes).map(|_| next() as u8).collect();
            // finite, moderate f16 scales (0x3c00 = 1.0 with random low mantissa bits)
            for blk in w.chunks_exact_mut(bytes) {
                let d_at = match ty {
                    GgmlType::Q6_K => vec![208],
                    GgmlType::Q8_0 | GgmlType::IQ4_XS => vec![0],
                    _ => vec![0, 2],
                };
                for o in d_at {
                    blk[o] = next() as u8;
                    blk[o + 1] = 0x38 | (next() as u8 & 0x03);
                }
            }
            let acts = act_rows(nb * elems, &k);
            let xs: Vec<&[u8]> = acts.iter().map(|a| a.as_slice()).collect();
            let rb = nb * bytes;
            let mut out = vec![f32::NAN; ROWS * xs.len()];
            run_gemm(&g, &w, rb, 1, &xs, &mut out, ROWS);
            for r in 0..ROWS {
                for (t, x) in xs.iter().enumerate() {
                    let want = (k.vec_dot)(&w[r * rb..(r + 1) * rb], x);
                    assert_eq!(
                        out[t * ROWS + r].to_bits(),
                        want.to_bits(),
                        "{ty:?} r{r} t{t}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::model::vec_dot::kernels;

    /// Per-block cost of decode alone (0 tokens) and with 32 tokens (one-off timing, not a test
    /// of speed: `cargo test --release --lib kgemm::speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn kgemm_speed() {
        if gemm16(GgmlType::Q4_K).is_none() {
            return;
        }
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
        ] {
            let k = kernels(ty).unwrap();
            let g = gemm16(ty).unwrap();
            let n = 2048;
            let rows = 768;
            let x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let w = crate::quant::quantize("w", &x, n, ty, None).unwrap();
            let rb = w.len() / rows;
            let mut acts = vec![0u8; 64 * k.act_row_bytes(n)];
            for a in acts.chunks_exact_mut(k.act_row_bytes(n)) {
                (k.quantize_act)(&x[..n], a);
            }
            for n_tok in [0usize, 4, 32, 64] {
                let xs: Vec<&[u8]> = acts.chunks_exact(k.act_row_bytes(n)).take(n_tok).collect();
                let mut out = vec![0f32; rows * n_tok.max(1)];
                let t0 = std::time::Instant::now();
                let reps = 20;
                for _ in 0..reps {
                    run_gemm(&g, &w, rb, rows / 16, &xs, &mut out, rows);
                }
                let blocks = (reps * rows / 16 * n / 256) as f64;
                let ns = t0.elapsed().as_nanos() as f64 / blocks;
                let gmac = (16 * 256 * n_tok) as f64 / ns;
                eprintln!("{ty:?} n_tok={n_tok}: {ns:.0} ns per 16-row block, {gmac:.1} GMAC/s");
            }
        }
    }

    /// Q8_0: this GEMM against the 2-row × 4-token tiles it replaced, interleaved runs, best of 15
    /// (`cargo test --release --lib kgemm::speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn q8_0_gemm16_vs_tiles() {
        use crate::model::vec_dot::{q8_0_act_scales, q8_0_gemm};
        let Some(g) = gemm16(GgmlType::Q8_0) else {
            return;
        };
        let k = kernels(GgmlType::Q8_0).unwrap();
        let (n, rows, n_tok) = (2048, 768, 32);
        let x: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w = crate::quant::quantize("w", &x, n, GgmlType::Q8_0, None).unwrap();
        let rb = w.len() / rows;
        let mut acts = vec![0u8; n_tok * k.act_row_bytes(n)];
        for (i, a) in acts.chunks_exact_mut(k.act_row_bytes(n)).enumerate() {
            (k.quantize_act)(&x[i * n..(i + 1) * n], a);
        }
        let xs: Vec<&[u8]> = acts.chunks_exact(k.act_row_bytes(n)).collect();
        let wrows: Vec<&[u8]> = w.chunks_exact(rb).collect();
        let mut out = vec![0f32; rows * n_tok];
        let (mut best_new, mut best_old) = (f64::MAX, f64::MAX);
        for _ in 0..15 {
            let t0 = std::time::Instant::now();
            run_gemm(&g, &w, rb, rows / 16, &xs, &mut out, rows);
            best_new = best_new.min(t0.elapsed().as_secs_f64());
            let t0 = std::time::Instant::now();
            let da = q8_0_act_scales(&xs);
            assert!(q8_0_gemm(&wrows, &xs, &da, &mut out));
            best_old = best_old.min(t0.elapsed().as_secs_f64());
        }
        let gmac = (rows * n * n_tok) as f64 * 1e-9;
        eprintln!(
            "Q8_0 {rows}x{n}, {n_tok} tokens: gemm16 {:.1} GMAC/s, 2x4 tiles {:.1} GMAC/s",
            gmac / best_new,
            gmac / best_old
        );
    }

    /// k-quants and IQ4_XS: this GEMM against the 8-token kernels it replaces (`vec_dot_x8`), interleaved
    /// runs, best of 15 (`cargo test --release --lib kgemm::speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn kquant_gemm16_vs_x8() {
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::IQ4_XS,
        ] {
            let Some(g) = gemm16(ty) else {
                return;
            };
            let k = kernels(ty).unwrap();
            let x8 = k.vec_dot_x8.unwrap();
            let (n, rows, n_tok) = (2048, 768, 32);
            let x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let w = crate::quant::quantize("w", &x, n, ty, None).unwrap();
            let rb = w.len() / rows;
            let mut acts = vec![0u8; n_tok * k.act_row_bytes(n)];
            for (i, a) in acts.chunks_exact_mut(k.act_row_bytes(n)).enumerate() {
                (k.quantize_act)(&x[i * n..(i + 1) * n], a);
            }
            let xs: Vec<&[u8]> = acts.chunks_exact(k.act_row_bytes(n)).collect();
            let mut out = vec![0f32; rows * n_tok];
            let (mut best_new, mut best_old) = (f64::MAX, f64::MAX);
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                run_gemm(&g, &w, rb, rows / 16, &xs, &mut out, rows);
                best_new = best_new.min(t0.elapsed().as_secs_f64());
                let t0 = std::time::Instant::now();
                for (r, wr) in w.chunks_exact(rb).enumerate() {
                    for (t, oct) in xs.chunks_exact(8).enumerate() {
                        let v = x8(wr, std::array::from_fn(|j| oct[j]));
                        out[r * n_tok + 8 * t..r * n_tok + 8 * t + 8].copy_from_slice(&v);
                    }
                }
                best_old = best_old.min(t0.elapsed().as_secs_f64());
            }
            let gmac = (rows * n * n_tok) as f64 * 1e-9;
            eprintln!(
                "{ty:?} {rows}x{n}, {n_tok} tokens: gemm16 {:.1} GMAC/s, x8 kernel {:.1} GMAC/s",
                gmac / best_new,
                gmac / best_old
            );
        }
    }
}
