//! Block quantizers: one module per type (family), each with its block layout, a scalar reference
//! (the spec, following ggml's `*_ref` functions) and a fast path picked at run time.
//!
//! The drivers here validate input (finite values, whole blocks, imatrix length), then run a type's
//! row kernel over rows in parallel with rayon. Rows are independent, so the bytes never depend on
//! the thread count.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::types::GgmlType;

pub mod cpu;
pub mod float;
pub mod iq1;
pub mod iq2;
pub mod iq3;
pub mod iq4;
pub mod iq_tables;
pub mod kquants;
pub mod legacy;
pub mod testdata;
pub mod util;

/// A block type's kernels, all working on whole rows (a multiple of the block size).
pub trait BlockQuant {
    const TYPE: GgmlType;
    /// llama.cpp refuses to make this type without an importance matrix; so do we.
    const REQUIRES_IMATRIX: bool = false;

    /// Reference quantization: the spec. `imatrix` holds one importance weight per column.
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>);
    /// Fast path; must produce exactly the bytes of `quantize_row_ref`.
    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        Self::quantize_row_ref(src, dst, imatrix)
    }
    /// Reference dequantization: the spec.
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]);
    /// Fast path; must produce exactly the values of `dequantize_row_ref`.
    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        Self::dequantize_row_ref(src, dst)
    }
}

pub type QuantizeRowFn = fn(&[f32], &mut [u8], Option<&[f32]>);
pub type DequantizeRowFn = fn(&[u8], &mut [f32]);

/// Type-erased kernels of one type, for run-time dispatch on a `GgmlType`.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub ty: GgmlType,
    pub requires_imatrix: bool,
    pub quantize_row: QuantizeRowFn,
    pub quantize_row_ref: QuantizeRowFn,
    pub dequantize_row: DequantizeRowFn,
    pub dequantize_row_ref: DequantizeRowFn,
}

pub const fn kernels_of<T: BlockQuant>() -> Kernels {
    Kernels {
        ty: T::TYPE,
        requires_imatrix: T::REQUIRES_IMATRIX,
        quantize_row: T::quantize_row,
        quantize_row_ref: T::quantize_row_ref,
        dequantize_row: T::dequantize_row,
        dequantize_row_ref: T::dequantize_row_ref,
    }
}

/// The kernels of `ty`, or None where pyqmoe cannot (yet) convert that type.
pub fn kernels(ty: GgmlType) -> Option<&'static Kernels> {
    use GgmlType::*;
    match ty {
        F32 => Some(&float::F32_KERNELS),
        F16 => Some(&float::F16_KERNELS),
        BF16 => Some(&float::BF16_KERNELS),
        Q4_0 => Some(&legacy::Q4_0_KERNELS),
        Q4_1 => Some(&legacy::Q4_1_KERNELS),
        Q5_0 => Some(&legacy::Q5_0_KERNELS),
        Q5_1 => Some(&legacy::Q5_1_KERNELS),
        Q8_0 => Some(&legacy::Q8_0_KERNELS),
        Q2_K => Some(&kquants::Q2_K_KERNELS),
        Q3_K => Some(&kquants::Q3_K_KERNELS),
        Q4_K => Some(&kquants::Q4_K_KERNELS),
        Q5_K => Some(&kquants::Q5_K_KERNELS),
        Q6_K => Some(&kquants::Q6_K_KERNELS),
        Q8_K => Some(&kquants::Q8_K_KERNELS),
        IQ3_XXS => Some(&iq3::IQ3_XXS_KERNELS),
        IQ3_S => Some(&iq3::IQ3_S_KERNELS),
        IQ4_NL => Some(&iq4::IQ4_NL_KERNELS),
        IQ4_XS => Some(&iq4::IQ4_XS_KERNELS),
        IQ2_XXS => Some(&iq2::IQ2_XXS_KERNELS),
        IQ2_XS => Some(&iq2::IQ2_XS_KERNELS),
        IQ2_S => Some(&iq2::IQ2_S_KERNELS),
        IQ1_S => Some(&iq1::IQ1_S_KERNELS),
        IQ1_M => Some(&iq1::IQ1_M_KERNELS),
        _ => None,
    }
}

fn kernels_or_err(ty: GgmlType, what: &str) -> Result<&'static Kernels> {
    kernels(ty).ok_or_else(|| {
        Error::UnknownType(format!("pyqmoe cannot {what} {} tensors yet", ty.name()))
    })
}

/// The types pyqmoe can quantize to and dequantize from.
pub fn supported_types() -> Vec<GgmlType> {
    crate::types::ALL_TYPES
        .iter()
        .copied()
        .filter(|t| kernels(*t).is_some())
        .collect()
}

/// Rows handed to one rayon task: enough work to amortise scheduling, small enough to balance.
fn rows_per_task(n_per_row: usize, n_rows: usize) -> usize {
    let target = (1 << 16) / n_per_row.max(1);
    target.clamp(1, n_rows.max(1))
}

/// Refuse NaN/Inf, naming the tensor and the first bad element.
pub fn check_finite(tensor: &str, src: &[f32], n_per_row: usize) -> Result<()> {
    let bad = src
        .par_chunks(1 << 16)
        .enumerate()
        .find_first(|(_, c)| c.iter().any(|v| !v.is_finite()))
        .map(|(i, c)| i * (1 << 16) + c.iter().position(|v| !v.is_finite()).unwrap());
    match bad {
        None => Ok(()),
        Some(i) => Err(Error::tensor(
            tensor,
            format!(
                "value {} at row {}, column {} is not finite; refusing to quantize",
                src[i],
                i / n_per_row.max(1),
                i % n_per_row.max(1)
            ),
        )),
    }
}

/// Shape checks shared by quantize and dequantize; returns the number of rows.
fn check_shape(tensor: &str, n_elems: usize, n_per_row: usize, ty: GgmlType) -> Result<usize> {
    if n_per_row == 0 {
        return Err(Error::tensor(tensor, "row length is 0"));
    }
    if !n_elems.is_multiple_of(n_per_row) {
        return Err(Error::tensor(
            tensor,
            format!("{n_elems} elements are not a whole number of rows of {n_per_row}"),
        ));
    }
    if !n_per_row.is_multiple_of(ty.block_size()) {
        return Err(Error::tensor(
            tensor,
            format!(
                "row length {n_per_row} is not a multiple of the {} block size {}",
                ty.name(),
                ty.block_size()
            ),
        ));
    }
    Ok(n_elems / n_per_row)
}

/// Checks an importance matrix: `n_per_row` weights, or `n_per_row × k` (one slice per expert,
/// where the rows split evenly into `k` experts). Returns the rows per slice.
fn check_imatrix(tensor: &str, imatrix: &[f32], n_per_row: usize, n_rows: usize) -> Result<usize> {
    let k = imatrix.len() / n_per_row;
    if !imatrix.len().is_multiple_of(n_per_row) || k == 0 || !n_rows.is_multiple_of(k) {
        return Err(Error::tensor(
            tensor,
            format!(
                "importance matrix has {} entries; expected {n_per_row} (one per column) or a multiple \
                 of it that divides {n_rows} rows into experts",
                imatrix.len()
            ),
        ));
    }
    if let Some(i) = imatrix.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(Error::tensor(
            tensor,
            format!(
                "importance matrix entry {i} is {} (must be finite and >= 0)",
                imatrix[i]
            ),
        ));
    }
    Ok(n_rows / k)
}

/// Quantize `src` (rows of `n_per_row`) to `ty` into `dst`, rows in parallel.
pub fn quantize_into(
    tensor: &str,
    src: &[f32],
    n_per_row: usize,
    ty: GgmlType,
    imatrix: Option<&[f32]>,
    dst: &mut [u8],
) -> Result<()> {
    let k = kernels_or_err(ty, "quantize to")?;
    let n_rows = check_shape(tensor, src.len(), n_per_row, ty)?;
    let row_bytes = ty.row_size(n_per_row)?;
    if dst.len() != n_rows * row_bytes {
        return Err(Error::tensor(
            tensor,
            format!(
                "output buffer has {} bytes, need {}",
                dst.len(),
                n_rows * row_bytes
            ),
        ));
    }
    if k.requires_imatrix && imatrix.is_none() {
        return Err(Error::tensor(
            tensor,
            format!(
                "{} needs an importance matrix: pass --imatrix FILE (CLI) or imatrix=... (API); \
                 make one with `pyqmoe imatrix`",
                ty.name()
            ),
        ));
    }
    let rows_per_slice = match imatrix {
        Some(w) => check_imatrix(tensor, w, n_per_row, n_rows)?,
        None => n_rows,
    };
    let step = rows_per_task(n_per_row, n_rows);
    let quantize_row = k.quantize_row;
    let saw_non_finite = AtomicBool::new(false);
    dst.par_chunks_mut(row_bytes * step)
        .zip(src.par_chunks(n_per_row * step))
        .enumerate()
        .for_each(|(task, (out, inp))| {
            // Checked per task, while the rows are in cache, rather than in a pass of its own over
            // the tensor (which cost as much as the fast kernels); kernels never see NaN/Inf.
            if !all_finite(inp) {
                saw_non_finite.store(true, Ordering::Relaxed);
                return;
            }
            for (j, (o, x)) in out
                .chunks_mut(row_bytes)
                .zip(inp.chunks(n_per_row))
                .enumerate()
            {
                let row = task * step + j;
                let w = imatrix.map(|w| {
                    let s = row / rows_per_slice;
                    &w[s * n_per_row..(s + 1) * n_per_row]
                });
                quantize_row(x, o, w);
            }
        });
    if saw_non_finite.load(Ordering::Relaxed) {
        // Error path only: find the first bad element for the message.
        check_finite(tensor, src, n_per_row)?;
    }
    Ok(())
}

/// True when no element is NaN or ±Inf (exponent bits all ones); branch-free so it vectorises.
fn all_finite(xs: &[f32]) -> bool {
    xs.chunks(256).all(|c| {
        c.iter().fold(0u32, |acc, v| {
            acc | ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32
        }) == 0
    })
}

/// Quantize `src` (rows of `n_per_row`) to `ty`, returning the packed bytes.
pub fn quantize(
    tensor: &str,
    src: &[f32],
    n_per_row: usize,
    ty: GgmlType,
    imatrix: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let n_rows = check_shape(tensor, src.len(), n_per_row, ty)?;
    let mut dst = vec![0u8; n_rows * ty.row_size(n_per_row)?];
    quantize_into(tensor, src, n_per_row, ty, imatrix, &mut dst)?;
    Ok(dst)
}

/// Dequantize packed rows of `ty` (`n_per_row` elements each) into `dst`, rows in parallel.
pub fn dequantize_into(
    tensor: &str,
    src: &[u8],
    n_per_row: usize,
    ty: GgmlType,
    dst: &mut [f32],
) -> Result<()> {
    let k = kernels_or_err(ty, "dequantize")?;
    let n_rows = check_shape(tensor, dst.len(), n_per_row, ty)?;
    let row_bytes = ty.row_size(n_per_row)?;
    if src.len() != n_rows * row_bytes {
        return Err(Error::tensor(
            tensor,
            format!(
                "{} bytes of {} data do not hold {} rows of {n_per_row} (need {})",
                src.len(),
                ty.name(),
                n_rows,
                n_rows * row_bytes
            ),
        ));
    }
    let step = rows_per_task(n_per_row, n_rows);
    let dequantize_row = k.dequantize_row;
    dst.par_chunks_mut(n_per_row * step)
        .zip(src.par_chunks(row_bytes * step))
        .for_each(|(out, inp)| {
            for (o, x) in out.chunks_mut(n_per_row).zip(inp.chunks(row_bytes)) {
                dequantize_row(x, o);
            }
        });
    Ok(())
}

/// Dequantize `n_rows × n_per_row` elements of `ty` to f32.
pub fn dequantize(tensor: &str, src: &[u8], n_per_row: usize, ty: GgmlType) -> Result<Vec<f32>> {
    let row_bytes = ty.row_size(n_per_row)?;
    if row_bytes == 0 || !src.len().is_multiple_of(row_bytes) {
        return Err(Error::tensor(
            tensor,
            format!(
                "{} bytes are not whole rows of {} ({row_bytes} bytes each)",
                src.len(),
                ty.name()
            ),
        ));
    }
    let mut dst = vec![0f32; src.len() / row_bytes * n_per_row];
    dequantize_into(tensor, src, n_per_row, ty, &mut dst)?;
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_nan_naming_tensor_row_and_column() {
        let mut x = vec![0.5f32; 64];
        x[40] = f32::NAN;
        let e = quantize("blk.0.attn_q.weight", &x, 32, GgmlType::Q8_0, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("blk.0.attn_q.weight") && msg.contains("row 1, column 8"),
            "{msg}"
        );
        x[40] = f32::INFINITY;
        assert!(quantize("t", &x, 32, GgmlType::Q8_0, None).is_err());
    }

    #[test]
    fn refuses_partial_blocks_and_bad_imatrix() {
        let x = vec![1.0f32; 48];
        assert!(quantize("t", &x, 48, GgmlType::Q8_0, None)
            .unwrap_err()
            .to_string()
            .contains("block size"));
        let x = vec![1.0f32; 64];
        assert!(quantize("t", &x, 32, GgmlType::Q8_0, Some(&[1.0; 31])).is_err());
        assert!(quantize("t", &x, 32, GgmlType::Q8_0, Some(&[-1.0; 32])).is_err());
        assert!(quantize("t", &x, 32, GgmlType::Q8_0, Some(&[1.0; 96])).is_err());
    }

    #[test]
    fn thread_count_does_not_change_bytes() {
        let x = testdata::heavy_tailed(7, 64 * 512);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let many = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let w = testdata::importance(8, 512);
        for ty in supported_types() {
            let imatrix = kernels(ty).unwrap().requires_imatrix.then_some(&w[..]);
            let a = one.install(|| quantize("t", &x, 512, ty, imatrix).unwrap());
            let b = many.install(|| quantize("t", &x, 512, ty, imatrix).unwrap());
            assert_eq!(a, b, "{ty}");
        }
    }
}
