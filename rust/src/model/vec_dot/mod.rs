//! Quantized dot products: weight rows stay in their block format and meet activations quantized
//! once per matmul call, like ggml's CPU backend (its `vec_dot_type`). This is both the fast path
//! and what makes results track llama.cpp's closely.
//!
//! Q8_0 weights × Q8_0 activations: per block of 32, an exact int32 sum of int8 products scaled by
//! the two f16 scales.

use half::f16;

use crate::quant::cpu;
use crate::types::GgmlType;

mod iquants;
#[cfg(target_arch = "x86_64")]
pub mod kgemm;
mod kquants;
#[cfg(target_arch = "aarch64")]
mod neon;

/// Four weight rows against one quantized activation row.
pub type Rows4Fn = fn([&[u8]; 4], &[u8]) -> [f32; 4];

/// The integer dot kernels of one weight type, as ggml pairs a type with its `vec_dot_type`.
#[derive(Clone, Copy)]
pub struct DotKernels {
    /// Format the activations are quantized to once per matmul call: Q8_0, Q8_1 or Q8_K.
    pub act_type: GgmlType,
    pub quantize_act: fn(&[f32], &mut [u8]),
    /// One weight row (its blocks as stored) against one quantized activation row.
    pub vec_dot: fn(&[u8], &[u8]) -> f32,
    /// One weight row against four activation rows (weight blocks decoded once).
    pub vec_dot_x4: fn(&[u8], [&[u8]; 4]) -> [f32; 4],
    /// Four weight rows against one activation row, each bit-identical to `vec_dot` (for
    /// generation, where there is one token); None: `vec_dot` row by row.
    pub vec_dot_4rows: Option<Rows4Fn>,
    /// One weight row against eight activation rows, each bit-identical to `vec_dot` (prompt
    /// batches: the weight blocks are decoded once per 8 tokens); None: `vec_dot_x4`.
    pub vec_dot_x8: Option<X8Fn>,
}

/// One weight row against eight quantized activation rows.
pub type X8Fn = fn(&[u8], [&[u8]; 8]) -> [f32; 8];

/// `groups` × 16 consecutive weight rows (`row_bytes` apart) against a batch of quantized
/// activation rows: out[t · out_stride + r], each bit-identical to `vec_dot` of row r and token t.
pub type Gemm16Fn =
    fn(w: &[u8], row_bytes: usize, groups: usize, xs: &[&[u8]], out: &mut [f32], out_stride: usize);

/// Puts a batch of quantized activation rows into the form a `Gemm16Fn` reads (once per multiply);
/// returns the buffer and its row length.
pub type PrepareFn = fn(xs: &[&[u8]]) -> (Vec<u8>, usize);

/// A prompt GEMM: `run` reads the activation rows as quantized, or as `prepare` makes them.
#[derive(Clone, Copy)]
pub struct Gemm16 {
    pub run: Gemm16Fn,
    pub prepare: Option<PrepareFn>,
}

/// The 16-row prompt GEMM for `ty` where the CPU has one (AVX512-VNNI: Q4_K, Q5_K, Q6_K, Q8_0).
pub fn kquant_gemm16(ty: GgmlType) -> Option<Gemm16> {
    #[cfg(target_arch = "x86_64")]
    return kgemm::gemm16(ty);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

impl DotKernels {
    /// Bytes of one quantized activation row of `n_cols` values.
    pub fn act_row_bytes(&self, n_cols: usize) -> usize {
        let (block, bytes) = self.act_type.block_geometry();
        n_cols / block * bytes
    }
}

/// The integer kernels for `ty`, or None where its rows are converted to f32 instead.
pub fn kernels(ty: GgmlType) -> Option<DotKernels> {
    if ty == GgmlType::Q8_0 {
        return Some(DotKernels {
            act_type: GgmlType::Q8_0,
            quantize_act: quantize_act_q8_0,
            vec_dot: vec_dot_q8_0,
            vec_dot_x4: vec_dot_q8_0_x4,
            vec_dot_4rows: q8_0_4rows(),
            vec_dot_x8: None,
        });
    }
    if let Some((act_bytes, quantize_act, vec_dot, vec_dot_x4)) = legacy_kernels(ty) {
        let act_type = if act_bytes == Q8_1_BLOCK {
            GgmlType::Q8_1
        } else {
            GgmlType::Q8_0
        };
        return Some(DotKernels {
            act_type,
            quantize_act,
            vec_dot,
            vec_dot_x4,
            vec_dot_4rows: None,
            vec_dot_x8: None,
        });
    }
    kquants::kernels(ty).or_else(|| iquants::kernels(ty))
}

fn q8_0_4rows() -> Option<Rows4Fn> {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.fma && f.f16c {
            // SAFETY: AVX2, FMA and F16C are present (checked just above).
            return Some(|w, a| unsafe { avx2::vec_dot_q8_0_4rows(w, a) });
        }
    }
    #[cfg(target_arch = "aarch64")]
    if cpu::arm_features().neon {
        // SAFETY: NEON is present (checked just above).
        return Some(|w, a| unsafe { neon::vec_dot_q8_0_4rows(w, a) });
    }
    None
}

/// Q8_0 rows × Q8_0 activations for a batch, in tiles of 2 rows × 4 tokens: activation scales
/// as f32 from `q8_0_act_scales` (once per multiply), weight blocks loaded once per 4 tokens and
/// activation blocks once per 2 rows, with AVX512-VNNI's `vpdpbusd` where the CPU has it. Every value is bit-identical to
/// `vec_dot_q8_0` of its row and token (same integer sums, same float steps). Writes
/// out[i * n_tok + t]; returns false (nothing written) where AVX2/FMA/F16C are missing.
pub fn q8_0_gemm(wrows: &[&[u8]], xs: &[&[u8]], da: &[f32], out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.fma && f.f16c {
            let n_tok = xs.len();
            let nb = xs.first().map_or(0, |x| x.len() / BLOCK);
            let quads = n_tok / 4;
            assert_eq!(
                da.len(),
                quads * nb * 4,
                "q8_0_act_scales of these activations"
            );
            let pairs = wrows.len() / 2;
            for q in 0..quads {
                let quad = [xs[4 * q], xs[4 * q + 1], xs[4 * q + 2], xs[4 * q + 3]];
                let dq = &da[q * nb * 4..(q + 1) * nb * 4];
                for p in 0..pairs {
                    let pair = [wrows[2 * p], wrows[2 * p + 1]];
                    // SAFETY (both): the features were checked above; rows and activations hold
                    // nb blocks (asserted inside).
                    let v = if f.avx512vnni {
                        unsafe { gemm::tile_vnni(pair, quad, dq) }
                    } else {
                        unsafe { gemm::tile_avx2(pair, quad, dq) }
                    };
                    for (r, vr) in v.iter().enumerate() {
                        let i = 2 * p + r;
                        out[i * n_tok + 4 * q..i * n_tok + 4 * q + 4].copy_from_slice(vr);
                    }
                }
                if wrows.len() % 2 == 1 {
                    let i = wrows.len() - 1;
                    let v = vec_dot_q8_0_x4(wrows[i], quad);
                    out[i * n_tok + 4 * q..i * n_tok + 4 * q + 4].copy_from_slice(&v);
                }
            }
            for t in 4 * quads..n_tok {
                for (i, wr) in wrows.iter().enumerate() {
                    out[i * n_tok + t] = vec_dot_q8_0(wr, xs[t]);
                }
            }
            return true;
        }
    }
    let _ = (wrows, xs, da, out);
    false
}

/// The activation scales `q8_0_gemm` reads, as f32, converted once per multiply:
/// da[(q · nb + b) · 4 + t] is token 4q+t's scale of block b (whole quads of tokens only).
pub fn q8_0_act_scales(xs: &[&[u8]]) -> Vec<f32> {
    let nb = xs.first().map_or(0, |x| x.len() / BLOCK);
    let quads = xs.len() / 4;
    let mut da = vec![0f32; quads * nb * 4];
    for (i, d) in da.iter_mut().enumerate() {
        let (q, b, t) = (i / (4 * nb), (i / 4) % nb, i % 4);
        *d = scale(&xs[4 * q + t][b * BLOCK..]);
    }
    da
}

#[cfg(target_arch = "x86_64")]
mod gemm {
    use std::arch::x86_64::*;

    use super::avx2::{f16_scale, hsum};
    use super::BLOCK;

    macro_rules! tile {
        ($name:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(w: [&[u8]; 2], a: [&[u8]; 4], da: &[f32]) -> [[f32; 4]; 2] {
                let nb = da.len() / 4;
                assert!(
                    w.iter().all(|r| r.len() >= nb * BLOCK)
                        && a.iter().all(|r| r.len() >= nb * BLOCK)
                );
                let mut acc = [[_mm256_setzero_ps(); 4]; 2];
                for b in 0..nb {
                    let qa: [__m256i; 4] = std::array::from_fn(|t| {
                        _mm256_loadu_si256(a[t].as_ptr().add(b * BLOCK + 2) as *const __m256i)
                    });
                    for r in 0..2 {
                        let wb = w[r].as_ptr().add(b * BLOCK);
                        let qw = _mm256_loadu_si256(wb.add(2) as *const __m256i);
                        let abs_w = _mm256_sign_epi8(qw, qw);
                        let dw = _mm256_set1_ps(f16_scale(wb));
                        for t in 0..4 {
                            let q = $dot(abs_w, _mm256_sign_epi8(qa[t], qw));
                            let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(&da[b * 4 + t]));
                            acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), acc[r][t]);
                        }
                    }
                }
                std::array::from_fn(|r| std::array::from_fn(|t| hsum(acc[r][t])))
            }
        };
    }

    /// Σ of each 4 adjacent u8·i8 products in int32 lanes, exactly (VNNI).
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    unsafe fn quads_vnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }

    /// The same sums with maddubs + madd (|products| <= 127·127·2: no saturation).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quads_avx2(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    tile!(tile_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", quads_vnni);
    tile!(tile_avx2, "avx2,fma,f16c", quads_avx2);
}

/// Activations to Q8_K as ggml's x86 `quantize_row_q8_K` (its reference: d = max/-127 with the
/// signed absmax, 256 int8 levels, and the sums of every 16 levels).
pub fn quantize_act_q8_k(x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "aarch64")]
    if cpu::arm_features().neon {
        // SAFETY: NEON is present (checked just above).
        return unsafe { neon::quantize_act_q8_k(x, out) };
    }
    (crate::quant::kquants::q8_k::Q8_K_KERNELS.quantize_row)(x, out, None)
}

const QK: usize = 32;
const BLOCK: usize = 34;
const Q8_1_BLOCK: usize = 36;

/// How far ahead (bytes) generation kernels prefetch each weight row they stream: on short rows
/// (512 columns) the hardware prefetcher alone falls far behind four row streams
/// (`cargo bench --bench gen_dot` measures the kernels streaming from DRAM).
pub const PREFETCH_AHEAD: usize = 8192;

/// The prefetch distance of a kernel that streams four consecutive rows of `row_bytes` side by
/// side: at least the next group of four rows. A fixed 8 KiB lands inside the current group once
/// rows pass 2 KiB (4096 Q8_0 columns: attn_output, and every expert of a 4096-wide model), which
/// left the start of each next group cold and halved the stream rate (11.5 vs 21.4 GiB/s, Q8_0
/// rows of 4096 columns; `cargo bench --bench gen_dot`).
#[inline]
pub fn rows4_prefetch_ahead(row_bytes: usize) -> usize {
    PREFETCH_AHEAD.max(4 * row_bytes)
}

/// Prefetches every cache line of the `bytes`-byte weight block `PREFETCH_AHEAD` bytes past `wb`
/// (a prefetch cannot fault, so running past the end of a row is harmless).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_block(wb: *const u8, bytes: usize) {
    prefetch_block_ahead(wb, bytes, PREFETCH_AHEAD)
}

/// Prefetches every cache line of the `bytes`-byte block `ahead` bytes past `wb`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_block_ahead(wb: *const u8, bytes: usize, ahead: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let p = wb.wrapping_add(ahead);
    let mut off = 0;
    while off < bytes {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8);
        off += 64;
    }
}

/// Activations to Q8_0 the way ggml's CPU `quantize_row_q8_0` does on x86: d = amax/127 stored as
/// f16, q = round-half-even(x · 127/amax).
pub fn quantize_act_q8_0(x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.f16c {
            // SAFETY: AVX2 and F16C are present (checked just above).
            return unsafe { avx2::quantize_act_q8(x, out, false) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if cpu::arm_features().neon {
        // SAFETY: NEON is present (checked just above).
        return unsafe { neon::quantize_act_q8(x, out, false) };
    }
    quantize_act_q8_0_scalar(x, out)
}

/// The portable steps (the spec the AVX2 version reproduces).
pub fn quantize_act_q8_0_scalar(x: &[f32], out: &mut [u8]) {
    quantize_act_q8_scalar(x, out, false)
}

/// Q8_0 blocks (d | 32 q), or with `with_sum` Q8_1 blocks (d | s = d·Σq | 32 q): d = amax/127,
/// q = round-half-even(x · 127/amax), d and s stored as f16.
fn quantize_act_q8_scalar(x: &[f32], out: &mut [u8], with_sum: bool) {
    let bytes = if with_sum { Q8_1_BLOCK } else { BLOCK };
    let off = bytes - QK;
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(bytes)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in ob[off..].iter_mut().zip(xb) {
            let qi = (v * id).round_ties_even() as i8;
            sum += qi as i32;
            *q = qi as u8;
        }
        ob[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        if with_sum {
            ob[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_bits().to_le_bytes());
        }
    }
}

#[inline]
fn scale(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Σ over blocks of d_w·d_a·Σ q_w·q_a for two Q8_0 rows of equal length.
#[inline]
pub fn vec_dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.fma && f.f16c {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time just above).
            return unsafe { avx2::vec_dot_q8_0(w, a) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if cpu::arm_features().neon {
        // SAFETY: NEON is present (checked just above).
        return unsafe { neon::vec_dot_q8_0(w, a) };
    }
    vec_dot_q8_0_scalar(w, a)
}

/// One Q8_0 weight row against four activation rows: the weight blocks are loaded once.
#[inline]
pub fn vec_dot_q8_0_x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.fma && f.f16c {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time just above).
            return unsafe { avx2::vec_dot_q8_0_x4(w, a) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if cpu::arm_features().neon {
        // SAFETY: NEON is present (checked just above).
        return unsafe { neon::vec_dot_q8_0_x4(w, a) };
    }
    a.map(|ai| vec_dot_q8_0_scalar(w, ai))
}

/// The portable kernel, in the AVX2 kernel's exact order (so every machine gives the same bits):
/// per block 8 lanes of 4 products each, lane += d·sum fused, then the lanes added pairwise.
pub fn vec_dot_q8_0_scalar(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(BLOCK).zip(a.chunks_exact(BLOCK)) {
        let d = scale(wb) * scale(ab);
        for (l, lane) in acc.iter_mut().enumerate() {
            let sumi: i32 = (4 * l..4 * l + 4)
                .map(|i| (wb[2 + i] as i8 as i32) * (ab[2 + i] as i8 as i32))
                .sum();
            *lane = d.mul_add(sumi as f32, *lane);
        }
    }
    super::ops::reduce8(&acc)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// Q8_0 (or, with `with_sum`, Q8_1) activation blocks: the portable quantizers' exact steps
    /// (amax, d = amax/127, round-half-even of x·127/amax) eight lanes at a time.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn quantize_act_q8(x: &[f32], out: &mut [u8], with_sum: bool) {
        let bytes = if with_sum { 36 } else { 34 };
        let off = bytes - 32;
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(bytes)) {
            let p = xb.as_ptr();
            let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let q = v.map(|vi| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(vi, idv),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            });
            // int32 -> int8 with the lane order restored after the in-lane packs
            let q01 = _mm256_packs_epi32(q[0], q[1]);
            let q23 = _mm256_packs_epi32(q[2], q[3]);
            let q8 = _mm256_packs_epi16(q01, q23);
            let q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(ob.as_mut_ptr().add(off) as *mut __m256i, q8);
            let dh =
                _mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT), 0) as u16;
            ob[..2].copy_from_slice(&dh.to_le_bytes());
            if with_sum {
                let s16 = _mm256_madd_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_set1_epi16(1));
                let s16b = _mm256_madd_epi16(_mm256_packs_epi32(q[2], q[3]), _mm256_set1_epi16(1));
                let s = _mm256_add_epi32(s16, s16b);
                let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
                let sum =
                    _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)));
                let sh = half::f16::from_f32(d * sum as f32).to_bits();
                ob[2..4].copy_from_slice(&sh.to_le_bytes());
            }
        }
    }

    /// Four Q8_0 weight rows against one activation row; each row's sum runs in exactly the order
    /// of `vec_dot_q8_0` (bit-identical), four independent chains for the out-of-order core.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot_q8_0_4rows(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        let n = a.len() / BLOCK;
        debug_assert!(w.iter().all(|wi| wi.len() >= n * BLOCK));
        let mut acc = [_mm256_setzero_ps(); 4];
        let ahead = super::rows4_prefetch_ahead(w[0].len());
        for b in 0..n {
            let ab = a.as_ptr().add(b * BLOCK);
            let da = f16_scale(ab);
            for r in 0..4 {
                let wb = w[r].as_ptr().add(b * BLOCK);
                super::prefetch_block_ahead(wb, BLOCK, ahead);
                let qw = _mm256_loadu_si256(wb.add(2) as *const __m256i);
                let d = _mm256_set1_ps(f16_scale(wb) * da);
                acc[r] = _mm256_fmadd_ps(d, block_lanes(qw, ab.add(2)), acc[r]);
            }
        }
        acc.map(|v| hsum(v))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
        let n = w.len().min(a.len()) / BLOCK;
        let mut acc = _mm256_setzero_ps();
        for b in 0..n {
            let (wb, ab) = (w.as_ptr().add(b * BLOCK), a.as_ptr().add(b * BLOCK));
            let d = f16_scale(wb) * f16_scale(ab);
            let qw = _mm256_loadu_si256(wb.add(2) as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), block_lanes(qw, ab.add(2)), acc);
        }
        hsum(acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    /// Exact Σ a_i·b_i of 32 int8 pairs (|a_i| <= 127 so maddubs cannot saturate).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn int_dot32(a: *const u8, b: *const u8) -> i32 {
        let qa = _mm256_loadu_si256(a as *const __m256i);
        let qb = _mm256_loadu_si256(b as *const __m256i);
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qa, qa), _mm256_sign_epi8(qb, qa));
        let quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        let q = _mm_add_epi32(
            _mm256_castsi256_si128(quads),
            _mm256_extracti128_si256(quads, 1),
        );
        let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b01_00_11_10));
        let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b10_11_00_01));
        _mm_cvtsi128_si32(q)
    }

    #[inline]
    #[target_feature(enable = "f16c")]
    pub unsafe fn f16_scale(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot_q8_0_x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
        let n = w.len() / BLOCK;
        debug_assert!(a.iter().all(|ai| ai.len() >= n * BLOCK));
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..n {
            let wb = w.as_ptr().add(b * BLOCK);
            let dw = f16_scale(wb);
            let qw = _mm256_loadu_si256(wb.add(2) as *const __m256i);
            for j in 0..4 {
                let ab = a[j].as_ptr().add(b * BLOCK);
                let d = _mm256_set1_ps(dw * f16_scale(ab));
                acc[j] = _mm256_fmadd_ps(d, block_lanes(qw, ab.add(2)), acc[j]);
            }
        }
        acc.map(|v| hsum(v))
    }

    use crate::quant::iq_tables::KVALUES_IQ4NL;

    /// 32 nibbles of a 16-byte array: low nibbles in the low 128 bits (elements 0..16), high ones
    /// in the high 128 bits (16..32).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let v = _mm_loadu_si128(qs as *const __m128i);
        let lo = _mm_and_si128(v, _mm_set1_epi8(0x0f));
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0f));
        _mm256_set_m128i(hi, lo)
    }

    /// 0x10 in byte j where bit j of the little-endian u32 at `qh` is set (the Q5 fifth bits).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn fifth_bits(qh: *const u8) -> __m256i {
        let bits = u32::from_le_bytes([*qh, *qh.add(1), *qh.add(2), *qh.add(3)]);
        let v = _mm256_set1_epi32(bits as i32);
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bytes = _mm256_shuffle_epi8(v, spread);
        let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mask), mask);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dec_q4_0(b: *const u8) -> __m256i {
        _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dec_q4_1(b: *const u8) -> __m256i {
        nibbles(b.add(4))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dec_q5_0(b: *const u8) -> __m256i {
        let q = _mm256_or_si256(nibbles(b.add(6)), fifth_bits(b.add(2)));
        _mm256_sub_epi8(q, _mm256_set1_epi8(16))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dec_q5_1(b: *const u8) -> __m256i {
        _mm256_or_si256(nibbles(b.add(8)), fifth_bits(b.add(4)))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dec_iq4_nl(b: *const u8) -> __m256i {
        let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
        _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles(b.add(2)))
    }

    // (weight block bytes, activation block bytes, offset type?, decoder) → one-row and 4-row
    // kernels whose float steps match `block_term` exactly.
    /// The 8 int32 lane sums (as f32) of 32 int8 weights times 32 int8 activations, exact:
    /// maddubs needs an unsigned operand, so |w| meets a with w's sign moved onto it
    /// (|q| <= 127: no saturation).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_lanes(w: __m256i, a: *const u8) -> __m256 {
        let qa = _mm256_loadu_si256(a as *const __m256i);
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(qa, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    // (weight block bytes, activation block bytes, offset type?, decoder) → one-row and 4-row
    // kernels. Like ggml's AVX2 loops: 8 float lanes scaled by d_w·d_a per block, the offset terms
    // m·s summed apart; both kernels add in the same order (so batching never changes a result).
    macro_rules! int_kernels {
        ($dot:ident, $dot_x4:ident, $wb:expr, $ab:expr, $offset:expr, $dec:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $dot(w: &[u8], a: &[u8]) -> f32 {
                let n = w.len() / $wb;
                debug_assert!(a.len() >= n * $ab);
                let mut acc = _mm256_setzero_ps();
                let mut offsets = 0f32;
                for b in 0..n {
                    let (wb, ab) = (w.as_ptr().add(b * $wb), a.as_ptr().add(b * $ab));
                    let q = $dec(wb);
                    let d = _mm256_set1_ps(f16_scale(wb) * f16_scale(ab));
                    let lanes = block_lanes(q, ab.add(if $offset { 4 } else { 2 }));
                    acc = _mm256_fmadd_ps(d, lanes, acc);
                    if $offset {
                        offsets += f16_scale(wb.add(2)) * f16_scale(ab.add(2));
                    }
                }
                hsum(acc) + offsets
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $dot_x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
                let n = w.len() / $wb;
                debug_assert!(a.iter().all(|ai| ai.len() >= n * $ab));
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut offsets = [0f32; 4];
                for b in 0..n {
                    let wb = w.as_ptr().add(b * $wb);
                    let (q, dw) = ($dec(wb), f16_scale(wb));
                    for j in 0..4 {
                        let ab = a[j].as_ptr().add(b * $ab);
                        let d = _mm256_set1_ps(dw * f16_scale(ab));
                        let lanes = block_lanes(q, ab.add(if $offset { 4 } else { 2 }));
                        acc[j] = _mm256_fmadd_ps(d, lanes, acc[j]);
                        if $offset {
                            offsets[j] += f16_scale(wb.add(2)) * f16_scale(ab.add(2));
                        }
                    }
                }
                [0, 1, 2, 3].map(|j| hsum(acc[j]) + offsets[j])
            }
        };
    }

    int_kernels!(dot_q4_0, dot_q4_0_x4, 18, super::BLOCK, false, dec_q4_0);
    int_kernels!(dot_q4_1, dot_q4_1_x4, 20, super::Q8_1_BLOCK, true, dec_q4_1);
    int_kernels!(dot_q5_0, dot_q5_0_x4, 22, super::BLOCK, false, dec_q5_0);
    int_kernels!(dot_q5_1, dot_q5_1_x4, 24, super::Q8_1_BLOCK, true, dec_q5_1);
    int_kernels!(
        dot_iq4_nl,
        dot_iq4_nl_x4,
        18,
        super::BLOCK,
        false,
        dec_iq4_nl
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{self, testdata};
    use crate::types::GgmlType;

    #[test]
    fn simd_matches_scalar_and_dequantized_dot() {
        let n = 32 * 9;
        let w = testdata::heavy_tailed(1, n);
        let x = testdata::heavy_tailed(2, n);
        let wq = quant::quantize("w", &w, n, GgmlType::Q8_0, None).unwrap();
        let mut xq = vec![0u8; n / 32 * 34];
        quantize_act_q8_0(&x, &mut xq);
        let (fast, slow) = (vec_dot_q8_0(&wq, &xq), vec_dot_q8_0_scalar(&wq, &xq));
        assert_eq!(
            fast.to_bits(),
            slow.to_bits(),
            "AVX2 and portable Q8_0 dots differ"
        );
        let wd = quant::dequantize("w", &wq, n, GgmlType::Q8_0).unwrap();
        let xd = quant::dequantize("x", &xq, n, GgmlType::Q8_0).unwrap();
        let exact: f64 = wd.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mag: f64 = wd
            .iter()
            .zip(&xd)
            .map(|(a, b)| (*a as f64 * *b as f64).abs())
            .sum();
        assert!(
            (fast as f64 - exact).abs() <= 1e-5 * mag,
            "{fast} vs {exact}"
        );
        assert!(
            (slow as f64 - exact).abs() <= 1e-5 * mag,
            "{slow} vs {exact}"
        );
    }

    #[test]
    fn activation_quantizer_rounds_half_to_even() {
        // amax 127 → id 1: 0.5 → 0, 1.5 → 2, 2.5 → 2, -0.5 → 0
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = 2.5;
        x[4] = -0.5;
        let mut q = [0u8; 34];
        quantize_act_q8_0(&x, &mut q);
        assert_eq!(scale(&q), 1.0);
        assert_eq!(&q[2..7], &[127, 0, 2, 2, 0]);
    }
}

// ---------------------------------------------------------------------------------------------
// The other 32-element types against Q8_0 / Q8_1 activations, as ggml pairs them
// (Q4_0, Q5_0, IQ4_NL with Q8_0; Q4_1, Q5_1 with Q8_1 whose `s` carries d·Σq for the offset).
// Each weight block is decoded to integers once, then meets the activations' int8 values exactly;
// only the per-block float scaling differs from ggml's lane order (~1e-7 relative).

/// Activations to Q8_1 as ggml's x86 `quantize_row_q8_1`: Q8_0's rounding, plus s = d·Σq (f16).
pub fn quantize_act_q8_1(x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.f16c {
            // SAFETY: AVX2 and F16C are present (checked just above).
            return unsafe { avx2::quantize_act_q8(x, out, true) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if cpu::arm_features().neon {
        // SAFETY: NEON is present (checked just above).
        return unsafe { neon::quantize_act_q8(x, out, true) };
    }
    quantize_act_q8_1_scalar(x, out)
}

/// The portable steps (the spec the AVX2 version reproduces).
pub fn quantize_act_q8_1_scalar(x: &[f32], out: &mut [u8]) {
    quantize_act_q8_scalar(x, out, true)
}

/// A weight block as integers: value_i = d·q_i + m.
struct Decoded {
    d: f32,
    m: f32,
    q: [i8; QK],
}

/// How one weight type's block decodes, and which activation format it meets.
trait IntBlock {
    const BYTES: usize;
    /// true: Q8_1 activations (the block has an offset m), false: Q8_0.
    const WITH_OFFSET: bool;
    fn decode(b: &[u8]) -> Decoded;
}

/// Nibble j of a 16-byte packed array: low nibbles hold elements 0..16, high ones 16..32.
#[inline]
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    }
}

/// All 32 nibbles at once, mapped through `f` (no per-element branch).
#[inline]
fn nibbles(qs: &[u8], f: impl Fn(u8) -> i8) -> [i8; QK] {
    let mut q = [0i8; QK];
    for j in 0..16 {
        q[j] = f(qs[j] & 0x0f);
        q[j + 16] = f(qs[j] >> 4);
    }
    q
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Iq4Nl;

impl IntBlock for Q4_0 {
    const BYTES: usize = 18;
    const WITH_OFFSET: bool = false;
    fn decode(b: &[u8]) -> Decoded {
        Decoded {
            d: scale_fast(b),
            m: 0.0,
            q: nibbles(&b[2..18], |v| v as i8 - 8),
        }
    }
}

impl IntBlock for Q4_1 {
    const BYTES: usize = 20;
    const WITH_OFFSET: bool = true;
    fn decode(b: &[u8]) -> Decoded {
        Decoded {
            d: scale_fast(b),
            m: scale_fast(&b[2..]),
            q: nibbles(&b[4..20], |v| v as i8),
        }
    }
}

/// Q5 blocks: 4 low bits in nibbles, the fifth bit j in bit j of the little-endian u32 `qh`.
#[inline]
fn five_bit(qh: u32, qs: &[u8], j: usize) -> u8 {
    nibble(qs, j) | ((((qh >> j) & 1) as u8) << 4)
}

impl IntBlock for Q5_0 {
    const BYTES: usize = 22;
    const WITH_OFFSET: bool = false;
    fn decode(b: &[u8]) -> Decoded {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        Decoded {
            d: scale_fast(b),
            m: 0.0,
            q: std::array::from_fn(|j| five_bit(qh, &b[6..], j) as i8 - 16),
        }
    }
}

impl IntBlock for Q5_1 {
    const BYTES: usize = 24;
    const WITH_OFFSET: bool = true;
    fn decode(b: &[u8]) -> Decoded {
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        Decoded {
            d: scale_fast(b),
            m: scale_fast(&b[2..]),
            q: std::array::from_fn(|j| five_bit(qh, &b[8..], j) as i8),
        }
    }
}

impl IntBlock for Iq4Nl {
    const BYTES: usize = 18;
    const WITH_OFFSET: bool = false;
    fn decode(b: &[u8]) -> Decoded {
        use crate::quant::iq_tables::KVALUES_IQ4NL;
        Decoded {
            d: scale_fast(b),
            m: 0.0,
            q: nibbles(&b[2..18], |v| KVALUES_IQ4NL[v as usize]),
        }
    }
}

/// Σ w_i·a_i over 32 int8 pairs (exact in any order).
#[inline]
fn int_dot(w: &[i8; QK], a: &[u8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu::has_avx2() {
            // SAFETY: AVX2 is present (checked just above); both hold 32 bytes.
            return unsafe { avx2::int_dot32(w.as_ptr() as *const u8, a[..QK].as_ptr()) };
        }
    }
    w.iter()
        .zip(&a[..QK])
        .map(|(&p, &q)| p as i32 * q as i8 as i32)
        .sum()
}

/// An f16 scale stored at the start of `b`.
#[inline]
fn scale_fast(b: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu::features().f16c {
            // SAFETY: F16C is present (checked just above); b holds at least 2 bytes.
            return unsafe { avx2::f16_scale(b[..2].as_ptr()) };
        }
    }
    scale(b)
}

/// One block's contribution: (d_w·d_a·Σq_w·q_a, m_w·s_a); the offset term is summed apart, as
/// ggml does (0 for types without an offset).
#[inline]
fn block_term<B: IntBlock>(dec: &Decoded, a: &[u8]) -> (f32, f32) {
    if B::WITH_OFFSET {
        let sumi = int_dot(&dec.q, &a[4..]);
        (
            dec.d * scale_fast(a) * sumi as f32,
            dec.m * scale_fast(&a[2..]),
        )
    } else {
        let sumi = int_dot(&dec.q, &a[2..]);
        (dec.d * scale_fast(a) * sumi as f32, 0.0)
    }
}

fn act_bytes<B: IntBlock>() -> usize {
    if B::WITH_OFFSET {
        Q8_1_BLOCK
    } else {
        BLOCK
    }
}

fn vec_dot_int<B: IntBlock>(w: &[u8], a: &[u8]) -> f32 {
    let ab = act_bytes::<B>();
    let (mut sum, mut offsets) = (0f32, 0f32);
    for (wb, abk) in w.chunks_exact(B::BYTES).zip(a.chunks_exact(ab)) {
        let (main, offset) = block_term::<B>(&B::decode(wb), abk);
        sum += main;
        offsets += offset;
    }
    sum + offsets
}

/// Four activation rows: each weight block is decoded once. Same additions as `vec_dot_int`.
fn vec_dot_int_x4<B: IntBlock>(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let ab = act_bytes::<B>();
    let (mut sum, mut offsets) = ([0f32; 4], [0f32; 4]);
    for (i, wb) in w.chunks_exact(B::BYTES).enumerate() {
        let dec = B::decode(wb);
        for j in 0..4 {
            let (main, offset) = block_term::<B>(&dec, &a[j][i * ab..(i + 1) * ab]);
            sum[j] += main;
            offsets[j] += offset;
        }
    }
    [0, 1, 2, 3].map(|j| sum[j] + offsets[j])
}

/// (activation bytes per 32 values, quantizer, dot, 4-row dot) for the legacy/IQ4_NL types.
pub type IntKernels = (
    usize,
    fn(&[f32], &mut [u8]),
    fn(&[u8], &[u8]) -> f32,
    fn(&[u8], [&[u8]; 4]) -> [f32; 4],
);

fn int_kernels<B: IntBlock>() -> IntKernels {
    let q: fn(&[f32], &mut [u8]) = if B::WITH_OFFSET {
        quantize_act_q8_1
    } else {
        quantize_act_q8_0
    };
    (act_bytes::<B>(), q, vec_dot_int::<B>, vec_dot_int_x4::<B>)
}

/// The same sums with the weight blocks decoded in AVX2 registers, accumulated in 8 float lanes as
/// ggml's AVX2 kernels do (equal to the portable sums up to float rounding order).
#[cfg(target_arch = "x86_64")]
fn int_kernels_avx2(ty: crate::types::GgmlType) -> Option<IntKernels> {
    use crate::types::GgmlType as T;
    let f = cpu::features();
    if !(f.avx2 && f.fma && f.f16c) {
        return None;
    }
    // SAFETY (every closure): AVX2, FMA and F16C are present, checked just above.
    Some(match ty {
        T::Q4_0 => (
            BLOCK,
            quantize_act_q8_0,
            |w, a| unsafe { avx2::dot_q4_0(w, a) },
            |w, a| unsafe { avx2::dot_q4_0_x4(w, a) },
        ),
        T::Q4_1 => (
            Q8_1_BLOCK,
            quantize_act_q8_1,
            |w, a| unsafe { avx2::dot_q4_1(w, a) },
            |w, a| unsafe { avx2::dot_q4_1_x4(w, a) },
        ),
        T::Q5_0 => (
            BLOCK,
            quantize_act_q8_0,
            |w, a| unsafe { avx2::dot_q5_0(w, a) },
            |w, a| unsafe { avx2::dot_q5_0_x4(w, a) },
        ),
        T::Q5_1 => (
            Q8_1_BLOCK,
            quantize_act_q8_1,
            |w, a| unsafe { avx2::dot_q5_1(w, a) },
            |w, a| unsafe { avx2::dot_q5_1_x4(w, a) },
        ),
        T::IQ4_NL => (
            BLOCK,
            quantize_act_q8_0,
            |w, a| unsafe { avx2::dot_iq4_nl(w, a) },
            |w, a| unsafe { avx2::dot_iq4_nl_x4(w, a) },
        ),
        _ => return None,
    })
}

pub fn legacy_kernels(ty: crate::types::GgmlType) -> Option<IntKernels> {
    use crate::types::GgmlType as T;
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = int_kernels_avx2(ty) {
        return Some(k);
    }
    match ty {
        T::Q4_0 => Some(int_kernels::<Q4_0>()),
        T::Q4_1 => Some(int_kernels::<Q4_1>()),
        T::Q5_0 => Some(int_kernels::<Q5_0>()),
        T::Q5_1 => Some(int_kernels::<Q5_1>()),
        T::IQ4_NL => Some(int_kernels::<Iq4Nl>()),
        _ => None,
    }
}

/// The portable kernels, for comparing the AVX2 ones against.
#[cfg(test)]
fn legacy_kernels_portable(ty: crate::types::GgmlType) -> Option<IntKernels> {
    use crate::types::GgmlType as T;
    match ty {
        T::Q4_0 => Some(int_kernels::<Q4_0>()),
        T::Q4_1 => Some(int_kernels::<Q4_1>()),
        T::Q5_0 => Some(int_kernels::<Q5_0>()),
        T::Q5_1 => Some(int_kernels::<Q5_1>()),
        T::IQ4_NL => Some(int_kernels::<Iq4Nl>()),
        _ => None,
    }
}

#[cfg(test)]
mod legacy_tests {
    use super::*;
    use crate::quant::{self, testdata};
    use crate::types::GgmlType;

    #[test]
    fn decoded_blocks_match_the_dequantizers_and_dots_are_exact_in_integers() {
        let n = 32 * 6;
        let w = testdata::heavy_tailed(21, n);
        let x = testdata::heavy_tailed(22, n);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::IQ4_NL,
        ] {
            let (ab, quantize_act, dot, dot_x4) = legacy_kernels(ty).unwrap();
            let wq = quant::quantize("w", &w, n, ty, None).unwrap();
            let mut xq = vec![0u8; n / 32 * ab];
            quantize_act(&x, &mut xq);
            // reference: the dequantized weights times the activations' own values
            let wd = quant::dequantize("w", &wq, n, ty).unwrap();
            let (mut exact, mut mag) = (0f64, 0f64);
            for (k, blk) in xq.chunks_exact(ab).enumerate() {
                let d = scale(blk) as f64;
                let qs = &blk[ab - 32..];
                for j in 0..32 {
                    let p = wd[k * 32 + j] as f64 * d * (qs[j] as i8) as f64;
                    exact += p;
                    mag += p.abs();
                }
            }
            let got = dot(&wq, &xq);
            // Offset types use the f16-rounded s = d·Σq, as ggml does: allow that rounding.
            assert!(
                (got as f64 - exact).abs() <= 2e-3 * mag,
                "{ty}: {got} vs {exact}"
            );
            let four = dot_x4(&wq, [&xq; 4]);
            assert!(four.iter().all(|v| v.to_bits() == got.to_bits()), "{ty}");
            // the AVX2 kernels add in ggml's lane order: equal to the portable ones up to rounding
            let (_, _, portable, _) = legacy_kernels_portable(ty).unwrap();
            let p = portable(&wq, &xq);
            assert!((p - got).abs() as f64 <= 1e-5 * mag, "{ty}: {p} vs {got}");
        }
    }
}

/// llama.cpp's own dot products, stored by scripts/make_llamacpp_vec_dot_vectors.py.
#[cfg(test)]
pub(crate) mod llamacpp_vectors {
    use crate::gguf::GgufFile;

    /// One type's vectors: weight rows, f32 activations, ggml's quantized activations, and
    /// ggml's dot products dot[t * n_rows + r] (its SIMD kernel; the file also holds `dot_generic`).
    pub struct Vectors {
        pub n_rows: usize,
        pub n_cols: usize,
        pub w: Vec<Vec<u8>>,
        pub x: Vec<Vec<f32>>,
        pub act: Vec<Vec<u8>>,
        pub dot: Vec<f32>,
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    pub fn load(type_name: &str) -> Vectors {
        let path = format!(
            "{}/../tests/data/llamacpp/vec_dot/{}.gguf",
            env!("CARGO_MANIFEST_DIR"),
            type_name.to_lowercase()
        );
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let get = |name: &str| {
            let t = f
                .tensor(name)
                .unwrap_or_else(|| panic!("{path}: no tensor {name}"));
            (f.tensor_data(t).to_vec(), t.dims.clone())
        };
        let (w, ws) = get("w");
        let (x, xs) = get("x");
        let (act, _) = get("act");
        let (n_cols, n_rows, n_tok) = (ws[0] as usize, ws[1] as usize, xs[1] as usize);
        let split = |b: Vec<u8>, n: usize| -> Vec<Vec<u8>> {
            b.chunks_exact(b.len() / n).map(|c| c.to_vec()).collect()
        };
        Vectors {
            n_rows,
            n_cols,
            w: split(w, n_rows),
            x: f32s(&x).chunks_exact(n_cols).map(|c| c.to_vec()).collect(),
            act: split(act, n_tok),
            dot: f32s(&get("dot").0),
        }
    }

    /// Checks `k` against llama.cpp: activations quantize to ggml's bytes, and every dot (single
    /// and 4-row) is within `rel` of ggml's, relative to Σ|w|·|a| of the row pair (the scale of
    /// float-rounding differences from another summation order).
    #[allow(clippy::needless_range_loop)] // r and t index four parallel arrays
    pub fn check(type_name: &str, k: &super::DotKernels, rel: f64) {
        let v = load(type_name);
        let ty = crate::types::GgmlType::from_name(type_name).expect("known type");
        let wf: Vec<Vec<f32>> =
            v.w.iter()
                .map(|r| crate::quant::dequantize("w", r, v.n_cols, ty).unwrap())
                .collect();
        for (t, (x, act)) in v.x.iter().zip(&v.act).enumerate() {
            let mut mine = vec![0u8; act.len()];
            (k.quantize_act)(x, &mut mine);
            assert!(
                mine == *act,
                "{type_name}: activation row {t} differs from ggml's"
            );
        }
        let n_tok = v.act.len();
        for r in 0..v.n_rows {
            let quad = [&v.act[0][..], &v.act[1], &v.act[2], &v.act[3]];
            let x4 = (k.vec_dot_x4)(&v.w[r], quad);
            for t in 0..n_tok {
                let mag: f64 = wf[r]
                    .iter()
                    .zip(&v.x[t])
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let want = v.dot[t * v.n_rows + r] as f64;
                let got = (k.vec_dot)(&v.w[r], &v.act[t]) as f64;
                let tol = rel * mag.max(1e-30);
                assert!(
                    (got - want).abs() <= tol,
                    "{type_name} row {r} tok {t}: {got} vs ggml {want}"
                );
                if t < 4 {
                    assert_eq!(
                        x4[t].to_bits(),
                        (got as f32).to_bits(),
                        "{type_name}: x4 vs single"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod llamacpp_tests {
    use super::*;

    #[test]
    fn q8_0_tiles_equal_the_row_kernel_bit_for_bit() {
        use crate::quant::testdata;
        let n = 32 * 9;
        let w = testdata::heavy_tailed(51, 7 * n);
        let wq = crate::quant::quantize("w", &w, n, GgmlType::Q8_0, None).unwrap();
        let rows: Vec<&[u8]> = wq.chunks_exact(wq.len() / 7).collect();
        let acts: Vec<Vec<u8>> = (0..11)
            .map(|t| {
                let mut a = vec![0u8; n / 32 * 34];
                let mut x = testdata::heavy_tailed(60 + t, n);
                if t == 3 {
                    x[..32].fill(0.0); // a zero block: scale 0
                }
                quantize_act_q8_0(&x, &mut a);
                a
            })
            .collect();
        let xs: Vec<&[u8]> = acts.iter().map(|a| &a[..]).collect();
        for n_tok in [4, 9, 11] {
            let mut out = vec![0f32; 7 * n_tok];
            let da = q8_0_act_scales(&xs[..n_tok]);
            if !q8_0_gemm(&rows, &xs[..n_tok], &da, &mut out) {
                return; // no AVX2 here: the per-row kernels are used instead
            }
            for (i, r) in rows.iter().enumerate() {
                for t in 0..n_tok {
                    let want = vec_dot_q8_0(r, xs[t]);
                    assert_eq!(
                        out[i * n_tok + t].to_bits(),
                        want.to_bits(),
                        "row {i} token {t}"
                    );
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if cpu::features().avx512vnni {
            // both tile flavours on this machine: VNNI and AVX2 agree
            let nb = n / 32;
            let quad = [xs[0], xs[1], xs[2], xs[3]];
            let da: Vec<f32> = (0..nb * 4)
                .map(|i| scale(&xs[i % 4][(i / 4) * BLOCK..]))
                .collect();
            // SAFETY: AVX512-VNNI/VL (checked) and AVX2/FMA/F16C (q8_0_gemm ran above).
            let (a, b) = unsafe {
                (
                    gemm::tile_vnni([rows[0], rows[1]], quad, &da),
                    gemm::tile_avx2([rows[0], rows[1]], quad, &da),
                )
            };
            assert!(a
                .iter()
                .flatten()
                .zip(b.iter().flatten())
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn fast_activation_quantizers_and_four_row_dot_equal_the_portable_ones() {
        use crate::quant::testdata;
        let n = 32 * 40;
        let mut x = testdata::heavy_tailed(31, n);
        x[..32].fill(0.0); // an all-zero block
        x[32..64].fill(-3.5); // a constant block
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5 / 127.0 * 3.0; // values landing on .5 after scaling
        }
        x[100] = 1e30;
        x[200] = 1e-30;
        for (fast, portable, bytes) in [
            (
                quantize_act_q8_0 as fn(&[f32], &mut [u8]),
                quantize_act_q8_0_scalar as fn(&[f32], &mut [u8]),
                34,
            ),
            (quantize_act_q8_1, quantize_act_q8_1_scalar, 36),
        ] {
            let (mut a, mut b) = (vec![0u8; n / 32 * bytes], vec![0u8; n / 32 * bytes]);
            fast(&x, &mut a);
            portable(&x, &mut b);
            assert_eq!(a, b, "{bytes}-byte activation blocks");
        }
        let k = kernels(GgmlType::Q8_0).unwrap();
        let w = testdata::heavy_tailed(32, 6 * n);
        let wq = crate::quant::quantize("w", &w, n, GgmlType::Q8_0, None).unwrap();
        let rows: Vec<&[u8]> = wq.chunks_exact(wq.len() / 6).collect();
        let mut a = vec![0u8; n / 32 * 34];
        quantize_act_q8_0(&x, &mut a);
        if let Some(rows4) = k.vec_dot_4rows {
            let got = rows4([rows[0], rows[1], rows[2], rows[5]], &a);
            for (g, r) in got.iter().zip([0, 1, 2, 5]) {
                assert_eq!(g.to_bits(), (k.vec_dot)(rows[r], &a).to_bits());
            }
        }
    }

    #[test]
    fn legacy_kernels_match_llama_cpp_dot_products() {
        for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"] {
            let ty = GgmlType::from_name(name).unwrap();
            llamacpp_vectors::check(name, &kernels(ty).unwrap(), 1e-6);
        }
    }
}
