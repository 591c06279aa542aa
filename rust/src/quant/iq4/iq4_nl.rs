//! IQ4_NL: 32 weights as 4-bit indices into kvalues_iq4nl with one f16 scale.
//! Block: d (f16) | qs[16] (element j low nibble, j + 16 high nibble) = 18 bytes.

use half::f16;

use super::{
    dequantize_nibbles_ref, indices_ref, pack_nibbles, quantize_superblock, search_scale_ref,
};
use super::{IndexFn, ScaleSearchFn};
#[cfg(target_arch = "x86_64")]
use crate::quant::cpu;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const QK4_NL: usize = 32;
pub const BLOCK_BYTES: usize = 18;

pub struct Iq4Nl;
pub const IQ4_NL_KERNELS: Kernels = kernels_of::<Iq4Nl>();

fn quantize_row_with(
    src: &[f32],
    dst: &mut [u8],
    imatrix: Option<&[f32]>,
    search: ScaleSearchFn,
    indices: IndexFn,
) {
    let mut l = [0u8; QK4_NL];
    for (ib, (x, y)) in src
        .chunks_exact(QK4_NL)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        let qw = imatrix.map(|w| &w[QK4_NL * ib..QK4_NL * (ib + 1)]);
        let sb = quantize_superblock(x, qw, &mut l, search, indices);
        y[..2].copy_from_slice(&sb.d.to_le_bytes());
        pack_nibbles(&l, &mut y[2..]);
    }
}

impl BlockQuant for Iq4Nl {
    const TYPE: GgmlType = GgmlType::IQ4_NL;

    /// ggml's `quantize_iq4_nl` (ntry = 7, what llama-quantize runs), imatrix optional.
    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row_with(src, dst, imatrix, search_scale_ref, indices_ref);
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        #[cfg(target_arch = "x86_64")]
        if cpu::has_avx2() {
            return quantize_row_with(
                src,
                dst,
                imatrix,
                super::avx2::search_scale,
                super::avx2::indices,
            );
        }
        Self::quantize_row_ref(src, dst, imatrix)
    }

    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK4_NL))
        {
            let d = f16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32();
            dequantize_nibbles_ref(&x[2..], d, y);
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if cpu::has_avx2() {
            for (x, y) in src
                .chunks_exact(BLOCK_BYTES)
                .zip(dst.chunks_exact_mut(QK4_NL))
            {
                let d = f16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32();
                // SAFETY: AVX2 was detected; the slices hold 16 bytes and 32 floats.
                unsafe { super::avx2::dequantize_nibbles(&x[2..], d, y) };
            }
            return;
        }
        Self::dequantize_row_ref(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::{assert_fast_matches_ref, gaussian, round_trip_rmse};

    #[test]
    fn fast_matches_reference() {
        assert_fast_matches_ref(&IQ4_NL_KERNELS, 512, true);
    }

    #[test]
    fn round_trip_error_is_small() {
        let x = gaussian(3, 4096);
        let rmse = round_trip_rmse(&IQ4_NL_KERNELS, &x, 512, None);
        // About 0.08 of the standard deviation (0.02), as llama.cpp gets on such data.
        assert!(rmse < 0.0017, "{rmse}");
    }

    #[test]
    fn zero_imatrix_block_gets_zero_scale() {
        let mut x = gaussian(4, 64);
        x[40] = 0.5;
        let mut w = vec![1.0f32; 64];
        w[..32].fill(0.0);
        let mut q = vec![0u8; 2 * BLOCK_BYTES];
        Iq4Nl::quantize_row_ref(&x, &mut q, Some(&w));
        assert_eq!(&q[..2], &[0, 0]);
        assert_ne!(&q[18..20], &[0, 0]);
    }
}
