//! Weight-matrix × activation products over rows of any supported storage type.
//!
//! `matmul` computes y[t][r] = Σ_c W[r][c]·x[t][c] for a batch of tokens, reading each weight row
//! once per call: rows are handled in blocks (rayon over blocks), each block meeting every token's
//! activations. How a row becomes dot products is a `RowKernel` chosen per type: F32 rows are read
//! in place, F16/BF16 (and any type without a quantized kernel) are converted to f32 block by
//! block, and Q8_0 rows use an integer dot against activations quantized once per call, as ggml
//! does (`vec_dot`). New per-type quantized kernels slot in as `RowKernel::Quantized` entries.

use rayon::prelude::*;

use crate::quant::{self, cpu, DequantizeRowFn};
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
    /// F32 rows read in place from the map, no copy.
    F32InPlace,
    /// Rows converted to f32 (block by block, by the type's dequantizer), then f32 dots.
    Dequantize(DequantizeRowFn),
    /// Rows kept in their block format; activations quantized once per call to `act_ty` and
    /// multiplied with an integer dot kernel (ggml's `vec_dot_type` scheme).
    Quantized {
        act_ty: GgmlType,
        quantize_act: fn(&[f32], &mut [u8]),
        vec_dot: fn(&[u8], &[u8]) -> f32,
    },
}

fn row_kernel(ty: GgmlType) -> RowKernel {
    match ty {
        GgmlType::F32 if cfg!(target_endian = "little") => RowKernel::F32InPlace,
        GgmlType::Q8_0 => RowKernel::Quantized {
            act_ty: GgmlType::Q8_0,
            quantize_act: vec_dot::quantize_act_q8_0,
            vec_dot: vec_dot::vec_dot_q8_0,
        },
        _ => RowKernel::Dequantize(
            quant::kernels(ty)
                .expect("weight types are checked at load time")
                .dequantize_row,
        ),
    }
}

/// Reinterprets little-endian f32 bytes in place; None when the bytes are not 4-byte aligned.
fn as_f32s(bytes: &[u8]) -> Option<&[f32]> {
    // SAFETY: every bit pattern is a valid f32; align_to only hands out the aligned middle part.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}

/// Rows per rayon task: big enough to amortise scheduling, small enough to keep every thread busy
/// and the converted block in L2.
fn rows_per_block(n_rows: usize, n_cols: usize) -> usize {
    let by_cache = ((64 << 10) / (4 * n_cols.max(1))).max(1);
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
    let kernel = row_kernel(w.ty);
    let row_bytes = w.row_bytes();
    let block = rows_per_block(n_rows, n_cols);
    // Each task writes its rows for all tokens into its own slice of a row-major [n_rows][n_tok]
    // buffer; one transpose at the end gives [n_tok][n_rows].
    let mut yt = vec![0f32; n_rows * n_tok];
    match kernel {
        RowKernel::Quantized {
            act_ty,
            quantize_act,
            vec_dot,
        } => {
            let act_row = act_ty
                .row_size(n_cols)
                .expect("quantized weight rows are whole blocks");
            let mut xq = vec![0u8; n_tok * act_row];
            xq.par_chunks_mut(act_row)
                .zip(x.par_chunks(n_cols))
                .for_each(|(q, xr)| quantize_act(xr, q));
            yt.par_chunks_mut(block * n_tok)
                .enumerate()
                .for_each(|(b, out)| {
                    let r0 = b * block;
                    let wrows = &w.data[r0 * row_bytes..(r0 + out.len() / n_tok) * row_bytes];
                    for (t, xt) in xq.chunks_exact(act_row).enumerate() {
                        for (i, wr) in wrows.chunks_exact(row_bytes).enumerate() {
                            out[i * n_tok + t] = vec_dot(wr, xt);
                        }
                    }
                });
        }
        RowKernel::F32InPlace | RowKernel::Dequantize(_) => {
            let in_place = match kernel {
                RowKernel::F32InPlace => as_f32s(w.data),
                _ => None,
            };
            let dequantize: DequantizeRowFn = match kernel {
                RowKernel::Dequantize(f) => f,
                _ => quant::float::F32_KERNELS.dequantize_row,
            };
            yt.par_chunks_mut(block * n_tok)
                .enumerate()
                .for_each(|(b, out)| {
                    let r0 = b * block;
                    let rows = out.len() / n_tok;
                    let mut buf = Vec::new();
                    let wrows: &[f32] = match in_place {
                        Some(all) => &all[r0 * n_cols..(r0 + rows) * n_cols],
                        None => {
                            buf.resize(rows * n_cols, 0.0);
                            for (i, dst) in buf.chunks_exact_mut(n_cols).enumerate() {
                                let r = r0 + i;
                                dequantize(&w.data[r * row_bytes..(r + 1) * row_bytes], dst);
                            }
                            &buf
                        }
                    };
                    // Token-outer order keeps one activation row in L1 while it meets every row.
                    for (t, xt) in x.chunks_exact(n_cols).enumerate() {
                        for (i, wr) in wrows.chunks_exact(n_cols).enumerate() {
                            out[i * n_tok + t] = dot(wr, xt);
                        }
                    }
                });
        }
    }
    if n_tok == 1 {
        y.copy_from_slice(&yt);
    } else {
        for (r, col) in yt.chunks_exact(n_tok).enumerate() {
            for (t, v) in col.iter().enumerate() {
                y[t * n_rows + r] = *v;
            }
        }
    }
}

/// f32 dot product, SIMD where the CPU has it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if cpu::features().avx2 && cpu::features().fma {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            return unsafe { avx2::dot(a, b) };
        }
    }
    dot_scalar(a, b)
}

/// Portable dot with 8 independent sums, so the compiler can vectorise it.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Four 8-lane FMA accumulators (inference numerics, not byte-exact quantization: FMA is fine).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                let y = _mm256_loadu_ps(pb.add(i + 8 * j));
                *s = _mm256_fmadd_ps(x, y, *s);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let lo = _mm256_castps256_ps128(s);
        let hi = _mm256_extractf128_ps(s, 1);
        let q = _mm_add_ps(lo, hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut total = _mm_cvtss_f32(q);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
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
    fn matmul_matches_naive_for_float_and_q8_0_rows() {
        let (n_rows, n_cols) = (37, 96);
        let w = testdata::heavy_tailed(3, n_rows * n_cols);
        let x = testdata::heavy_tailed(4, 5 * n_cols);
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0] {
            let raw = quant::quantize("w", &w, n_cols, ty, None).unwrap();
            let wq = quant::dequantize("w", &raw, n_cols, ty).unwrap();
            let m = Mat {
                name: "w",
                data: &raw,
                ty,
                n_cols,
                n_rows,
            };
            for n_tok in [1, 5] {
                let mut y = vec![0f32; n_tok * n_rows];
                matmul(&m, &x[..n_tok * n_cols], n_tok, &mut y);
                let want = naive(&wq, &x, n_rows, n_cols, n_tok);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                // Q8_0 rows meet Q8_0-quantized activations (~0.4% noise), the others exact f32.
                let tol = if ty == GgmlType::Q8_0 { 2e-2 } else { 1e-5 };
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= tol * scale, "{ty}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn simd_dot_matches_scalar() {
        let a = testdata::heavy_tailed(5, 1000);
        let b = testdata::heavy_tailed(6, 1000);
        for n in [0, 1, 7, 8, 31, 32, 33, 1000] {
            let (x, y) = (dot(&a[..n], &b[..n]), dot_scalar(&a[..n], &b[..n]));
            let mag: f32 = a[..n].iter().zip(&b[..n]).map(|(p, q)| (p * q).abs()).sum();
            assert!((x - y).abs() <= 1e-5 * mag.max(1.0), "n={n}: {x} vs {y}");
        }
    }
}
