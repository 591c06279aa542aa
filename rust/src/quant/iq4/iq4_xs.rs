//! IQ4_XS: 256 weights as 4-bit indices into kvalues_iq4nl, eight 32-weight sub-blocks with 6-bit
//! scales under one f16 scale. Block: d (f16) | scales_h (u16, 2 bits per sub-block) |
//! scales_l[4] (4 bits per sub-block) | qs[128] (as IQ4_NL, per sub-block) = 136 bytes.

use half::f16;

use super::{
    dequantize_nibbles_ref, indices_ref, pack_nibbles, quantize_superblock, search_scale_ref,
};
use super::{IndexFn, ScaleSearchFn};
#[cfg(target_arch = "x86_64")]
use crate::quant::cpu;
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::{GgmlType, QK_K};

pub const BLOCK_BYTES: usize = 136;

pub struct Iq4Xs;
pub const IQ4_XS_KERNELS: Kernels = kernels_of::<Iq4Xs>();

fn quantize_row_with(
    src: &[f32],
    dst: &mut [u8],
    imatrix: Option<&[f32]>,
    search: ScaleSearchFn,
    indices: IndexFn,
) {
    let mut l = [0u8; QK_K];
    for (ibl, (x, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
        .enumerate()
    {
        let qw = imatrix.map(|w| &w[QK_K * ibl..QK_K * (ibl + 1)]);
        let sb = quantize_superblock(x, qw, &mut l, search, indices);
        let mut scales_h = 0u16;
        let mut scales_l = [0u8; 4];
        for (ib, ls) in sb.sub_scales.iter().enumerate() {
            scales_l[ib / 2] |= (ls & 0xf) << (4 * (ib % 2));
            scales_h |= ((ls >> 4) as u16) << (2 * ib);
        }
        y[..2].copy_from_slice(&sb.d.to_le_bytes());
        y[2..4].copy_from_slice(&scales_h.to_le_bytes());
        y[4..8].copy_from_slice(&scales_l);
        pack_nibbles(&l, &mut y[8..]);
    }
}

/// The scale of sub-block `ib`: d · (6-bit scale - 32).
#[inline]
fn sub_scale(x: &[u8], d: f32, ib: usize) -> f32 {
    let scales_h = u16::from_le_bytes([x[2], x[3]]);
    let ls = ((x[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32
        | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
    d * (ls - 32) as f32
}

impl BlockQuant for Iq4Xs {
    const TYPE: GgmlType = GgmlType::IQ4_XS;

    /// ggml's `quantize_iq4_xs` (ntry = 7), imatrix optional.
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
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = f16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32();
            for (ib, (qs, yb)) in x[8..]
                .chunks_exact(16)
                .zip(y.chunks_exact_mut(32))
                .enumerate()
            {
                dequantize_nibbles_ref(qs, sub_scale(x, d, ib), yb);
            }
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if cpu::has_avx2() {
            for (x, y) in src
                .chunks_exact(BLOCK_BYTES)
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = f16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32();
                for (ib, (qs, yb)) in x[8..]
                    .chunks_exact(16)
                    .zip(y.chunks_exact_mut(32))
                    .enumerate()
                {
                    // SAFETY: AVX2 was detected; the slices hold 16 bytes and 32 floats.
                    unsafe { super::avx2::dequantize_nibbles(qs, sub_scale(x, d, ib), yb) };
                }
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
        assert_fast_matches_ref(&IQ4_XS_KERNELS, 512, true);
    }

    #[test]
    fn round_trip_error_is_small() {
        let x = gaussian(3, 4096);
        let rmse = round_trip_rmse(&IQ4_XS_KERNELS, &x, 512, None);
        assert!(rmse < 0.0017, "{rmse}");
    }
}
