//! Float storage types F32, F16 and BF16 as "blocks" of one element, so they share the quant drivers.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub struct F32;
pub struct F16;
pub struct BF16;

pub const F32_KERNELS: Kernels = kernels_of::<F32>();
pub const F16_KERNELS: Kernels = kernels_of::<F16>();
pub const BF16_KERNELS: Kernels = kernels_of::<BF16>();

impl BlockQuant for F32 {
    const TYPE: GgmlType = GgmlType::F32;
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
        for (o, x) in dst.chunks_exact_mut(4).zip(src) {
            o.copy_from_slice(&x.to_le_bytes());
        }
    }
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

impl BlockQuant for F16 {
    const TYPE: GgmlType = GgmlType::F16;
    /// Round to nearest even, overflow to ±inf: what numpy's astype(float16) and ggml's F16C do.
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
        for (o, x) in dst.chunks_exact_mut(2).zip(src) {
            o.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
        }
    }
    fn quantize_row(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
        // half's slice conversion uses F16C when the CPU has it; same rounding as the scalar path.
        let mut tmp = vec![f16::ZERO; src.len()];
        tmp.convert_from_f32_slice(src);
        for (o, h) in dst.chunks_exact_mut(2).zip(&tmp) {
            o.copy_from_slice(&h.to_bits().to_le_bytes());
        }
    }
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        }
    }
    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        let halves: Vec<f16> = src
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        halves.convert_to_f32_slice(dst);
    }
}

/// ggml_compute_fp32_to_bf16: NaN forced quiet, otherwise round to nearest even.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 64) as u16;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

impl BlockQuant for BF16 {
    const TYPE: GgmlType = GgmlType::BF16;
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
        for (o, x) in dst.chunks_exact_mut(2).zip(src) {
            o.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
        }
    }
    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::assert_fast_matches_ref;

    #[test]
    fn fast_paths_match_reference() {
        for k in [&F32_KERNELS, &F16_KERNELS, &BF16_KERNELS] {
            assert_fast_matches_ref(k, 256, false);
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie -> even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie -> even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
    }

    #[test]
    fn f16_overflows_to_infinity_like_numpy() {
        let mut out = [0u8; 2];
        F16::quantize_row_ref(&[70000.0], &mut out, None);
        assert_eq!(u16::from_le_bytes(out), 0x7c00);
    }
}
