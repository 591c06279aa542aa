//! The small element-wise and per-row operations of the forward pass, each testable by hand.

/// out = x / sqrt(mean(x²) + eps) · weight. As ggml: squares in f32, summed in f64.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    let sum_sq: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// RMSNorm of each `weight.len()`-sized piece of `x` (rows, or heads within a row), in place.
pub fn rms_norm_rows_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mut tmp = vec![0f32; weight.len()];
    for row in x.chunks_exact_mut(weight.len()) {
        rms_norm(row, weight, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// Rotation angles' cos/sin for one position: θ_i = pos · base^(-2i/dim), i < dim/2, computed as
/// ggml's rope cache does (f32 θ multiplied by base^(-2/dim) step by step) so angles agree bit for bit.
pub fn rope_cos_sin(pos: usize, dim: usize, base: f32) -> (Vec<f32>, Vec<f32>) {
    let half = dim / 2;
    let theta_scale = base.powf(-2.0 / dim as f32);
    let mut theta = pos as f32;
    let mut cos = Vec::with_capacity(half);
    let mut sin = Vec::with_capacity(half);
    for _ in 0..half {
        cos.push(theta.cos());
        sin.push(theta.sin());
        theta *= theta_scale;
    }
    (cos, sin)
}

/// NEOX-ordered RoPE of each head (`cos.len() * 2` values) in `x`, in place: element i pairs with
/// element i + dim/2 (rotate halves), as llama.cpp's NEOX mode and HF's `rotate_half`.
pub fn rope_neox_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::features().fma {
        // SAFETY: FMA is present (checked just above); the body is plain Rust.
        return unsafe { rope_neox_fma(x, cos, sin) };
    }
    rope_neox_body(x, cos, sin)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn rope_neox_fma(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    rope_neox_body(x, cos, sin)
}

/// The rotation fused as llama.cpp's compiled `rotate_pairs` is (checked against its outputs):
/// a·cos − b·sin as fma(a, cos, −b·sin), a·sin + b·cos as fma(a, sin, b·cos).
#[inline(always)]
fn rope_neox_body(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a.mul_add(cos[i], -(b * sin[i]));
            hi[i] = a.mul_add(sin[i], b * cos[i]);
        }
    }
}

/// Softmax in place, computed as ggml's CPU `soft_max` does so results agree with llama.cpp bit for
/// bit: exponentials by `expf_ggml` in chunks of 8 (a partial last chunk by libm's expf), each
/// chunk's sum reduced pairwise and accumulated in f64, then every value scaled by f32(1/sum).
/// -inf entries (masked keys) become 0.
pub fn softmax_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::features().fma {
        // SAFETY: FMA is present (checked just above); the body is plain Rust.
        return unsafe { softmax_fma(x) };
    }
    softmax_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn softmax_fma(x: &mut [f32]) {
    softmax_body(x)
}

#[inline(always)]
fn softmax_body(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut sum = 0f64;
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for v in c.iter_mut() {
            *v = expf_ggml(*v - max);
        }
        sum += reduce8(c) as f64;
    }
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Sum of 8 lanes in the order of an AVX horizontal add: high half onto low, then pairs.
#[inline(always)]
pub fn reduce8(v: &[f32]) -> f32 {
    let q = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// exp(x) by the same range reduction and polynomial as ggml's vectorised `ggml_v_expf` (max error
/// ~1.5 ulp), with the same fused multiply-adds, so llama.cpp's softmax and SiLU are reproduced.
#[inline(always)]
pub fn expf_ggml(x: f32) -> f32 {
    let f = f32::from_bits;
    let r = f(0x4b40_0000); // 1.5 · 2^23: adding it rounds to an integer
    let z = x.mul_add(f(0x3fb8_aa3b), r); // x / ln 2, rounded
    let n = z - r;
    let b = (-n).mul_add(f(0x35bf_be8e), (-n).mul_add(f(0x3f31_7200), x)); // x - n·ln 2
    let e = z.to_bits() << 23;
    let k = f(e.wrapping_add(1f32.to_bits())); // 2^n
    let u = b * b;
    let j = f(0x3c07_2010)
        .mul_add(b, f(0x3d2b_9f17))
        .mul_add(u, f(0x3e2a_af33).mul_add(b, f(0x3eff_fedb)))
        .mul_add(u, f(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    // |n| > 126: 2^n is split in two factors so it neither overflows nor flushes early
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f(g.wrapping_add(0x7f00_0000));
    let s2 = f(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// Qwen3-MoE routing for one token: softmax over all experts' router logits, keep the `k` largest
/// probabilities (ties: lower expert index first), then rescale those k to sum to 1
/// (`norm_topk_prob`; llama.cpp's qwen3moe graph always does this). Returns (expert, weight).
pub fn route_top_k(router_logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut probs = router_logits.to_vec();
    softmax_in_place(&mut probs);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(k);
    let sum: f32 = order.iter().map(|&e| probs[e]).sum();
    order.into_iter().map(|e| (e, probs[e] / sum)).collect()
}

/// SiLU as ggml's vectorised `ggml_v_silu`: x / (1 + expf_ggml(-x)).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf_ggml(-x))
}

/// SwiGLU: gate ← silu(gate) · up, over rows of `width` values; as ggml, a row's last
/// `width % 8` values use libm's expf.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32], width: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::features().avx512f {
        // SAFETY: AVX-512F is present (checked just above).
        return unsafe { swiglu_avx512(gate, up, width) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::features().fma {
        // SAFETY: FMA is present (checked just above); the body is plain Rust.
        return unsafe { swiglu_fma(gate, up, width) };
    }
    swiglu_body(gate, up, width)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32], width: usize) {
    swiglu_body(gate, up, width)
}

/// `swiglu_body` 16 values at a time: the vector `expf_ggml` (same operations), the same
/// division and product; the rest of a row (under 16 values) as `swiglu_body`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn swiglu_avx512(gate: &mut [f32], up: &[f32], width: usize) {
    use std::arch::x86_64::*;
    let tail = width - width % 8;
    let body = tail - tail % 16;
    for (gr, ur) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
        let (g, u) = (gr.as_mut_ptr(), ur.as_ptr());
        for i in (0..body).step_by(16) {
            let x = _mm512_loadu_ps(g.add(i));
            let neg = _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(x),
                _mm512_set1_epi32(i32::MIN),
            ));
            let e = crate::model::attention::x86::expf_ggml_avx512(neg);
            let s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            _mm512_storeu_ps(g.add(i), _mm512_mul_ps(s, _mm512_loadu_ps(u.add(i))));
        }
        for i in body..width {
            let x = gr[i];
            let s = if i < tail {
                silu(x)
            } else {
                x / (1.0 + (-x).exp())
            };
            gr[i] = s * ur[i];
        }
    }
}

#[inline(always)]
fn swiglu_body(gate: &mut [f32], up: &[f32], width: usize) {
    let tail = width - width % 8;
    for (gr, ur) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
        for (i, (g, &u)) in gr.iter_mut().zip(ur).enumerate() {
            let x = *g;
            let s = if i < tail {
                silu(x)
            } else {
                x / (1.0 + (-x).exp())
            };
            *g = s * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    /// The dispatched SwiGLU (AVX-512 / FMA) equals the portable body bit for bit, across the
    /// exp range branches and row tails.
    #[test]
    fn swiglu_fast_equals_portable() {
        for width in [768, 100, 13, 16, 24] {
            let n = 5 * width;
            let mut gate: Vec<f32> = crate::quant::testdata::heavy_tailed(21, n)
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 7 {
                    0 => v * 60.0,
                    1 => -v.abs() * 200.0,
                    2 => 0.0,
                    _ => *v,
                })
                .collect();
            gate[3] = -0.0;
            gate[4] = 1e-40;
            let up = crate::quant::testdata::gaussian(22, n);
            let mut want = gate.clone();
            swiglu_body(&mut want, &up, width);
            swiglu_in_place(&mut gate, &up, width);
            for (k, (a, b)) in gate.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "width {width} at {k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rms_norm_by_hand() {
        // mean(x²) = (9 + 16) / 2 = 12.5 → scale 1/sqrt(12.5)
        let mut out = [0f32; 2];
        rms_norm(&[3.0, -4.0], &[1.0, 2.0], 0.0, &mut out);
        let s = 1.0 / 12.5f32.sqrt();
        assert!(
            close(out[0], 3.0 * s, 1e-6) && close(out[1], -8.0 * s, 1e-6),
            "{out:?}"
        );
        // eps matters for tiny inputs
        rms_norm(&[0.0, 0.0], &[1.0, 1.0], 1e-6, &mut out);
        assert_eq!(out, [0.0, 0.0]);
        let mut heads = [1.0f32, 1.0, 2.0, 2.0];
        rms_norm_rows_in_place(&mut heads, &[1.0, 1.0], 0.0);
        assert!(heads.iter().all(|v| close(*v, 1.0, 1e-6)), "{heads:?}");
    }

    #[test]
    fn rope_neox_rotates_halves() {
        // dim 4, base 100: θ0 = pos, θ1 = pos/10. Pairs are (x0, x2) and (x1, x3).
        let (cos, sin) = rope_cos_sin(1, 4, 100.0);
        assert!(close(cos[0], 1f32.cos(), 1e-6) && close(sin[1], 0.1f32.sin(), 1e-6));
        let mut x = [1.0f32, 0.0, 0.0, 1.0];
        rope_neox_in_place(&mut x, &cos, &sin);
        let want = [1f32.cos(), -(0.1f32.sin()), 1f32.sin(), 0.1f32.cos()];
        for (a, b) in x.iter().zip(want) {
            assert!(close(*a, b, 1e-6), "{x:?} vs {want:?}");
        }
        // position 0 is the identity; rotations preserve each pair's length
        let (c0, s0) = rope_cos_sin(0, 4, 100.0);
        let mut y = [0.3f32, -1.0, 2.0, 0.5];
        rope_neox_in_place(&mut y, &c0, &s0);
        assert_eq!(y, [0.3, -1.0, 2.0, 0.5]);
        let (c, s) = rope_cos_sin(12345, 4, 1e6);
        rope_neox_in_place(&mut y, &c, &s);
        assert!(close(y[0].hypot(y[2]), 0.3f32.hypot(2.0), 1e-6));
    }

    #[test]
    fn softmax_and_top_k_routing() {
        let mut p = [0.0f32, 2f32.ln(), 1000.0];
        softmax_in_place(&mut p);
        assert!(close(p[2], 1.0, 1e-6) && p[0] < 1e-30);
        let mut q = [0.0f32, 2f32.ln()];
        softmax_in_place(&mut q);
        assert!(close(q[0], 1.0 / 3.0, 1e-6) && close(q[1], 2.0 / 3.0, 1e-6));
        // probabilities ∝ 1, 2, 4, 1 → top-2 are experts 2 (4) and 1 (2) → renormalised 2/3, 1/3
        let logits = [0.0f32, 2f32.ln(), 4f32.ln(), 0.0];
        let r = route_top_k(&logits, 2);
        assert_eq!(r[0].0, 2);
        assert_eq!(r[1].0, 1);
        assert!(close(r[0].1, 2.0 / 3.0, 1e-6) && close(r[1].1, 1.0 / 3.0, 1e-6));
        // ties go to the lower index; k = all keeps the plain softmax
        let r = route_top_k(&[1.0, 1.0, 1.0], 1);
        assert_eq!(r, vec![(0, 1.0)]);
        let r = route_top_k(&logits, 4);
        assert!(close(r.iter().map(|x| x.1).sum::<f32>(), 1.0, 1e-6));
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!(close(silu(1.0), 1.0 / (1.0 + (-1f32).exp()), 1e-7));
        assert!(close(silu(-20.0), -20.0 * (-20f32).exp(), 1e-3));
        let mut g = [1.0f32, 0.0];
        swiglu_in_place(&mut g, &[2.0, 5.0], 2);
        assert!(close(g[0], 2.0 * silu(1.0), 1e-7) && g[1] == 0.0);
    }
}
