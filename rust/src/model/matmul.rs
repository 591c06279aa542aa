//! Weight-matrix × activation products over rows of any supported storage type.
//!
//! `matmul` computes y[t][r] = Σ_c W[r][c]·x[t][c] for a batch of tokens, reading each weight row
//! once per call: rows are handled in blocks (rayon over blocks), each block meeting every token's
//! activations. How a row becomes dot products is a `RowKernel` chosen per type: F32 rows are read
//! in place; Q8_0 rows use an integer dot against activations quantized once per call, as ggml
//! does (`vec_dot`); any other type (F16, BF16, ...) is converted to f32 one block of rows at a
//! time. New quantized kernels slot in as `RowKernel::Quantized` entries.
//!
//! f32 products run in register tiles of 4 rows × 3 tokens. Every (row, token) pair is summed in
//! the same order whatever the tile, so a token's result never depends on the batch it is in.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::quant::cpu;
use crate::quant::{self, DequantizeRowFn};
use crate::types::GgmlType;

use super::vec_dot;

/// A read-only view of one weight matrix: `n_rows` rows of `n_cols` elements of type `ty`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
    pub ty: GgmlType,
    pub n_cols: usize,
    pub n_rows: usize,
}

impl Mat<'_> {
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.n_rows.max(1)
    }

    /// Row `r` converted to f32 into `out` (embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let k = quant::kernels(self.ty).expect("type checked at load time");
        (k.dequantize_row)(&self.data[r * rb..(r + 1) * rb], out);
    }
}

/// How one weight type's rows are turned into dot products with f32 activations.
#[derive(Clone, Copy)]
enum RowKernel {
    /// F32 rows read in place from the map.
    F32InPlace,
    /// Rows converted to f32 one block at a time by the type's dequantizer, then f32 tiles.
    ToF32(DequantizeRowFn),
    /// Rows kept in their block format; activations quantized once per call to the kernels'
    /// activation type and multiplied with an integer dot kernel (ggml's `vec_dot_type` scheme).
    Quantized(vec_dot::DotKernels),
}

fn row_kernel(ty: GgmlType) -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.f16c {
            // SAFETY (both): AVX2 and F16C are present, checked just above.
            match ty {
                GgmlType::BF16 => {
                    return RowKernel::ToF32(|s, d| unsafe { avx2::bf16_to_f32(s, d) })
                }
                GgmlType::F16 => return RowKernel::ToF32(|s, d| unsafe { avx2::f16_to_f32(s, d) }),
                _ => {}
            }
        }
    }
    if ty == GgmlType::F32 && cfg!(target_endian = "little") {
        return RowKernel::F32InPlace;
    }
    match vec_dot::kernels(ty) {
        Some(k) => RowKernel::Quantized(k),
        None => RowKernel::ToF32(
            quant::kernels(ty)
                .expect("weight types are checked at load time")
                .dequantize_row,
        ),
    }
}

/// Reinterprets little-endian f32 bytes in place; None when they are not 4-byte aligned.
fn as_f32s(bytes: &[u8]) -> Option<&[f32]> {
    // SAFETY: every bit pattern is a valid f32; align_to only hands out the aligned middle part.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}

/// Rows per rayon task: big enough to amortise scheduling, small enough to keep every thread busy
/// and the converted block in L2.
fn rows_per_block(n_rows: usize, n_cols: usize) -> usize {
    let by_cache = ((64 << 10) / (4 * n_cols.max(1))).max(4);
    let by_balance = (n_rows / (4 * rayon::current_num_threads())).max(1);
    by_cache.min(by_balance).clamp(1, 64)
}

/// y[t][r] = Σ_c W[r][c]·x[t][c] for `n_tok` tokens; `x` is [n_tok][n_cols], `y` is [n_tok][n_rows].
pub fn matmul(w: &Mat, x: &[f32], n_tok: usize, y: &mut [f32]) {
    let (n_rows, n_cols) = (w.n_rows, w.n_cols);
    assert_eq!(x.len(), n_tok * n_cols, "{}: activation size", w.name);
    assert_eq!(y.len(), n_tok * n_rows, "{}: output size", w.name);
    if n_tok == 0 || n_rows == 0 {
        return;
    }
    let row_bytes = w.row_bytes();
    let mut kernel = row_kernel(w.ty);
    // k-quant batches: the VNNI 16-row GEMM where the CPU has it, writing token-major chunks
    let gemm16 = match kernel {
        RowKernel::Quantized(_) if n_tok >= 4 => vec_dot::kquant_gemm16(w.ty),
        _ => None,
    };
    let token_major = gemm16.is_some();
    let block = if token_major {
        (n_rows / rayon::current_num_threads() / 2 / 16 * 16).clamp(16, 64)
    } else if matches!(kernel, RowKernel::Quantized(_)) && n_tok < 4 {
        // generation: no converted rows to keep in cache, so blocks as large as the balance
        // across threads allows (fewer rayon tasks per multiply)
        (n_rows / (4 * rayon::current_num_threads()) / 4 * 4).clamp(4, 256)
    } else {
        rows_per_block(n_rows, n_cols)
    };
    // Each task writes its rows for all tokens into its own slice of a row-major [n_rows][n_tok]
    // buffer (token-major [n_tok][rows] for the GEMM); a transpose or copy at the end gives
    // [n_tok][n_rows].
    let mut yt = vec![0f32; n_rows * n_tok];
    let xs: Vec<&[f32]> = x.chunks_exact(n_cols).collect();
    let in_place = match kernel {
        RowKernel::F32InPlace => as_f32s(w.data),
        _ => None,
    };
    if matches!(kernel, RowKernel::F32InPlace) && in_place.is_none() {
        kernel = RowKernel::ToF32(quant::float::F32_KERNELS.dequantize_row);
    }
    match kernel {
        RowKernel::Quantized(k) => {
            let act_row = k.act_row_bytes(n_cols);
            let mut xq = vec![0u8; n_tok * act_row];
            xq.par_chunks_mut(act_row)
                .zip(x.par_chunks(n_cols))
                .for_each(|(q, xr)| (k.quantize_act)(xr, q));
            let xqs: Vec<&[u8]> = xq.chunks_exact(act_row).collect();
            // the GEMM's own activation form, where it has one (made once for all row blocks)
            let prepared = gemm16.and_then(|g| g.prepare).map(|p| p(&xqs));
            let gemm_xs: Option<Vec<&[u8]>> = prepared
                .as_ref()
                .map(|(buf, row)| buf.chunks_exact((*row).max(1)).collect());
            let q8_0_tiles = w.ty == GgmlType::Q8_0 && n_tok >= 4;
            let da = if q8_0_tiles && !token_major {
                vec_dot::q8_0_act_scales(&xqs)
            } else {
                vec![]
            };
            yt.par_chunks_mut(block * n_tok)
                .enumerate()
                .for_each(|(b, out)| {
                    let r0 = b * block;
                    let rows = &w.data[r0 * row_bytes..(r0 + out.len() / n_tok) * row_bytes];
                    let wrows: Vec<&[u8]> = rows.chunks_exact(row_bytes).collect();
                    if let Some(g) = gemm16 {
                        gemm16_block(g.run, rows, row_bytes, &xqs, gemm_xs.as_deref(), out, &k);
                        return;
                    }
                    // Q8_0 batches: 2-row × 4-token tiles (bit-identical to the per-row kernels)
                    let tiled = q8_0_tiles && vec_dot::q8_0_gemm(&wrows, &xqs, &da, out);
                    if !tiled {
                        quantized_block(&wrows, &xqs, out, &k);
                    }
                });
        }
        RowKernel::F32InPlace => {
            let all = in_place.expect("checked above");
            yt.par_chunks_mut(block * n_tok)
                .enumerate()
                .for_each(|(b, out)| {
                    let r0 = b * block;
                    let rows = &all[r0 * n_cols..(r0 + out.len() / n_tok) * n_cols];
                    let wrows: Vec<&[f32]> = rows.chunks_exact(n_cols).collect();
                    f32_block(&wrows, &xs, out);
                });
        }
        RowKernel::ToF32(_) if w.ty == GgmlType::BF16 && n_tok <= 2 && bf16_direct_available() => {
            // generation: BF16 rows dotted in place (no f32 copy), same sums as the tiles
            yt.par_chunks_mut(block * n_tok)
                .enumerate()
                .for_each(|(b, out)| {
                    let r0 = b * block;
                    let n = out.len() / n_tok;
                    let src = &w.data[r0 * row_bytes..(r0 + n) * row_bytes];
                    let rows: Vec<&[u8]> = src.chunks_exact(row_bytes).collect();
                    for (t, xt) in xs.iter().enumerate() {
                        let mut i = 0;
                        while i < n {
                            let take = (n - i).min(4);
                            let mut quad = [rows[i]; 4];
                            quad[..take].copy_from_slice(&rows[i..i + take]);
                            let v = bf16_dot_rows4(quad, xt);
                            for (j, vj) in v.iter().take(take).enumerate() {
                                out[(i + j) * n_tok + t] = *vj;
                            }
                            i += take;
                        }
                    }
                });
        }
        RowKernel::ToF32(dequantize) => {
            yt.par_chunks_mut(block * n_tok)
                .enumerate()
                .for_each(|(b, out)| {
                    let r0 = b * block;
                    let n = out.len() / n_tok;
                    let mut buf = vec![0f32; n * n_cols];
                    let src = &w.data[r0 * row_bytes..(r0 + n) * row_bytes];
                    for (dst, row) in buf
                        .chunks_exact_mut(n_cols)
                        .zip(src.chunks_exact(row_bytes))
                    {
                        dequantize(row, dst);
                    }
                    let wrows: Vec<&[f32]> = buf.chunks_exact(n_cols).collect();
                    f32_block(&wrows, &xs, out);
                });
        }
    }
    if n_tok == 1 {
        y.copy_from_slice(&yt);
    } else if token_major {
        // each task's chunk is [n_tok][its rows]: copy row runs into place
        for (b, chunk) in yt.chunks(block * n_tok).enumerate() {
            let nr = chunk.len() / n_tok;
            for (t, run) in chunk.chunks_exact(nr).enumerate() {
                y[t * n_rows + b * block..t * n_rows + b * block + nr].copy_from_slice(run);
            }
        }
    } else {
        // [n_rows][n_tok] -> [n_tok][n_rows] in 16×16 tiles (cache-friendly on both sides)
        const TILE: usize = 16;
        for r0 in (0..n_rows).step_by(TILE) {
            for t0 in (0..n_tok).step_by(TILE) {
                for r in r0..(r0 + TILE).min(n_rows) {
                    for t in t0..(t0 + TILE).min(n_tok) {
                        y[t * n_rows + r] = yt[r * n_tok + t];
                    }
                }
            }
        }
    }
}

/// out[i][t] = wrows[i]·xs[t] in tiles of 4 rows × 3 tokens (edges: 1 row and/or 1 token).
fn f32_block(wrows: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    let n_tok = xs.len();
    let mut t = 0;
    while t < n_tok {
        let tn = if t + 3 <= n_tok { 3 } else { 1 };
        let mut r = 0;
        while r < wrows.len() {
            let rn = if r + 4 <= wrows.len() { 4 } else { 1 };
            match (rn, tn) {
                (4, 3) => {
                    let v = tile::<4, 3>(
                        [wrows[r], wrows[r + 1], wrows[r + 2], wrows[r + 3]],
                        [xs[t], xs[t + 1], xs[t + 2]],
                    );
                    for (i, vr) in v.iter().enumerate() {
                        out[(r + i) * n_tok + t..(r + i) * n_tok + t + 3].copy_from_slice(vr);
                    }
                }
                (4, _) => {
                    let v = tile::<4, 1>(
                        [wrows[r], wrows[r + 1], wrows[r + 2], wrows[r + 3]],
                        [xs[t]],
                    );
                    for (i, vr) in v.iter().enumerate() {
                        out[(r + i) * n_tok + t] = vr[0];
                    }
                }
                (_, 3) => {
                    let v = tile::<1, 3>([wrows[r]], [xs[t], xs[t + 1], xs[t + 2]]);
                    out[r * n_tok + t..r * n_tok + t + 3].copy_from_slice(&v[0]);
                }
                _ => out[r * n_tok + t] = dot(wrows[r], xs[t]),
            }
            r += rn;
        }
        t += tn;
    }
}

/// `rows` (whole rows) against every token with the 16-row GEMM, into `out` as [n_tok][rows];
/// a tail of fewer than 16 rows goes through `quantized_block` (the same bits either way).
fn gemm16_block(
    g: vec_dot::Gemm16Fn,
    rows: &[u8],
    row_bytes: usize,
    xs: &[&[u8]],
    gemm_xs: Option<&[&[u8]]>,
    out: &mut [f32],
    k: &vec_dot::DotKernels,
) {
    let n_tok = xs.len();
    let nr = rows.len() / row_bytes;
    let groups = nr / 16;
    g(rows, row_bytes, groups, gemm_xs.unwrap_or(xs), out, nr);
    if groups * 16 < nr {
        let tail: Vec<&[u8]> = rows[groups * 16 * row_bytes..]
            .chunks_exact(row_bytes)
            .collect();
        let mut buf = vec![0f32; tail.len() * n_tok];
        quantized_block(&tail, xs, &mut buf, k);
        for (i, row) in buf.chunks_exact(n_tok).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                out[t * nr + groups * 16 + i] = v;
            }
        }
    }
}

/// The quantized counterpart: eight or four tokens at a time meet each weight row, the rest one
/// by one (four rows at a time where the type has such a kernel). Every result is bit-identical to
/// `vec_dot` of its row and token.
fn quantized_block(wrows: &[&[u8]], xs: &[&[u8]], out: &mut [f32], k: &vec_dot::DotKernels) {
    let n_tok = xs.len();
    let mut t = 0;
    if let Some(x8) = k.vec_dot_x8 {
        while t + 8 <= n_tok {
            let oct: [&[u8]; 8] = std::array::from_fn(|j| xs[t + j]);
            for (i, wr) in wrows.iter().enumerate() {
                let v = x8(wr, oct);
                out[i * n_tok + t..i * n_tok + t + 8].copy_from_slice(&v);
            }
            t += 8;
        }
    }
    while t + 4 <= n_tok {
        let quad = [xs[t], xs[t + 1], xs[t + 2], xs[t + 3]];
        for (i, wr) in wrows.iter().enumerate() {
            let v = (k.vec_dot_x4)(wr, quad);
            out[i * n_tok + t..i * n_tok + t + 4].copy_from_slice(&v);
        }
        t += 4;
    }
    for (t, xt) in xs.iter().enumerate().skip(t) {
        let mut i = 0;
        if let Some(rows4) = k.vec_dot_4rows {
            while i + 4 <= wrows.len() {
                let v = rows4([wrows[i], wrows[i + 1], wrows[i + 2], wrows[i + 3]], xt);
                for (j, vj) in v.into_iter().enumerate() {
                    out[(i + j) * n_tok + t] = vj;
                }
                i += 4;
            }
        }
        for (i, wr) in wrows.iter().enumerate().skip(i) {
            out[i * n_tok + t] = (k.vec_dot)(wr, xt);
        }
    }
}

fn bf16_direct_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        f.avx2 && f.fma
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Four BF16 rows (raw little-endian bytes) against one f32 row, each summed exactly as `tile`
/// sums the row converted to f32 (bit-identical). Callers check `bf16_direct_available`.
fn bf16_dot_rows4(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    assert!(w.iter().all(|r| r.len() >= 2 * n));
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX2 and FMA are present (bf16_direct_available); rows hold n values.
        unsafe { avx2::bf16_dot_rows4(w.map(|r| r.as_ptr()), x.as_ptr(), n) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16_direct_available is false off x86_64")
}

/// R×T dot products of equal-length rows.
#[inline]
pub fn tile<const R: usize, const T: usize>(w: [&[f32]; R], x: [&[f32]; T]) -> [[f32; T]; R] {
    let n = w[0].len();
    assert!(w.iter().all(|r| r.len() == n) && x.iter().all(|r| r.len() == n));
    #[cfg(target_arch = "x86_64")]
    {
        if cpu::features().avx2 && cpu::features().fma {
            // SAFETY: AVX2 and FMA are present (checked just above); all rows have length n.
            return unsafe { avx2::tile::<R, T>(w.map(|r| r.as_ptr()), x.map(|r| r.as_ptr()), n) };
        }
    }
    let mut out = [[0f32; T]; R];
    for (o, wr) in out.iter_mut().zip(w) {
        for (v, xr) in o.iter_mut().zip(x) {
            *v = dot_scalar(wr, xr);
        }
    }
    out
}

/// f32 dot product, SIMD where the CPU has it (the 1×1 tile).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    tile::<1, 1>([a], [b])[0][0]
}

/// Portable dot in the AVX2 tile's exact order (so every machine gives the same bits): 8 fused
/// lanes over chunks of 8, the lanes added pairwise, then the tail in order.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s = super::ops::reduce8(&acc);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    /// Four BF16 rows · one f32 row: `tile::<4, 1>` on the rows widened to f32, without the copy.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bf16_dot_rows4(w: [*const u8; 4], x: *const f32, n: usize) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let ahead = super::super::vec_dot::rows4_prefetch_ahead(2 * n);
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(x.add(i));
            for r in 0..4 {
                let p = w[r].add(2 * i);
                if i % 32 == 0 {
                    // as the quantized generation kernels: a row group ahead, once per line
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
                }
                let h = _mm_loadu_si128(p as *const __m128i);
                let wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                acc[r] = _mm256_fmadd_ps(wv, xv, acc[r]);
            }
            i += 8;
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            let mut s = hsum(acc[r]);
            for j in i..n {
                let b = u16::from_le_bytes([*w[r].add(2 * j), *w[r].add(2 * j + 1)]);
                s += f32::from_bits((b as u32) << 16) * *x.add(j);
            }
            out[r] = s;
        }
        out
    }

    /// BF16 row to f32: bf16 is the top half of an f32, so widen and shift, 8 at a time.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
        let n = dst.len().min(src.len() / 2);
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(ps.add(2 * i) as *const __m128i);
            let v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
            _mm256_storeu_ps(pd.add(i), _mm256_castsi256_ps(v));
            i += 8;
        }
        for j in i..n {
            dst[j] =
                f32::from_bits((u16::from_le_bytes([src[2 * j], src[2 * j + 1]]) as u32) << 16);
        }
    }

    /// F16 row to f32 with F16C, 8 at a time (exact, as every f16 is an f32).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
        let n = dst.len().min(src.len() / 2);
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(ps.add(2 * i) as *const __m128i);
            _mm256_storeu_ps(pd.add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in i..n {
            dst[j] =
                half::f16::from_bits(u16::from_le_bytes([src[2 * j], src[2 * j + 1]])).to_f32();
        }
    }

    /// One 8-lane FMA sum per (row, token) over chunks of 8, then the lanes, then the scalar tail:
    /// the same order for every tile shape. (FMA is fine: inference numerics, not quantization.)
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize, const T: usize>(
        w: [*const f32; R],
        x: [*const f32; T],
        n: usize,
    ) -> [[f32; T]; R] {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut i = 0;
        while i + 8 <= n {
            let mut xv = [_mm256_setzero_ps(); T];
            for t in 0..T {
                xv[t] = _mm256_loadu_ps(x[t].add(i));
            }
            for r in 0..R {
                let wv = _mm256_loadu_ps(w[r].add(i));
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            i += 8;
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                let mut s = hsum(acc[r][t]);
                for j in i..n {
                    s += *w[r].add(j) * *x[t].add(j);
                }
                out[r][t] = s;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata;

    fn naive(w: &[f32], x: &[f32], n_rows: usize, n_cols: usize, n_tok: usize) -> Vec<f32> {
        let mut y = vec![0f32; n_tok * n_rows];
        for t in 0..n_tok {
            for r in 0..n_rows {
                let mut s = 0f64;
                for c in 0..n_cols {
                    s += w[r * n_cols + c] as f64 * x[t * n_cols + c] as f64;
                }
                y[t * n_rows + r] = s as f32;
            }
        }
        y
    }

    #[test]
    fn fast_row_conversions_match_dequantize() {
        let x = testdata::heavy_tailed(8, 77);
        for ty in [GgmlType::F16, GgmlType::BF16] {
            let raw = quant::quantize("x", &x, 77, ty, None).unwrap();
            let want = quant::dequantize("x", &raw, 77, ty).unwrap();
            let RowKernel::ToF32(convert) = row_kernel(ty) else {
                panic!("{ty} converts to f32")
            };
            let mut got = vec![0f32; 77];
            convert(&raw, &mut got);
            assert_eq!(got, want, "{ty}");
        }
    }

    #[test]
    fn matmul_matches_naive_for_float_and_q8_0_rows() {
        let (n_rows, n_cols) = (37, 96);
        let w = testdata::heavy_tailed(3, n_rows * n_cols);
        let x = testdata::heavy_tailed(4, 9 * n_cols);
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_1,
        ] {
            let raw = quant::quantize("w", &w, n_cols, ty, None).unwrap();
            let wq = quant::dequantize("w", &raw, n_cols, ty).unwrap();
            let m = Mat {
                name: "w",
                data: &raw,
                ty,
                n_cols,
                n_rows,
            };
            for n_tok in [1, 5, 9] {
                let mut y = vec![0f32; n_tok * n_rows];
                matmul(&m, &x[..n_tok * n_cols], n_tok, &mut y);
                let want = naive(&wq, &x, n_rows, n_cols, n_tok);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                // Q8_0 rows meet Q8_0-quantized activations (~0.4% noise), the others exact f32.
                let tol = if ty.is_float() { 1e-5 } else { 2e-2 };
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= tol * scale, "{ty}: {a} vs {b}");
                }
            }
        }
    }

    /// Whatever path a batch takes (x8/x4 tiles, Q8_0 tiles, the VNNI 16-row GEMM with its tail
    /// rows and token-major assembly), every output is `vec_dot` of its row and token, bit for bit.
    #[test]
    fn batched_quantized_matmul_equals_vec_dot_per_row_and_token() {
        let n_cols = 512;
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q2_K,
            GgmlType::IQ4_XS,
        ] {
            let k = vec_dot::kernels(ty).unwrap();
            for n_rows in [16, 37, 160] {
                let w = testdata::heavy_tailed(11, n_rows * n_cols);
                let raw = quant::quantize("w", &w, n_cols, ty, None).unwrap();
                let m = Mat {
                    name: "w",
                    data: &raw,
                    ty,
                    n_cols,
                    n_rows,
                };
                let rb = m.row_bytes();
                for n_tok in [1, 4, 7, 33] {
                    let x = testdata::gaussian(12, n_tok * n_cols);
                    let mut y = vec![f32::NAN; n_tok * n_rows];
                    matmul(&m, &x, n_tok, &mut y);
                    let mut q = vec![0u8; k.act_row_bytes(n_cols)];
                    for t in 0..n_tok {
                        (k.quantize_act)(&x[t * n_cols..(t + 1) * n_cols], &mut q);
                        for r in 0..n_rows {
                            let want = (k.vec_dot)(&raw[r * rb..(r + 1) * rb], &q);
                            let got = y[t * n_rows + r];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{ty} rows {n_rows} tokens {n_tok}: r{r} t{t}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_generation_path_equals_the_converted_tiles() {
        let (n_rows, n_cols) = (13, 77);
        let w = testdata::heavy_tailed(7, n_rows * n_cols);
        let raw = quant::quantize("w", &w, n_cols, GgmlType::BF16, None).unwrap();
        let x = testdata::heavy_tailed(8, 3 * n_cols);
        let m = Mat {
            name: "w",
            data: &raw,
            ty: GgmlType::BF16,
            n_cols,
            n_rows,
        };
        // 3 tokens take the converted-tile path, 1 or 2 the direct one: same bits per token
        let mut y3 = vec![0f32; 3 * n_rows];
        matmul(&m, &x, 3, &mut y3);
        for n_tok in [1, 2] {
            let mut y = vec![0f32; n_tok * n_rows];
            matmul(&m, &x[..n_tok * n_cols], n_tok, &mut y);
            assert!(
                y.iter().zip(&y3).all(|(a, b)| a.to_bits() == b.to_bits()),
                "n_tok={n_tok}"
            );
        }
    }

    #[test]
    fn simd_dot_matches_scalar() {
        let a = testdata::heavy_tailed(5, 1000);
        let b = testdata::heavy_tailed(6, 1000);
        for n in [0, 1, 7, 8, 31, 32, 33, 1000] {
            let (x, y) = (dot(&a[..n], &b[..n]), dot_scalar(&a[..n], &b[..n]));
            // every tile shape gives bit-identical results to the 1×1 one
            let (p, q) = (&a[..n], &b[..n]);
            let t43 = tile::<4, 3>([p; 4], [q; 3]);
            let t41 = tile::<4, 1>([p; 4], [q]);
            let t13 = tile::<1, 3>([p], [q; 3]);
            let all = t43
                .iter()
                .flatten()
                .chain(t41.iter().flatten())
                .chain(t13.iter().flatten());
            assert!(all.into_iter().all(|v| v.to_bits() == x.to_bits()), "n={n}");
            assert_eq!(x.to_bits(), y.to_bits(), "n={n}: SIMD {x} vs portable {y}");
        }
    }
}
