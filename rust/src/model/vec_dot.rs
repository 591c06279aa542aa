//! Quantized dot products: weight rows stay in their block format and meet activations quantized
//! once per matmul call, like ggml's CPU backend (its `vec_dot_type`). This is both the fast path
//! and what makes results track llama.cpp's closely.
//!
//! Q8_0 weights × Q8_0 activations: per block of 32, an exact int32 sum of int8 products scaled by
//! the two f16 scales.

use half::f16;

use crate::quant::cpu;

const QK: usize = 32;
const BLOCK: usize = 34;

/// Activations to Q8_0 the way ggml's CPU `quantize_row_q8_0` does on x86: d = amax/127 stored as
/// f16, q = round-half-even(x · 127/amax).
pub fn quantize_act_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(BLOCK)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, &v) in ob[2..].iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8 as u8;
        }
    }
}

#[inline]
fn scale(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Σ over blocks of d_w·d_a·Σ q_w·q_a for two Q8_0 rows of equal length.
#[inline]
pub fn vec_dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.fma && f.f16c {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time just above).
            return unsafe { avx2::vec_dot_q8_0(w, a) };
        }
    }
    vec_dot_q8_0_scalar(w, a)
}

/// One Q8_0 weight row against four activation rows: the weight blocks are loaded once.
#[inline]
pub fn vec_dot_q8_0_x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx2 && f.fma && f.f16c {
            // SAFETY: AVX2, FMA and F16C are present (checked at run time just above).
            return unsafe { avx2::vec_dot_q8_0_x4(w, a) };
        }
    }
    a.map(|ai| vec_dot_q8_0_scalar(w, ai))
}

pub fn vec_dot_q8_0_scalar(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(BLOCK).zip(a.chunks_exact(BLOCK)) {
        let sumi: i32 = wb[2..]
            .iter()
            .zip(&ab[2..])
            .map(|(&p, &q)| (p as i8 as i32) * (q as i8 as i32))
            .sum();
        sum += scale(wb) * scale(ab) * sumi as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
        let n = w.len().min(a.len()) / BLOCK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for b in 0..n {
            let (wb, ab) = (w.as_ptr().add(b * BLOCK), a.as_ptr().add(b * BLOCK));
            let d = f16_scale(wb) * f16_scale(ab);
            let qw = _mm256_loadu_si256(wb.add(2) as *const __m256i);
            let qa = _mm256_loadu_si256(ab.add(2) as *const __m256i);
            // maddubs needs an unsigned operand: |w| times a with w's sign moved onto a.
            let abs_w = _mm256_sign_epi8(qw, qw);
            let signed_a = _mm256_sign_epi8(qa, qw);
            let pairs = _mm256_maddubs_epi16(abs_w, signed_a); // |q| <= 127: no saturation
            let quads = _mm256_madd_epi16(pairs, ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(quads), acc);
        }
        let lo = _mm256_castps256_ps128(acc);
        let hi = _mm256_extractf128_ps(acc, 1);
        let q = _mm_add_ps(lo, hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        _mm_cvtss_f32(q)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_scale(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot_q8_0_x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
        let n = w.len() / BLOCK;
        debug_assert!(a.iter().all(|ai| ai.len() >= n * BLOCK));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..n {
            let wb = w.as_ptr().add(b * BLOCK);
            let dw = f16_scale(wb);
            let qw = _mm256_loadu_si256(wb.add(2) as *const __m256i);
            let abs_w = _mm256_sign_epi8(qw, qw);
            for j in 0..4 {
                let ab = a[j].as_ptr().add(b * BLOCK);
                let qa = _mm256_loadu_si256(ab.add(2) as *const __m256i);
                let pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(qa, qw));
                let quads = _mm256_madd_epi16(pairs, ones);
                let d = _mm256_set1_ps(dw * f16_scale(ab));
                acc[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(quads), acc[j]);
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{self, testdata};
    use crate::types::GgmlType;

    #[test]
    fn simd_matches_scalar_and_dequantized_dot() {
        let n = 32 * 9;
        let w = testdata::heavy_tailed(1, n);
        let x = testdata::heavy_tailed(2, n);
        let wq = quant::quantize("w", &w, n, GgmlType::Q8_0, None).unwrap();
        let mut xq = vec![0u8; n / 32 * 34];
        quantize_act_q8_0(&x, &mut xq);
        let (fast, slow) = (vec_dot_q8_0(&wq, &xq), vec_dot_q8_0_scalar(&wq, &xq));
        let wd = quant::dequantize("w", &wq, n, GgmlType::Q8_0).unwrap();
        let xd = quant::dequantize("x", &xq, n, GgmlType::Q8_0).unwrap();
        let exact: f64 = wd.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mag: f64 = wd
            .iter()
            .zip(&xd)
            .map(|(a, b)| (*a as f64 * *b as f64).abs())
            .sum();
        assert!(
            (fast as f64 - exact).abs() <= 1e-5 * mag,
            "{fast} vs {exact}"
        );
        assert!(
            (slow as f64 - exact).abs() <= 1e-5 * mag,
            "{slow} vs {exact}"
        );
    }

    #[test]
    fn activation_quantizer_rounds_half_to_even() {
        // amax 127 → id 1: 0.5 → 0, 1.5 → 2, 2.5 → 2, -0.5 → 0
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = 2.5;
        x[4] = -0.5;
        let mut q = [0u8; 34];
        quantize_act_q8_0(&x, &mut q);
        assert_eq!(scale(&q), 1.0);
        assert_eq!(&q[2..7], &[127, 0, 2, 2, 0]);
    }
}
