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
    attention_on(best_path(&s), q, keys, values, s)
}

/// How attention is computed; every path gives the same bits as `ByHead`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The straightforward formulation, one (token, head) at a time: the reference.
    ByHead,
    /// Blocks of query heads sharing a KV head, in AVX2 (+FMA) registers.
    Avx2,
    /// The same blocks in AVX-512 registers.
    Avx512,
}

/// Whether `path` can run on this CPU for these head sizes (the blocked kernels need hk % 32 == 0
/// and hv a multiple of their register width).
fn runnable(path: Path, s: &AttnShape) -> bool {
    let hk_fits = s.head_dim_k.is_multiple_of(32);
    #[cfg(target_arch = "x86_64")]
    {
        let f = crate::quant::cpu::features();
        match path {
            Path::ByHead => true,
            Path::Avx2 => f.avx2 && f.fma && hk_fits && s.head_dim_v.is_multiple_of(8),
            Path::Avx512 => f.avx512f && hk_fits && s.head_dim_v.is_multiple_of(16),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = hk_fits;
        path == Path::ByHead
    }
}

/// The fastest runnable path.
fn best_path(s: &AttnShape) -> Path {
    [Path::Avx512, Path::Avx2]
        .into_iter()
        .find(|&p| runnable(p, s))
        .unwrap_or(Path::ByHead)
}

/// Query heads per block: one token's heads that share a KV head, at most 8 (the scores of a key
/// for a block are one 8-float vector).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the blocked paths are x86 only
const ROWS: usize = 8;

/// One KV head's keys and values as seen by one query token.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the blocked paths are x86 only
struct KvHead<'a> {
    /// Key j is `keys[j * kw..][..hk]` (read in place: each is loaded once per block, whole).
    keys: &'a [f32],
    kw: usize,
    /// Values packed by `pack_values`: dimensions c·w..(c+1)·w of value j are
    /// `values[(c * n_kv + j) * w..][..w]`, w the kernel's register width.
    values: &'a [f32],
    n_kv: usize,
    hk: usize,
    hv: usize,
    /// Keys 0..n_visible are unmasked.
    n_visible: usize,
}

/// KV head g's values in slices of `width` dimensions, each slice's keys contiguous: the weighted
/// sum streams one slice over all keys, and in cache rows (all KV heads) its loads would be a
/// cache-set-aliasing stride apart.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the blocked paths are x86 only
fn pack_values(values: &[f32], s: &AttnShape, n_kv: usize, g: usize, width: usize) -> Vec<f32> {
    let (hv, vw) = (s.head_dim_v, s.n_head_kv * s.head_dim_v);
    let mut v = Vec::with_capacity(n_kv * hv);
    for c in (0..hv).step_by(width) {
        for row in values[..n_kv * vw].chunks_exact(vw) {
            v.extend_from_slice(&row[g * hv + c..g * hv + c + width]);
        }
    }
    v
}

/// Per-thread buffers reused across work items.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the blocked paths are x86 only
#[derive(Default)]
struct Scratch {
    /// Key-major scores of a block: `scores[j * ROWS + r]` is query row r's score (then
    /// probability) for key j; keys padded with masked (-inf) ones to a multiple of 8.
    scores: Vec<f32>,
    /// The block's queries rearranged for the AVX-512 kernel (see `scores_avx512`).
    q_pairs: Vec<f32>,
}

/// Work items are (token, KV head): the `group` query heads of a token that read one KV head are
/// contiguous in `q` and in the output, so each key and value row is loaded once per block of
/// up to 8 of them. Scores, softmax and weighted sum are each done in the reference's order.
fn attention_on(path: Path, q: &[f32], keys: &[f32], values: &[f32], s: AttnShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if path != Path::ByHead {
        let (hk, hv) = (s.head_dim_k, s.head_dim_v);
        let group = s.n_head / s.n_head_kv;
        let (kw, vw) = (s.n_head_kv * hk, s.n_head_kv * hv);
        let n = q.len() / (s.n_head * hk);
        let n_kv = s.pos0 + n;
        assert!(runnable(path, &s));
        assert!(keys.len() >= n_kv * kw && values.len() >= n_kv * vw);
        let scale = 1.0 / (hk as f32).sqrt();
        let width = if path == Path::Avx512 { 16 } else { 8 };
        let packed_values: Vec<Vec<f32>> = (0..s.n_head_kv)
            .into_par_iter()
            .map(|g| pack_values(values, &s, n_kv, g, width))
            .collect();
        let mut out = vec![0f32; n * s.n_head * hv];
        out.par_chunks_mut(group * hv).enumerate().for_each_init(
            Scratch::default,
            |scratch, (i, o)| {
                let (t, g) = (i / s.n_head_kv, i % s.n_head_kv);
                let kv = KvHead {
                    keys: &keys[g * hk..],
                    kw,
                    values: &packed_values[g],
                    n_kv,
                    hk,
                    hv,
                    n_visible: s.pos0 + t + 1,
                };
                let q_t = &q[(t * s.n_head + g * group) * hk..][..group * hk];
                for (qb, ob) in q_t.chunks(ROWS * hk).zip(o.chunks_mut(ROWS * hv)) {
                    // SAFETY: the path is runnable (asserted above), so its CPU features are
                    // present; the key and value rows read are within the slices (asserted above).
                    unsafe {
                        match path {
                            Path::Avx512 => x86::block_avx512(qb, &kv, scale, scratch, ob),
                            _ => x86::block_avx2(qb, &kv, scale, scratch, ob),
                        }
                    }
                }
            },
        );
        return out;
    }
    let _ = path;
    attention_by_head(q, keys, values, s)
}

/// The reference formulation of `attention`, per (token, query head): scores, softmax, weighted sum.
fn attention_by_head(q: &[f32], keys: &[f32], values: &[f32], s: AttnShape) -> Vec<f32> {
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

/// The blocked kernels. Each reproduces the reference's float operations exactly: a score is
/// `dot_kq_scalar(q, k) * scale` (4 accumulators of 8 lanes, mul then add, combined as
/// (0+2)+(1+3), lanes reduced as `ops::reduce8`), the softmax is `ops::softmax_in_place` run down
/// each column of the key-major scores, and an output element is `weighted_values_body`'s (key j
/// fused into lane j mod 8, lanes reduced as `ops::reduce8`). Only the loop order differs.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{KvHead, Scratch, ROWS};

    /// Attention of one block of up to 8 query rows (`q`: [nr][hk]) into `out` ([nr][hv]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2(
        q: &[f32],
        kv: &KvHead,
        scale: f32,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let n_pad = kv.n_visible.next_multiple_of(8);
        scratch.scores.clear();
        scratch.scores.resize(n_pad * ROWS, f32::NEG_INFINITY);
        scores_avx2(q, kv, scale, &mut scratch.scores);
        softmax_columns_avx2(&mut scratch.scores);
        weighted_values_avx2(&scratch.scores, kv, out);
    }

    /// Scores of the block's rows for keys 0..n_visible (rows past nr get 0).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_avx2(q: &[f32], kv: &KvHead, scale: f32, scores: &mut [f32]) {
        let (hk, nr) = (kv.hk, q.len() / kv.hk);
        let qp = q.as_ptr();
        let scale = _mm256_set1_ps(scale);
        for j in 0..kv.n_visible {
            let k = kv.keys.as_ptr().add(j * kv.kw);
            let mut lanes = [_mm256_setzero_ps(); ROWS];
            let mut r = 0;
            while r + 3 <= nr {
                lanes[r..r + 3].copy_from_slice(&dot_lanes_avx2::<3>(qp.add(r * hk), hk, k));
                r += 3;
            }
            match nr - r {
                2 => lanes[r..r + 2].copy_from_slice(&dot_lanes_avx2::<2>(qp.add(r * hk), hk, k)),
                1 => lanes[r] = dot_lanes_avx2::<1>(qp.add(r * hk), hk, k)[0],
                _ => {}
            }
            let dots = reduce8_rows_avx2(&lanes);
            _mm256_storeu_ps(
                scores.as_mut_ptr().add(j * ROWS),
                _mm256_mul_ps(dots, scale),
            );
        }
    }

    /// For R consecutive query rows and one key: the 8 lanes `dot_kq_scalar` reduces at its end.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_lanes_avx2<const R: usize>(
        q: *const f32,
        hk: usize,
        k: *const f32,
    ) -> [__m256; R] {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for i in (0..hk).step_by(32) {
            for (a, off) in (i..i + 32).step_by(8).enumerate() {
                let kv = _mm256_loadu_ps(k.add(off));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let prod = _mm256_mul_ps(_mm256_loadu_ps(q.add(r * hk + off)), kv);
                    acc_r[a] = _mm256_add_ps(acc_r[a], prod);
                }
            }
        }
        acc.map(|a| _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3])))
    }

    /// `ops::reduce8` of each of 8 vectors at once (a transposing reduction): lane r of the
    /// result is reduce8(rows[r]), with the same additions.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce8_rows_avx2(rows: &[__m256; 8]) -> __m256 {
        // v[i] + v[i+4] of two rows: row a's 4 sums in the low half, row b's in the high half
        let fold_halves = |a, b| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        };
        let s01 = fold_halves(rows[0], rows[1]);
        let s23 = fold_halves(rows[2], rows[3]);
        let s45 = fold_halves(rows[4], rows[5]);
        let s67 = fold_halves(rows[6], rows[7]);
        // q0+q2 and q1+q3 of each row's 4 sums
        let fold_pairs = |a, b| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0x44>(a, b),
                _mm256_shuffle_ps::<0xEE>(a, b),
            )
        };
        let v0123 = fold_pairs(s01, s23);
        let v4567 = fold_pairs(s45, s67);
        // (q0+q2) + (q1+q3): rows 0 2 4 6 | 1 3 5 7
        let f = _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(v0123, v4567),
            _mm256_shuffle_ps::<0xDD>(v0123, v4567),
        );
        _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// `ops::softmax_in_place` of each column r of the key-major `scores` ([n_pad][8]).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax_columns_avx2(scores: &mut [f32]) {
        let p = scores.as_mut_ptr();
        let n_keys = scores.len() / ROWS;
        // f32::max keeps the accumulator when the score is NaN; so does maxps with it second
        let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in 0..n_keys {
            max = _mm256_max_ps(_mm256_loadu_ps(p.add(j * ROWS)), max);
        }
        let (mut sum_lo, mut sum_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for c in (0..n_keys).step_by(8) {
            let mut e = [_mm256_setzero_ps(); 8];
            for (l, el) in e.iter_mut().enumerate() {
                let at = p.add((c + l) * ROWS);
                *el = expf_ggml_avx2(_mm256_sub_ps(_mm256_loadu_ps(at), max));
                _mm256_storeu_ps(at, *el);
            }
            let chunk = _mm256_add_ps(
                _mm256_add_ps(_mm256_add_ps(e[0], e[4]), _mm256_add_ps(e[2], e[6])),
                _mm256_add_ps(_mm256_add_ps(e[1], e[5]), _mm256_add_ps(e[3], e[7])),
            );
            sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(chunk)));
            sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(chunk)));
        }
        let one = _mm256_set1_pd(1.0);
        let inv = _mm256_set_m128(
            _mm256_cvtpd_ps(_mm256_div_pd(one, sum_hi)),
            _mm256_cvtpd_ps(_mm256_div_pd(one, sum_lo)),
        );
        for j in 0..n_keys {
            let at = p.add(j * ROWS);
            _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), inv));
        }
    }

    /// `ops::expf_ggml` of 8 values, the same operations (both range branches, then a select).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn expf_ggml_avx2(x: __m256) -> __m256 {
        let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let int = |bits: u32| _mm256_set1_epi32(bits as i32);
        let r = c(0x4b40_0000);
        let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), x));
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(e, int(0x3f80_0000)));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                u,
                _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
            ),
            u,
            _mm256_mul_ps(c(0x3f7f_fff6), b),
        );
        let fast = _mm256_fmadd_ps(j, k, k);
        let abs_n = _mm256_and_ps(n, _mm256_castsi256_ps(int(0x7fff_ffff)));
        let small = _mm256_cmp_ps::<_CMP_LE_OQ>(abs_n, _mm256_set1_ps(126.0));
        if _mm256_movemask_ps(small) == 0xff {
            return fast;
        }
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
            int(0x8200_0000),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, int(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        let big = _mm256_blendv_ps(
            _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1),
            _mm256_mul_ps(s1, s1),
            huge,
        );
        _mm256_blendv_ps(big, fast, small)
    }

    /// out[r] = Σ_j p[j][r]·v_j for the block's rows, 8 dimensions at a time with the 8 lane
    /// accumulators in registers while streaming over the keys.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_values_avx2(p: &[f32], kv: &KvHead, out: &mut [f32]) {
        let (hv, n) = (kv.hv, kv.n_visible);
        let full = n - n % 8;
        for (r, o) in out.chunks_exact_mut(hv).enumerate() {
            let pr = p.as_ptr().add(r);
            for d in (0..hv).step_by(8) {
                let v = kv.values.as_ptr().add(d * kv.n_kv);
                let mut acc = [_mm256_setzero_ps(); 8];
                let step = |j: usize, acc: &mut __m256| {
                    let pj = _mm256_set1_ps(*pr.add(j * ROWS));
                    *acc = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v.add(j * 8)), *acc);
                };
                for j0 in (0..full).step_by(8) {
                    for (l, acc_l) in acc.iter_mut().enumerate() {
                        step(j0 + l, acc_l);
                    }
                }
                // lane indices stay constants, so the accumulators stay in registers
                for (l, acc_l) in acc.iter_mut().enumerate() {
                    if l < n - full {
                        step(full + l, acc_l);
                    }
                }
                let sum = _mm256_add_ps(
                    _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6])),
                    _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7])),
                );
                _mm256_storeu_ps(o.as_mut_ptr().add(d), sum);
            }
        }
    }

    /// `block_avx2` in AVX-512 registers: a zmm holds two rows' 8-lane vectors (scores) or 16
    /// dimensions (weighted sum), so each 8-lane sum keeps its own operations.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_avx512(
        q: &[f32],
        kv: &KvHead,
        scale: f32,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let n_pad = kv.n_visible.next_multiple_of(8);
        scratch.scores.clear();
        scratch.scores.resize(n_pad * ROWS, f32::NEG_INFINITY);
        scores_avx512(q, kv, scale, &mut scratch.q_pairs, &mut scratch.scores);
        softmax_columns_avx512(&mut scratch.scores);
        weighted_values_avx512(&scratch.scores, kv, out);
    }

    /// Scores of the block's rows for keys 0..n_visible (rows past nr get 0). Rows are taken in
    /// pairs: `q_pairs` holds, per pair and per 8 dimensions, the two rows' 8 values side by side,
    /// and each 8 key values are broadcast to both halves.
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_avx512(
        q: &[f32],
        kv: &KvHead,
        scale: f32,
        q_pairs: &mut Vec<f32>,
        scores: &mut [f32],
    ) {
        let (hk, nr) = (kv.hk, q.len() / kv.hk);
        let n_pairs = nr.div_ceil(2);
        q_pairs.clear();
        q_pairs.resize(n_pairs * 2 * hk, 0.0);
        for (r, row) in q.chunks_exact(hk).enumerate() {
            for (c, eight) in row.chunks_exact(8).enumerate() {
                let at = ((r / 2) * (hk / 8) + c) * 16 + (r % 2) * 8;
                q_pairs[at..at + 8].copy_from_slice(eight);
            }
        }
        let qp = q_pairs.as_ptr();
        match n_pairs {
            1 => scores_pairs_avx512::<1>(qp, kv, scale, scores),
            2 => scores_pairs_avx512::<2>(qp, kv, scale, scores),
            3 => scores_pairs_avx512::<3>(qp, kv, scale, scores),
            _ => scores_pairs_avx512::<4>(qp, kv, scale, scores),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_pairs_avx512<const P: usize>(
        q_pairs: *const f32,
        kv: &KvHead,
        scale: f32,
        scores: &mut [f32],
    ) {
        let hk = kv.hk;
        let scale = _mm256_set1_ps(scale);
        for j in 0..kv.n_visible {
            let k = kv.keys.as_ptr().add(j * kv.kw);
            let mut acc = [[_mm512_setzero_ps(); 4]; P];
            for i in (0..hk).step_by(32) {
                for (a, off) in (i..i + 32).step_by(8).enumerate() {
                    // (f64x4 is the AVX-512F form of this 8-float broadcast)
                    let k8 = _mm256_loadu_pd(k.add(off).cast());
                    let kb = _mm512_castpd_ps(_mm512_broadcast_f64x4(k8));
                    for (pair, acc_p) in acc.iter_mut().enumerate() {
                        let qv = _mm512_loadu_ps(q_pairs.add((pair * hk + off) * 2));
                        acc_p[a] = _mm512_add_ps(acc_p[a], _mm512_mul_ps(qv, kb));
                    }
                }
            }
            let mut lanes = [_mm512_setzero_ps(); 4];
            for (l, a) in lanes.iter_mut().zip(&acc) {
                *l = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            }
            let dots = reduce8_rows_avx512(&lanes);
            _mm256_storeu_ps(
                scores.as_mut_ptr().add(j * ROWS),
                _mm256_mul_ps(dots, scale),
            );
        }
    }

    /// `ops::reduce8` of the 8 row vectors held two per zmm (row 2i low, 2i+1 high in pairs[i]):
    /// lane r of the result is reduce8(row r), with the same additions.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce8_rows_avx512(pairs: &[__m512; 4]) -> __m256 {
        // v[i] + v[i+4]: each 128-bit lane one row's 4 sums, rows 0 1 2 3 | 4 5 6 7
        let fold_halves = |a, b| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        };
        let s0123 = fold_halves(pairs[0], pairs[1]);
        let s4567 = fold_halves(pairs[2], pairs[3]);
        // q0+q2 and q1+q3 of each row's 4 sums: lane i holds rows i and 4+i
        let v = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(s0123, s4567),
            _mm512_shuffle_ps::<0xEE>(s0123, s4567),
        );
        // (q0+q2) + (q1+q3): row i at element 4i, row 4+i at 4i+1
        let f = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(v, v),
            _mm512_shuffle_ps::<0xDD>(v, v),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castps512_ps256(_mm512_permutexvar_ps(order, f))
    }

    /// `ops::softmax_in_place` of each column of the key-major `scores`, two keys per zmm.
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_columns_avx512(scores: &mut [f32]) {
        let p = scores.as_mut_ptr();
        let n_pairs = scores.len() / 16;
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in 0..n_pairs {
            max = _mm512_max_ps(_mm512_loadu_ps(p.add(i * 16)), max);
        }
        // both halves: the column maxima over even and odd keys together
        max = _mm512_max_ps(_mm512_shuffle_f32x4::<0x4E>(max, max), max);
        let mut sum = _mm512_setzero_pd();
        for c in (0..n_pairs).step_by(4) {
            let mut e = [_mm512_setzero_ps(); 4];
            for (l, el) in e.iter_mut().enumerate() {
                let at = p.add((c + l) * 16);
                *el = expf_ggml_avx512(_mm512_sub_ps(_mm512_loadu_ps(at), max));
                _mm512_storeu_ps(at, *el);
            }
            // keys (0+4)+(2+6) | (1+5)+(3+7), then the halves added
            let halves = _mm512_add_ps(_mm512_add_ps(e[0], e[2]), _mm512_add_ps(e[1], e[3]));
            let chunk = _mm256_add_ps(_mm512_castps512_ps256(halves), high_half(halves));
            sum = _mm512_add_pd(sum, _mm512_cvtps_pd(chunk));
        }
        let inv = _mm512_cvtpd_ps(_mm512_div_pd(_mm512_set1_pd(1.0), sum));
        let inv =
            _mm512_shuffle_f32x4::<0x44>(_mm512_castps256_ps512(inv), _mm512_castps256_ps512(inv));
        for i in 0..n_pairs {
            let at = p.add(i * 16);
            _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), inv));
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn high_half(x: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)))
    }

    /// `ops::expf_ggml` of 16 values, the same operations (both range branches, then a select).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn expf_ggml_avx512(x: __m512) -> __m512 {
        let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
        let int = |bits: u32| _mm512_set1_epi32(bits as i32);
        let r = c(0x4b40_0000);
        let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(n, c(0x35bf_be8e), _mm512_fnmadd_ps(n, c(0x3f31_7200), x));
        let e = _mm512_slli_epi32::<23>(_mm512_castps_si512(z));
        let k = _mm512_castsi512_ps(_mm512_add_epi32(e, int(0x3f80_0000)));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                u,
                _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
            ),
            u,
            _mm512_mul_ps(c(0x3f7f_fff6), b),
        );
        let fast = _mm512_fmadd_ps(j, k, k);
        let abs_n = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(n), int(0x7fff_ffff)));
        let small = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(abs_n, _mm512_set1_ps(126.0));
        if small == 0xffff {
            return fast;
        }
        let non_positive = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
        let g = _mm512_maskz_mov_epi32(non_positive, int(0x8200_0000));
        let s1 = _mm512_castsi512_ps(_mm512_add_epi32(g, int(0x7f00_0000)));
        let s2 = _mm512_castsi512_ps(_mm512_sub_epi32(e, g));
        let huge = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(abs_n, _mm512_set1_ps(192.0));
        let big = _mm512_mask_blend_ps(
            huge,
            _mm512_mul_ps(_mm512_fmadd_ps(s2, j, s2), s1),
            _mm512_mul_ps(s1, s1),
        );
        _mm512_mask_blend_ps(small, big, fast)
    }

    /// out[r] = Σ_j p[j][r]·v_j for the block's rows: tiles of up to 3 rows × 16 dimensions, the
    /// 8 lane accumulators of each row in registers while streaming over the keys.
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_values_avx512(p: &[f32], kv: &KvHead, out: &mut [f32]) {
        let nr = out.len() / kv.hv;
        let mut r = 0;
        while r < nr {
            let tile = (nr - r).min(3);
            for d in (0..kv.hv).step_by(16) {
                let o = out.as_mut_ptr().add(r * kv.hv + d);
                let (pr, v) = (p.as_ptr().add(r), kv.values.as_ptr().add(d * kv.n_kv));
                match tile {
                    3 => weighted_values_tile_avx512::<3>(pr, v, kv, o),
                    2 => weighted_values_tile_avx512::<2>(pr, v, kv, o),
                    _ => weighted_values_tile_avx512::<1>(pr, v, kv, o),
                }
            }
            r += tile;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_values_tile_avx512<const R: usize>(
        p: *const f32,
        v: *const f32,
        kv: &KvHead,
        out: *mut f32,
    ) {
        let n = kv.n_visible;
        let full = n - n % 8;
        let mut acc = [[_mm512_setzero_ps(); 8]; R];
        let step = |j: usize, l: usize, acc: &mut [[__m512; 8]; R]| {
            let vj = _mm512_loadu_ps(v.add(j * 16));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let pj = _mm512_set1_ps(*p.add(j * ROWS + r));
                acc_r[l] = _mm512_fmadd_ps(pj, vj, acc_r[l]);
            }
        };
        for j0 in (0..full).step_by(8) {
            for l in 0..8 {
                step(j0 + l, l, &mut acc);
            }
        }
        // lane indices stay constants, so the accumulators stay in registers
        for l in 0..8 {
            if l < n - full {
                step(full + l, l, &mut acc);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let sum = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
            );
            _mm512_storeu_ps(out.add(r * kv.hv), sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::heavy_tailed;

    /// The formulation before blocking, all scalar: per (token, head), `dot_kq_scalar` · scale,
    /// masked padding to a multiple of 8, the softmax, `weighted_values_body`.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], s: AttnShape) -> Vec<f32> {
        let (hk, hv) = (s.head_dim_k, s.head_dim_v);
        let group = s.n_head / s.n_head_kv;
        let (kw, vw) = (s.n_head_kv * hk, s.n_head_kv * hv);
        let n = q.len() / (s.n_head * hk);
        let scale = 1.0 / (hk as f32).sqrt();
        let mut out = vec![0f32; n * s.n_head * hv];
        for (i, o) in out.chunks_exact_mut(hv).enumerate() {
            let (t, h) = (i / s.n_head, i % s.n_head);
            let g = h / group;
            let qh = &q[i * hk..(i + 1) * hk];
            let n_visible = s.pos0 + t + 1;
            let mut scores = vec![f32::NEG_INFINITY; n_visible.next_multiple_of(8)];
            for (j, sc) in scores[..n_visible].iter_mut().enumerate() {
                *sc = dot_kq_scalar(qh, &keys[j * kw + g * hk..][..hk]) * scale;
            }
            ops::softmax_in_place(&mut scores);
            let v = |j: usize| &values[j * vw + g * hv..][..hv];
            weighted_values_body(&scores[..n_visible], v, o);
        }
        out
    }

    /// Every runnable path against `reference`, bit for bit, on random data; queries scaled by
    /// `q_scale` (large values give extreme scores: exp underflows and its far range branches).
    fn check_paths(seed: u64, s: AttnShape, n: usize, q_scale: f32) {
        let (hk, hv) = (s.head_dim_k, s.head_dim_v);
        let n_kv = s.pos0 + n;
        let q: Vec<f32> = heavy_tailed(seed, n * s.n_head * hk)
            .iter()
            .map(|v| v * q_scale)
            .collect();
        let keys: Vec<f32> = heavy_tailed(seed + 1, n_kv * s.n_head_kv * hk)
            .iter()
            .map(|v| v * 50.0)
            .collect();
        let values = heavy_tailed(seed + 2, n_kv * s.n_head_kv * hv);
        let want = reference(&q, &keys, &values, s);
        for path in [Path::ByHead, Path::Avx2, Path::Avx512] {
            if !runnable(path, &s) {
                continue;
            }
            let got = attention_on(path, &q, &keys, &values, s);
            let diff = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(
                diff.is_none(),
                "{path:?} n_head {} n_head_kv {} hk {hk} hv {hv} pos0 {} n {n} q_scale {q_scale}: \
                 first difference at {diff:?}",
                s.n_head,
                s.n_head_kv,
                s.pos0,
            );
        }
    }

    fn shape(n_head: usize, n_head_kv: usize, hk: usize, hv: usize, pos0: usize) -> AttnShape {
        AttnShape {
            n_head,
            n_head_kv,
            head_dim_k: hk,
            head_dim_v: hv,
            pos0,
        }
    }

    #[test]
    fn blocked_paths_equal_reference_bit_for_bit() {
        let mut seed = 100;
        // (pos0, n): visible key counts 1..=9, 7, 31..=34, 506..=514
        let spans = [(0, 9), (6, 1), (30, 4), (505, 9)];
        for group in [1, 2, 3, 4, 5, 6, 7, 8, 12, 16] {
            for n_head_kv in [1, 2] {
                for (hk, hv) in [(128, 128), (64, 64)] {
                    for &(pos0, n) in &spans {
                        seed += 3;
                        check_paths(
                            seed,
                            shape(group * n_head_kv, n_head_kv, hk, hv, pos0),
                            n,
                            50.0,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn blocked_paths_equal_reference_on_extreme_scores() {
        // scores up to ~1e5: most probabilities underflow to 0, exp takes its |n| > 126 and > 192
        // branches; and scores ~1e-3, where every key weighs about the same
        for (i, q_scale) in [2000.0, 20000.0, 0.05].into_iter().enumerate() {
            for (pos0, n) in [(0, 9), (30, 4), (505, 9)] {
                check_paths(7 + i as u64, shape(8, 1, 128, 128, pos0), n, q_scale);
                check_paths(9 + i as u64, shape(32, 4, 128, 128, pos0), n, q_scale);
            }
        }
    }

    /// Timing, not a check: `cargo test --release -p pyqmoe-core --lib attention_timing --
    /// --ignored --nocapture` prints each path's best time on the A3B shape (32 query heads, 4 KV
    /// heads, head size 128) for a 512-token prompt and for one token after 4096 cached.
    #[test]
    #[ignore]
    fn attention_timing() {
        for (pos0, n) in [(0, 512), (4096, 1)] {
            let s = shape(32, 4, 128, 128, pos0);
            let q = heavy_tailed(1, n * 32 * 128);
            let keys = heavy_tailed(2, (pos0 + n) * 4 * 128);
            let values = heavy_tailed(3, (pos0 + n) * 4 * 128);
            for path in [Path::ByHead, Path::Avx2, Path::Avx512] {
                if !runnable(path, &s) {
                    continue;
                }
                let best = (0..7)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        std::hint::black_box(attention_on(path, &q, &keys, &values, s));
                        start.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min);
                println!("pos0 {pos0} n {n} {path:?}: {:.3} ms", best * 1e3);
            }
        }
    }

    #[test]
    fn head_sizes_without_a_blocked_kernel_use_the_reference() {
        // hk % 32 != 0: by head only; hv % 16 != 0: AVX2 but not AVX-512
        check_paths(3, shape(4, 2, 48, 40, 5), 4, 50.0);
        check_paths(4, shape(4, 2, 96, 24, 5), 4, 50.0);
        assert_eq!(best_path(&shape(4, 2, 48, 40, 0)), Path::ByHead);
        assert!(!runnable(Path::Avx512, &shape(4, 2, 96, 24, 0)));
    }

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
