//! Causal grouped-query attention over the KV cache, in the summation orders of llama.cpp's CPU
//! kernels (matched against its outputs).

use rayon::prelude::*;

use super::ops;

#[derive(Clone, Copy)]
pub(super) struct AttnShape {
    pub(super) n_head: usize,
    pub(super) n_head_kv: usize,
    pub(super) head_dim_k: usize,
    pub(super) head_dim_v: usize,
    /// Position of the first query token; query t sees keys 0..=pos0 + t (causal mask).
    pub(super) pos0: usize,
}

/// Causal grouped-query attention. `q` is [n][n_head·hk]; `keys`/`values` are [n_kv][n_head_kv·h]
/// rows for positions 0..n_kv. Returns [n][n_head·hv]. Query head h reads KV head h / group.
pub(super) fn attention(q: &[f32], keys: &[f32], values: &[f32], s: AttnShape) -> Vec<f32> {
    let (hk, hv) = (s.head_dim_k, s.head_dim_v);
    let group = s.n_head / s.n_head_kv;
    let (kw, vw) = (s.n_head_kv * hk, s.n_head_kv * hv);
    let n = q.len() / (s.n_head * hk);
    let scale = 1.0 / (hk as f32).sqrt();
    let dot_kq = dot_kq_fn();
    let mut out = vec![0f32; n * s.n_head * hv];
    out.par_chunks_mut(hv).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / s.n_head, i % s.n_head);
        let g = h / group;
        let qh = &q[(t * s.n_head + h) * hk..(t * s.n_head + h + 1) * hk];
        let n_visible = s.pos0 + t + 1;
        // Scores padded with masked (-inf) keys to a multiple of 8, as llama.cpp pads its cache.
        let mut scores = vec![f32::NEG_INFINITY; n_visible.next_multiple_of(8)];
        for (j, sc) in scores[..n_visible].iter_mut().enumerate() {
            *sc = dot_kq(qh, &keys[j * kw + g * hk..j * kw + (g + 1) * hk]) * scale;
        }
        ops::softmax_in_place(&mut scores);
        let vg = |j: usize| &values[j * vw + g * hv..j * vw + (g + 1) * hv];
        weighted_values(&scores[..n_visible], vg, o);
    });
    out
}

/// q·k summed in the order of llama.cpp's CPU kernel for its KQ product (matched against its
/// outputs): 4 accumulators of 8 lanes over steps of 32, products rounded before adding, the
/// accumulators added as (0+2)+(1+3), the lanes pairwise, then any tail in order.
/// Chosen for the CPU once per attention call rather than per key.
fn dot_kq_fn() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::features().avx2 {
        // SAFETY: AVX2 is present (checked just above).
        return |q, k| unsafe { dot_kq_avx2(q, k) };
    }
    dot_kq_scalar
}

/// `dot_kq_scalar` with the four accumulators in AVX registers (the same operations).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_kq_avx2(q: &[f32], k: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len().min(k.len());
    let body = n - n % 32;
    let (pq, pk) = (q.as_ptr(), k.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..body).step_by(32) {
        for (a, acca) in acc.iter_mut().enumerate() {
            let prod = _mm256_mul_ps(
                _mm256_loadu_ps(pq.add(i + 8 * a)),
                _mm256_loadu_ps(pk.add(i + 8 * a)),
            );
            *acca = _mm256_add_ps(*acca, prod);
        }
    }
    let lanes = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let q4 = _mm_add_ps(
        _mm256_castps256_ps128(lanes),
        _mm256_extractf128_ps(lanes, 1),
    );
    let q2 = _mm_add_ps(q4, _mm_movehl_ps(q4, q4));
    let mut s = _mm_cvtss_f32(_mm_add_ss(q2, _mm_movehdup_ps(q2)));
    for i in body..n {
        s += q[i] * k[i];
    }
    s
}

fn dot_kq_scalar(q: &[f32], k: &[f32]) -> f32 {
    let n = q.len().min(k.len());
    let body = n - n % 32;
    let mut acc = [[0f32; 8]; 4];
    for i in (0..body).step_by(32) {
        for (a, accj) in acc.iter_mut().enumerate() {
            for (l, v) in accj.iter_mut().enumerate() {
                *v += q[i + 8 * a + l] * k[i + 8 * a + l];
            }
        }
    }
    let lanes: [f32; 8] =
        std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let mut s = ops::reduce8(&lanes);
    for i in body..n {
        s += q[i] * k[i];
    }
    s
}

/// o = Σ_j p_j·v_j summed as llama.cpp's f32 matmul of the transposed V cache does: key j goes to
/// FMA lane j mod 8, and the 8 lanes are added pairwise at the end.
fn weighted_values<'a>(p: &[f32], v: impl Fn(usize) -> &'a [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::features().avx2 && crate::quant::cpu::features().fma {
        // SAFETY: AVX2 and FMA are present (checked just above).
        return unsafe { weighted_values_fma(p, v, o) };
    }
    weighted_values_body(p, v, o)
}

/// `weighted_values_body` with each lane's accumulators in AVX registers (the same FMAs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_values_fma<'a>(p: &[f32], v: impl Fn(usize) -> &'a [f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let hv = o.len();
    if !hv.is_multiple_of(8) {
        return weighted_values_body(p, v, o);
    }
    let mut lanes = vec![0f32; 8 * hv];
    let base = lanes.as_mut_ptr();
    for (j, &pj) in p.iter().enumerate() {
        let acc = base.add((j % 8) * hv);
        let vj = v(j).as_ptr();
        let pv = _mm256_set1_ps(pj);
        for d in (0..hv).step_by(8) {
            let a = _mm256_loadu_ps(acc.add(d));
            _mm256_storeu_ps(
                acc.add(d),
                _mm256_fmadd_ps(pv, _mm256_loadu_ps(vj.add(d)), a),
            );
        }
    }
    for (d, od) in o.iter_mut().enumerate() {
        let l: [f32; 8] = std::array::from_fn(|i| lanes[i * hv + d]);
        *od = ops::reduce8(&l);
    }
}

#[inline(always)]
fn weighted_values_body<'a>(p: &[f32], v: impl Fn(usize) -> &'a [f32], o: &mut [f32]) {
    let hv = o.len();
    let mut lanes = vec![0f32; 8 * hv];
    for (j, &pj) in p.iter().enumerate() {
        let acc = &mut lanes[(j % 8) * hv..(j % 8 + 1) * hv];
        for (a, &b) in acc.iter_mut().zip(v(j)) {
            *a = pj.mul_add(b, *a);
        }
    }
    for (d, od) in o.iter_mut().enumerate() {
        let l: [f32; 8] = std::array::from_fn(|i| lanes[i * hv + d]);
        *od = ops::reduce8(&l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_values_avx2_equals_portable() {
        let p = crate::quant::testdata::heavy_tailed(43, 37);
        let vals = crate::quant::testdata::heavy_tailed(44, 37 * 64);
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        weighted_values(&p, |j| &vals[j * 64..(j + 1) * 64], &mut a);
        weighted_values_body(&p, |j| &vals[j * 64..(j + 1) * 64], &mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn kq_dot_avx2_equals_scalar() {
        let a = crate::quant::testdata::heavy_tailed(41, 200);
        let b = crate::quant::testdata::heavy_tailed(42, 200);
        for n in [0, 5, 32, 64, 100, 128, 200] {
            assert_eq!(
                dot_kq_fn()(&a[..n], &b[..n]).to_bits(),
                dot_kq_scalar(&a[..n], &b[..n]).to_bits(),
                "n={n}"
            );
        }
    }

    #[test]
    fn attention_single_key_returns_its_value_and_respects_groups() {
        // 2 query heads sharing 1 KV head, one position: softmax over one key is 1.
        let s = AttnShape {
            n_head: 2,
            n_head_kv: 1,
            head_dim_k: 2,
            head_dim_v: 2,
            pos0: 0,
        };
        let out = attention(&[1.0, 0.0, 0.0, 1.0], &[3.0, 4.0], &[5.0, 6.0], s);
        assert_eq!(out, vec![5.0, 6.0, 5.0, 6.0]);
    }

    #[test]
    fn attention_is_causal_and_weights_by_scores() {
        // Two tokens, one head of dim 2; keys orthogonal, values distinct.
        let s = AttnShape {
            n_head: 1,
            n_head_kv: 1,
            head_dim_k: 2,
            head_dim_v: 1,
            pos0: 0,
        };
        let q = [1.0, 0.0, 2f32.sqrt() * 2f32.ln(), 0.0];
        let out = attention(&q, &[1.0, 0.0, 0.0, 1.0], &[10.0, 20.0], s);
        // token 0 sees only key 0
        assert_eq!(out[0], 10.0);
        // token 1: scores (ln 2, 0) → weights 2/3, 1/3
        assert!((out[1] - (20.0 / 3.0 + 20.0 / 3.0)).abs() < 1e-4, "{out:?}");
    }
}
