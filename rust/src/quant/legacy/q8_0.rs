//! Q8_0: 32 weights as int8 with one f16 scale. Block: d (f16) | qs[32] (i8) = 34 bytes.
//! llama.cpp ignores an importance matrix for Q8_0, and so do we.

use super::{c_trunc_i32, f16_at, f16_bytes, QK};
use crate::quant::{kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const QK8_0: usize = QK;
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
            y[..2].copy_from_slice(&f16_bytes(d));
            for (q, v) in y[2..].iter_mut().zip(x) {
                // C's float->int8 store: an infinite inverse scale (subnormal d) gives byte 0.
                *q = c_trunc_i32((v * id).round()) as u8;
            }
        }
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::cpu::has_avx2() {
            // SAFETY: AVX2 was detected at run time.
            return unsafe { avx2::quantize_row(src, dst) };
        }
        Self::quantize_row_ref(src, dst, None)
    }

    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK8_0))
        {
            let d = f16_at(x);
            for (o, q) in y.iter_mut().zip(&x[2..]) {
                *o = (*q as i8) as f32 * d;
            }
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::cpu::has_avx2() {
            // SAFETY: AVX2 was detected at run time.
            return unsafe { avx2::dequantize_row(src, dst) };
        }
        Self::dequantize_row_ref(src, dst)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::simd::*;
    use super::super::{f16_at, f16_bytes, QK};
    use super::BLOCK_BYTES;

    /// roundf: truncate, then step away from zero where the dropped fraction is at least 1/2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn round_half_away(v: __m256) -> __m256 {
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let frac = abs_ps(_mm256_sub_ps(v, t));
        let step = _mm256_or_ps(_mm256_and_ps(v, _mm256_set1_ps(-0.0)), _mm256_set1_ps(1.0));
        let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
        _mm256_add_ps(t, _mm256_and_ps(up, step))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8]) {
        for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
            let b = load_block(x);
            let d = block_amax(&b) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            y[..2].copy_from_slice(&f16_bytes(d));
            let idv = _mm256_set1_ps(id);
            let q = b.map(|v| _mm256_cvttps_epi32(round_half_away(_mm256_mul_ps(v, idv))));
            _mm256_storeu_si256(y[2..].as_mut_ptr() as *mut __m256i, pack_low_bytes(q));
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_at(x));
            let p = x[2..].as_ptr();
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k) as *const __m128i))
            });
            store_block(y, q.map(|l| _mm256_mul_ps(_mm256_cvtepi32_ps(l), d)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::assert_fast_matches_ref;

    #[test]
    fn fast_matches_reference() {
        assert_fast_matches_ref(&Q8_0_KERNELS, 256, true);
    }

    #[test]
    fn rounds_half_away_from_zero() {
        // amax 127 gives d = 1, so x*id is x itself: 2.5 -> 3, -2.5 -> -3, 0.49999997 -> 0.
        let mut x = [0f32; QK8_0];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.499_999_97;
        x[4] = -126.5;
        let mut a = [0u8; BLOCK_BYTES];
        let mut b = [0u8; BLOCK_BYTES];
        Q8_0::quantize_row_ref(&x, &mut a, None);
        Q8_0::quantize_row(&x, &mut b, None);
        assert_eq!(a, b);
        assert_eq!(&a[2..7], &[127, 3, (-3i8) as u8, 0, (-127i8) as u8]);
    }

    #[test]
    fn subnormal_scale_stores_zero_levels() {
        // amax/127 is subnormal and its inverse overflows: ggml (and gguf-py) store all-zero levels.
        let x: [f32; QK8_0] = std::array::from_fn(|j| (j % 7) as f32 * 1e-40 - 3e-40);
        let mut a = [0u8; BLOCK_BYTES];
        let mut b = [0u8; BLOCK_BYTES];
        Q8_0::quantize_row_ref(&x, &mut a, None);
        Q8_0::quantize_row(&x, &mut b, None);
        assert_eq!(a, b);
        assert!(a[2..].iter().all(|&q| q == 0));
    }
}
