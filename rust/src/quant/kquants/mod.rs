//! The k-quants: 256-element super-blocks split into 16 or 32-element sub-blocks whose scales
//! (and mins) are themselves quantized. Q2_K..Q6_K are model weight formats; Q8_K is ggml's
//! intermediate format for activations in the k-quant dot products.
//!
//! Each type's reference path follows ggml's `quantize_row_qX_K_ref` (no importance matrix) and
//! `quantize_row_qX_K_impl` (with one). The AVX2 fast paths in [`lanes`] run the per-sub-block
//! searches with one sub-block per SIMD lane, so every lane performs exactly the scalar sequence
//! of IEEE operations and the bytes cannot differ.

// Index loops over parallel sub-block arrays mirror ggml's loops (and its evaluation order).
#![allow(clippy::needless_range_loop)]

use half::f16;

#[cfg(target_arch = "x86_64")]
pub(crate) mod lanes;
pub mod q2_k;
pub mod q3_k;
pub mod q4_k;
pub mod q5_k;
pub mod q6_k;
pub mod q8_k;

pub use q2_k::Q2_K_KERNELS;
pub use q3_k::Q3_K_KERNELS;
pub use q4_k::Q4_K_KERNELS;
pub use q5_k::Q5_K_KERNELS;
pub use q6_k::Q6_K_KERNELS;
pub use q8_k::Q8_K_KERNELS;

pub use crate::types::QK_K;

/// f32 -> f16 bits (round to nearest even, as ggml's GGML_FP32_TO_FP16), little-endian.
#[inline(always)]
pub(crate) fn f16_le(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// Little-endian f16 at `b[0..2]` as f32 (exact).
#[inline(always)]
pub(crate) fn read_f16(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// f32 rounded through f16, as ggml re-reads a scale it just stored.
#[inline(always)]
pub(crate) fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of Q4_K/Q5_K,
/// packed in 12 bytes (low 6 bits of bytes 0..8 for j < 4; nibbles of bytes 8..12 plus the top
/// two bits of bytes 0..8 for j >= 4).
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`get_scale_min_k4`] for 6-bit scales `ls` and mins `lm`.
#[inline(always)]
pub fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Packs 2-bit levels as Q2_K and Q3_K store them: for each 128-element half, byte `l` holds
/// elements l, l+32, l+64, l+96 in bits 0-1, 2-3, 4-5, 6-7.
#[inline(always)]
pub(crate) fn pack_2bit(levels: &[u8; QK_K], qs: &mut [u8]) {
    for (h, out) in qs.chunks_exact_mut(32).enumerate() {
        let l = &levels[128 * h..128 * (h + 1)];
        for i in 0..32 {
            out[i] = l[i] | (l[i + 32] << 2) | (l[i + 64] << 4) | (l[i + 96] << 6);
        }
    }
}

/// Sum of squares in element order, the one serial reduction the imatrix paths share.
#[inline(always)]
pub(crate) fn sum_squares(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for v in x {
        s += v * v;
    }
    s
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Checks every k-quant's tests share: fast == reference, and round-trip error bounds.
    use crate::quant::testdata::{self, assert_fast_matches_ref, round_trip_rmse};
    use crate::quant::Kernels;

    /// Fast == reference on random/adversarial rows, with and without an imatrix, on two row
    /// lengths, plus rows with super-blocks of very different magnitudes.
    pub fn fast_matches_reference(k: &Kernels, with_imatrix: bool) {
        assert_fast_matches_ref(k, 256, with_imatrix);
        assert_fast_matches_ref(k, 768, with_imatrix);
        let n = 1024;
        let row_bytes = k.ty.row_size(n).unwrap();
        let w = testdata::importance(4, n);
        // Zero-weight columns: imatrices from sparse experts have them.
        let mut w0 = w.clone();
        for (i, v) in w0.iter_mut().enumerate() {
            if i % 3 == 0 || (256..300).contains(&i) {
                *v = 0.0;
            }
        }
        for seed in 0..6u64 {
            let mut x = testdata::heavy_tailed(seed, n);
            for (b, blk) in x.chunks_mut(256).enumerate() {
                let s = [1.0f32, 1e-6, 3e3, 1e-30][(b + seed as usize) % 4];
                blk.iter_mut().for_each(|v| *v *= s);
            }
            if seed % 2 == 1 {
                // Sub-blocks of one sign, or constant: the min/scale searches' corner cases.
                x[..64].iter_mut().for_each(|v| *v = v.abs() + 0.01);
                x[64..96].iter_mut().for_each(|v| *v = -v.abs());
                x[96..128].fill(0.25);
            }
            let mut ws: Vec<Option<&[f32]>> = vec![];
            if !k.requires_imatrix {
                ws.push(None);
            }
            if with_imatrix || k.requires_imatrix {
                ws.push(Some(&w));
                ws.push(Some(&w0));
            }
            for wi in ws {
                let mut a = vec![0u8; row_bytes];
                let mut b = vec![0u8; row_bytes];
                (k.quantize_row_ref)(&x, &mut a, wi);
                (k.quantize_row)(&x, &mut b, wi);
                assert_eq!(
                    a,
                    b,
                    "{} fast != ref, seed {seed}, imatrix {}",
                    k.ty,
                    wi.is_some()
                );
            }
        }
        // Many small random rows of varied shape: each 32-element piece gets its own
        // distribution (uniform, one-signed, sparse, small integers, gaussian) and scale.
        let mut r = testdata::Rng::new(77);
        let n = 512;
        let row_bytes = k.ty.row_size(n).unwrap();
        for case in 0..24 {
            let x: Vec<f32> = (0..n / 32)
                .flat_map(|_| {
                    let kind = r.next_u64() % 5;
                    let scale = [1e-3f32, 0.02, 1.0, 50.0][(r.next_u64() % 4) as usize];
                    (0..32)
                        .map(|_| {
                            let v = match kind {
                                0 => 2.0 * r.uniform() - 1.0,
                                1 => r.normal().abs(),
                                2 => {
                                    if r.uniform() < 0.1 {
                                        r.normal()
                                    } else {
                                        0.0
                                    }
                                }
                                3 => (r.next_u64() % 9) as f32 - 4.0,
                                _ => r.normal(),
                            };
                            scale * v
                        })
                        .collect::<Vec<f32>>()
                })
                .collect();
            let w: Vec<f32> = testdata::importance(1000 + case, n)
                .into_iter()
                .map(|v| if r.uniform() < 0.05 { 0.0 } else { v })
                .collect();
            for wi in [None, Some(&w[..])] {
                if wi.is_none() && k.requires_imatrix {
                    continue;
                }
                let mut a = vec![0u8; row_bytes];
                let mut b = vec![0u8; row_bytes];
                (k.quantize_row_ref)(&x, &mut a, wi);
                (k.quantize_row)(&x, &mut b, wi);
                assert_eq!(
                    a,
                    b,
                    "{} fast != ref, random case {case}, imatrix {}",
                    k.ty,
                    wi.is_some()
                );
            }
        }
    }

    /// Round-trip RMSE of gaussian data relative to its std, against a per-type bound.
    pub fn rmse_within(k: &Kernels, bound: f64) {
        let n = 1024;
        let x = testdata::gaussian(21, n * 8);
        let rel = round_trip_rmse(k, &x, n, None) / 0.02;
        assert!(rel < bound, "{}: relative rmse {rel} >= {bound}", k.ty);
        let w = testdata::importance(22, n);
        let relw = round_trip_rmse(k, &x, n, Some(&w)) / 0.02;
        assert!(
            relw < bound,
            "{} with imatrix: relative rmse {relw} >= {bound}",
            k.ty
        );
    }
}
