//! The small element-wise and per-row operations of the forward pass, each testable by hand.

/// out = x / sqrt(mean(x²) + eps) · weight. The sum of squares runs in f64, as ggml does.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    let sum_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
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

/// Rotation angles' cos/sin for one position: θ_i = pos · base^(-2i/dim), i < dim/2.
pub fn rope_cos_sin(pos: usize, dim: usize, base: f32) -> (Vec<f32>, Vec<f32>) {
    let half = dim / 2;
    let mut cos = Vec::with_capacity(half);
    let mut sin = Vec::with_capacity(half);
    for i in 0..half {
        // f64 angle: positions in the tens of thousands times small frequencies lose bits in f32.
        let inv_freq = (base as f64).powf(-2.0 * i as f64 / dim as f64);
        let theta = pos as f64 * inv_freq;
        cos.push(theta.cos() as f32);
        sin.push(theta.sin() as f32);
    }
    (cos, sin)
}

/// NEOX-ordered RoPE of each head (`cos.len() * 2` values) in `x`, in place: element i pairs with
/// element i + dim/2 (rotate halves), as llama.cpp's NEOX mode and HF's `rotate_half`.
pub fn rope_neox_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = a * sin[i] + b * cos[i];
        }
    }
}

/// Numerically stable softmax, in place.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
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

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU: gate ← silu(gate) · up.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
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
        swiglu_in_place(&mut g, &[2.0, 5.0]);
        assert!(close(g[0], 2.0 * silu(1.0), 1e-7) && g[1] == 0.0);
    }
}
