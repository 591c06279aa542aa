//! Q8_0: 32 weights as int8 with one f16 scale. Block: d (f16) | qs[32] (i8) = 34 bytes.

use half::f16;

use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const QK8_0: usize = 32;
pub const BLOCK_BYTES: usize = 34;

pub struct Q8_0;
pub const Q8_0_KERNELS: Kernels = kernels_of::<Q8_0>();

impl BlockQuant for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;

    /// quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d) (half away from zero).
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
        for (x, y) in src
            .chunks_exact(QK8_0)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            y[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            for (q, v) in y[2..].iter_mut().zip(x) {
                *q = ((v * id).round() as i8) as u8;
            }
        }
    }

    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK8_0))
        {
            let d = f16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32();
            for (o, q) in y.iter_mut().zip(&x[2..]) {
                *o = (*q as i8) as f32 * d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::assert_fast_matches_ref;

    #[test]
    fn fast_matches_reference() {
        assert_fast_matches_ref(&Q8_0_KERNELS, 256, false);
    }
}
