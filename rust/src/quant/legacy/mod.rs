//! ggml's original 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Without an importance matrix each type follows ggml's `quantize_row_*_ref` (which the `gguf`
//! Python package's numpy quantizers reproduce); with one, Q4_0/Q4_1/Q5_0/Q5_1 follow llama.cpp's
//! `quantize_row_*_impl`, and Q8_0 ignores it, as llama.cpp does.
//!
//! Signed zeros: in an all-zero block whose first element is -0.0, ggml's loops keep the sign they
//! meet first (Q4_1/Q5_1 min and max) or their +0.0 start value (Q4_0/Q5_0 max), while numpy's
//! `argmax`/`min`/`max` pick differently, so the scale/min bytes can differ in their sign bit
//! (0x8000 vs 0x0000) between llama.cpp and gguf-py. We follow llama.cpp; the dequantized values
//! compare equal either way.

use half::f16;

pub mod q4_0;
pub mod q4_1;
pub mod q5_0;
pub mod q5_1;
pub mod q8_0;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use q4_0::Q4_0_KERNELS;
pub use q4_1::Q4_1_KERNELS;
pub use q5_0::Q5_0_KERNELS;
pub use q5_1::Q5_1_KERNELS;
pub use q8_0::Q8_0_KERNELS;

/// Elements per block of every legacy type.
pub const QK: usize = 32;

/// Little-endian f16 bytes of `x`: round to nearest even, overflow to ±inf (ggml's FP32_TO_FP16).
#[inline(always)]
pub(crate) fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// The f16 stored little-endian at `b[0..2]`, widened to f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// C's float-to-integer conversion as x86 compilers emit it (`cvttss2si`): truncation toward zero,
/// with NaN and out-of-range values giving i32::MIN. ggml's `(int8_t)`/`(uint8_t)` casts then keep
/// the low byte; Rust's saturating `as` would give different bytes when a scale underflows to a
/// subnormal and its inverse is infinite.
#[inline(always)]
pub(crate) fn c_trunc_i32(v: f32) -> i32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        v as i32
    } else {
        i32::MIN
    }
}

/// ggml's `MIN(hi, (int8_t)v)` stored in a `uint8_t`.
#[inline(always)]
pub(crate) fn c_level_min(v: f32, hi: i8) -> u8 {
    (c_trunc_i32(v) as i8).min(hi) as u8
}

/// Mean square of a row, summed left to right in f32 like llama.cpp's `quantize_row_*_impl`.
pub(crate) fn row_sigma2(row: &[f32]) -> f32 {
    let mut sum_x2 = 0f32;
    for &v in row {
        sum_x2 += v * v;
    }
    sum_x2 / row.len() as f32
}

/// llama.cpp's per-element weights of the legacy imatrix paths: qw[j] * sqrt(sigma2 + x[j]^2).
#[inline]
pub(crate) fn imatrix_weights(xb: &[f32], qw: &[f32], sigma2: f32) -> [f32; QK] {
    let mut w = [0f32; QK];
    for ((o, &x), &q) in w.iter_mut().zip(xb).zip(qw) {
        *o = q * (sigma2 + x * x).sqrt();
    }
    w
}

/// Packs 32 five-bit levels the Q5 way: low nibbles of j and j+16 share qs[j], bit 4 of level j
/// goes to bit j of qh.
#[inline]
pub(crate) fn pack_q5(levels: &[u8; QK], qh: &mut [u8], qs: &mut [u8]) {
    let mut h = 0u32;
    for j in 0..QK / 2 {
        let (a, b) = (levels[j], levels[j + QK / 2]);
        qs[j] = (a & 0x0F) | ((b & 0x0F) << 4);
        h |= (((a & 0x10) >> 4) as u32) << j;
        h |= (((b & 0x10) >> 4) as u32) << (j + QK / 2);
    }
    qh.copy_from_slice(&h.to_le_bytes());
}

/// Five-bit level j of a Q5 block (inverse of `pack_q5`).
#[inline(always)]
pub(crate) fn q5_level(qh: u32, qs: &[u8], j: usize) -> u8 {
    let nib = if j < QK / 2 {
        qs[j] & 0x0F
    } else {
        qs[j - QK / 2] >> 4
    };
    nib | ((((qh >> j) & 1) as u8) << 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::{heavy_tailed, importance};
    use crate::quant::Kernels;

    #[test]
    fn c_conversion_matches_x86_semantics() {
        assert_eq!(c_trunc_i32(15.99), 15);
        assert_eq!(c_trunc_i32(-0.7), 0);
        assert_eq!(c_trunc_i32(f32::NAN), i32::MIN);
        assert_eq!(c_trunc_i32(f32::INFINITY), i32::MIN);
        assert_eq!(c_trunc_i32(f32::NEG_INFINITY), i32::MIN);
        assert_eq!(c_trunc_i32(-2_147_483_648.0), i32::MIN);
        assert_eq!(c_level_min(f32::NAN, 15), 0);
        assert_eq!(c_level_min(16.4, 15), 15);
        assert_eq!(c_level_min(200.0, 15), 200); // (int8_t)200 = -56 < 15, stored back as 200
    }

    /// Importance-weighted round-trip RMSE with the imatrix used (or not) when quantizing.
    fn weighted_rmse(k: &Kernels, x: &[f32], w: &[f32], use_imatrix: bool) -> f64 {
        let n = w.len();
        let row_bytes = k.ty.row_size(n).unwrap();
        let (mut num, mut den) = (0f64, 0f64);
        for row in x.chunks(n) {
            let mut q = vec![0u8; row_bytes];
            let mut y = vec![0f32; n];
            (k.quantize_row)(row, &mut q, use_imatrix.then_some(w));
            (k.dequantize_row)(&q, &mut y);
            for j in 0..n {
                num += w[j] as f64 * ((row[j] - y[j]) as f64).powi(2);
                den += w[j] as f64;
            }
        }
        (num / den).sqrt()
    }

    #[test]
    fn imatrix_lowers_weighted_error_and_q8_0_ignores_it() {
        let x = heavy_tailed(3, 16 * 256);
        let w = importance(4, 256);
        for k in [&Q4_0_KERNELS, &Q4_1_KERNELS, &Q5_0_KERNELS, &Q5_1_KERNELS] {
            let plain = weighted_rmse(k, &x, &w, false);
            let weighted = weighted_rmse(k, &x, &w, true);
            assert!(
                weighted < plain * 0.97,
                "{}: imatrix rmse {weighted} vs plain {plain}",
                k.ty
            );
        }
        assert_eq!(
            weighted_rmse(&Q8_0_KERNELS, &x, &w, true),
            weighted_rmse(&Q8_0_KERNELS, &x, &w, false)
        );
    }

    #[test]
    fn imatrix_fast_paths_match_reference_on_many_blocks() {
        // The AVX2 imatrix paths reorganise the scale searches; check them on varied rows and
        // weights (zeros included, whole zero-weight blocks too), beyond the shared adversarial set.
        let n = 256;
        let mut r = crate::quant::testdata::Rng::new(77);
        for case in 0..48u64 {
            let mut x = if case % 3 == 0 {
                heavy_tailed(case, n)
            } else {
                crate::quant::testdata::gaussian(case, n)
            };
            let mut w = importance(1000 + case, n);
            match case % 8 {
                1 => w.iter_mut().step_by(3).for_each(|v| *v = 0.0),
                2 => w[..64].fill(0.0),
                3 => x.iter_mut().for_each(|v| *v = v.abs()),
                4 => x[..32].fill(0.25),
                5 => x.iter_mut().for_each(|v| *v = (*v * 40.0).round() / 8.0),
                // Overflowing and underflowing weighted sums must still agree.
                6 => w.iter_mut().for_each(|v| *v *= 1e30),
                7 => {
                    x.iter_mut().for_each(|v| *v *= 1e15);
                    w.iter_mut().for_each(|v| *v *= 1e-30);
                }
                _ => x[(r.next_u64() % n as u64) as usize] = 3.0,
            }
            for k in [&Q4_0_KERNELS, &Q4_1_KERNELS, &Q5_0_KERNELS, &Q5_1_KERNELS] {
                let row_bytes = k.ty.row_size(n).unwrap();
                let (mut a, mut b) = (vec![0u8; row_bytes], vec![0u8; row_bytes]);
                (k.quantize_row_ref)(&x, &mut a, Some(&w));
                (k.quantize_row)(&x, &mut b, Some(&w));
                assert_eq!(a, b, "{} imatrix fast != ref, case {case}", k.ty);
            }
        }
    }

    #[test]
    fn q5_packing_round_trips() {
        let levels: [u8; QK] = std::array::from_fn(|j| (j as u8 * 7) % 32);
        let (mut qh, mut qs) = ([0u8; 4], [0u8; 16]);
        pack_q5(&levels, &mut qh, &mut qs);
        let h = u32::from_le_bytes(qh);
        for (j, &l) in levels.iter().enumerate() {
            assert_eq!(q5_level(h, &qs, j), l);
        }
    }
}
