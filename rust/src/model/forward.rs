//! The Qwen3(-MoE) forward pass over a batch of tokens, reading top to bottom like the model card.
//!
//! Per layer: RMSNorm → Q/K/V projections → per-head RMSNorm of Q and K → NEOX RoPE → grouped-query
//! attention over the KV cache → output projection → residual → RMSNorm → feed-forward (router
//! softmax, top-k, renormalised weights, SwiGLU experts; or a dense SwiGLU) → residual. Then the
//! final RMSNorm and the output head.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::error::{Error, Result};

use super::attention::{attention, AttnShape};
use super::collect::ImatrixCollector;
use super::matmul::{matmul, Mat};
use super::ops;
use super::weights::{Ffn, Layer, WeightRef};
use super::Model;

/// Debugging aid: with PYQMOE_DUMP_DIR set, the last row of named intermediates is written there as
/// raw little-endian f32 (`NAME.f32`, names as in llama.cpp's graph; see scripts/llamacpp_tensors.py).
/// The name is built only when dumping is on.
fn dump(name: impl FnOnce() -> String, rows: &[f32], width: usize) {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(dir) = DIR.get_or_init(|| std::env::var_os("PYQMOE_DUMP_DIR").map(Into::into)) else {
        return;
    };
    let name = name();
    let last = &rows[rows.len() - width..];
    let bytes: Vec<u8> = last.iter().flat_map(|v| v.to_le_bytes()).collect();
    let _ = std::fs::write(dir.join(format!("{name}.f32")), bytes);
}

/// Largest number of tokens pushed through the layers at once; longer inputs go in pieces.
pub const MAX_BATCH: usize = 512;

/// Storage type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F32,
    /// Half the memory; values rounded to f16 as llama.cpp's default cache does.
    F16,
    /// About a quarter of the memory: every 32 values of a row as one Q8_0 block (llama.cpp's
    /// `-ctk q8_0` / `-ctv q8_0`); the row width must be a multiple of 32.
    Q8_0,
}

impl KvType {
    /// llama.cpp's names: "f32", "f16", "q8_0".
    pub fn parse(name: &str) -> Result<KvType> {
        match name.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            "q8_0" => Ok(KvType::Q8_0),
            other => Err(Error::Invalid(format!(
                "unknown KV cache type '{other}' (use f32, f16 or q8_0)"
            ))),
        }
    }
}

enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Q8_0 blocks of 34 bytes, 32 values each.
    Q8_0(Vec<u8>),
}

impl KvBuf {
    fn new(ty: KvType, n: usize) -> KvBuf {
        match ty {
            KvType::F32 => KvBuf::F32(vec![0.0; n]),
            KvType::F16 => KvBuf::F16(vec![f16::ZERO; n]),
            KvType::Q8_0 => KvBuf::Q8_0(vec![0u8; n / 32 * 34]),
        }
    }
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(b) => b[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(b) => b[at..at + src.len()].convert_from_f32_slice(src),
            // llama.cpp fills a q8_0 cache with its CPU `from_float`, as activations are quantized
            KvBuf::Q8_0(b) => {
                let (from, to) = (at / 32 * 34, (at + src.len()) / 32 * 34);
                super::vec_dot::quantize_act_q8_0(src, &mut b[from..to])
            }
        }
    }
    /// The first `n` values as f32: borrowed for F32, converted once per call for F16.
    fn prefix_f32(&self, n: usize) -> std::borrow::Cow<'_, [f32]> {
        match self {
            KvBuf::F32(b) => std::borrow::Cow::Borrowed(&b[..n]),
            KvBuf::F16(b) => {
                let mut out = vec![0f32; n];
                b[..n].convert_to_f32_slice(&mut out);
                std::borrow::Cow::Owned(out)
            }
            KvBuf::Q8_0(b) => {
                let mut out = vec![0f32; n];
                (crate::quant::legacy::q8_0::Q8_0_KERNELS.dequantize_row)(
                    &b[..n / 32 * 34],
                    &mut out,
                );
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Keys and values of every layer for positions 0..n_ctx, each position a row of all KV heads.
pub struct KvCache {
    pub type_k: KvType,
    pub type_v: KvType,
    pub n_ctx: usize,
    k_width: usize,
    v_width: usize,
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
}

/// The mutable part of a generation: the KV cache and how many positions it holds.
pub struct State {
    pub kv: KvCache,
    pub n_past: usize,
}

impl State {
    /// Forget positions n.. (the next eval continues at position n).
    pub fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }
    pub fn reset(&mut self) {
        self.n_past = 0;
    }
}

impl Model {
    /// A fresh state with room for `n_ctx` positions, keys stored as `type_k` and values as
    /// `type_v` (llama.cpp's `-ctk` / `-ctv`).
    pub fn new_state(&self, n_ctx: usize, type_k: KvType, type_v: KvType) -> Result<State> {
        let c = &self.config;
        let (kw, vw) = (c.n_head_kv * c.head_dim_k, c.n_head_kv * c.head_dim_v);
        for (ty, width, what) in [(type_k, kw, "K"), (type_v, vw, "V")] {
            if ty == KvType::Q8_0 && width % 32 != 0 {
                return Err(Error::Invalid(format!(
                    "a q8_0 {what} cache needs rows of a multiple of 32 values; this model's are {width}"
                )));
            }
        }
        Ok(State {
            kv: KvCache {
                type_k,
                type_v,
                n_ctx,
                k_width: kw,
                v_width: vw,
                k: (0..c.n_layer)
                    .map(|_| KvBuf::new(type_k, n_ctx * kw))
                    .collect(),
                v: (0..c.n_layer)
                    .map(|_| KvBuf::new(type_v, n_ctx * vw))
                    .collect(),
            },
            n_past: 0,
        })
    }

    fn mat<'a>(&'a self, w: &'a WeightRef) -> Mat<'a> {
        w.mat(&self.gguf)
    }

    /// Runs `tokens` at positions n_past.., appending their keys/values to the cache. Returns the
    /// logits, [n_tokens][n_vocab] when `all_logits`, else only the last token's [n_vocab].
    pub fn eval(&self, state: &mut State, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        self.eval_inner(state, tokens, all_logits, None)
    }

    /// `eval` that also feeds every weight multiply's inputs to `collector` (llama-imatrix).
    pub fn eval_collect(
        &self,
        state: &mut State,
        tokens: &[u32],
        all_logits: bool,
        collector: &mut ImatrixCollector,
    ) -> Result<Vec<f32>> {
        self.eval_inner(state, tokens, all_logits, Some(collector))
    }

    fn eval_inner(
        &self,
        state: &mut State,
        tokens: &[u32],
        all_logits: bool,
        mut collector: Option<&mut ImatrixCollector>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(Error::Invalid("eval needs at least one token".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is out of range (vocabulary has {} tokens)",
                c.n_vocab
            )));
        }
        if state.n_past + tokens.len() > state.kv.n_ctx {
            return Err(Error::Invalid(format!(
                "context is full: {} cached + {} new tokens > n_ctx {}",
                state.n_past,
                tokens.len(),
                state.kv.n_ctx
            )));
        }
        let mut logits = Vec::with_capacity(if all_logits { tokens.len() } else { 1 } * c.n_vocab);
        let n_chunks = tokens.len().div_ceil(MAX_BATCH);
        for (i, chunk) in tokens.chunks(MAX_BATCH).enumerate() {
            let want = if all_logits {
                Some(chunk.len())
            } else if i + 1 == n_chunks {
                Some(1)
            } else {
                None
            };
            self.eval_batch(state, chunk, want, &mut logits, collector.as_deref_mut());
        }
        Ok(logits)
    }

    /// One batch: embeddings, every layer, then logits of the last `n_out` tokens (if any).
    fn eval_batch(
        &self,
        state: &mut State,
        tokens: &[u32],
        n_out: Option<usize>,
        logits: &mut Vec<f32>,
        mut collector: Option<&mut ImatrixCollector>,
    ) {
        let c = &self.config;
        let (n, e) = (tokens.len(), c.n_embd);
        let pos0 = state.n_past;

        // Embedding lookup: one row of token_embd per token.
        let embd = self.mat(&self.weights.token_embd);
        let mut x = vec![0f32; n * e];
        for (row, &t) in x.chunks_exact_mut(e).zip(tokens) {
            embd.dequantize_row(t as usize, row);
        }

        // RoPE angles depend only on the position: compute them once for all layers.
        let rope: Vec<(Vec<f32>, Vec<f32>)> = (0..n)
            .map(|t| ops::rope_cos_sin(pos0 + t, c.head_dim_k, c.rope_theta))
            .collect();

        for (il, layer) in self.weights.layers.iter().enumerate() {
            self.layer_forward(
                il,
                layer,
                &mut x,
                n,
                pos0,
                &rope,
                &mut state.kv,
                collector.as_deref_mut(),
            );
        }
        state.n_past += n;

        if let Some(n_out) = n_out {
            // Final norm and output head for the last n_out tokens only.
            let first = n - n_out;
            let mut h = vec![0f32; n_out * e];
            for (o, xr) in h.chunks_exact_mut(e).zip(x[first * e..].chunks_exact(e)) {
                ops::rms_norm(xr, &self.weights.output_norm, c.rms_eps, o);
            }
            dump(|| "result_norm".into(), &h, e);
            let mut out = vec![0f32; n_out * c.n_vocab];
            matmul(&self.mat(&self.weights.output), &h, n_out, &mut out);
            logits.extend_from_slice(&out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        il: usize,
        layer: &Layer,
        x: &mut [f32],
        n: usize,
        pos0: usize,
        rope: &[(Vec<f32>, Vec<f32>)],
        kv: &mut KvCache,
        mut collector: Option<&mut ImatrixCollector>,
    ) {
        let c = &self.config;
        let e = c.n_embd;
        let (hk, hv) = (c.head_dim_k, c.head_dim_v);

        // attention block: norm, projections
        let h = rms_norm_rows(x, &layer.attn_norm, c.rms_eps);
        dump(|| format!("attn_norm-{il}"), &h, e);
        let mut q = vec![0f32; n * c.n_head * hk];
        let mut k = vec![0f32; n * kv.k_width];
        let mut v = vec![0f32; n * kv.v_width];
        if let Some(col) = collector.as_deref_mut() {
            for w in [&layer.attn_q, &layer.attn_k, &layer.attn_v] {
                col.dense(&w.name, &h, e);
            }
        }
        matmul(&self.mat(&layer.attn_q), &h, n, &mut q);
        matmul(&self.mat(&layer.attn_k), &h, n, &mut k);
        matmul(&self.mat(&layer.attn_v), &h, n, &mut v);

        // QK-norm: RMSNorm of every head of Q and K, then rotary embeddings.
        ops::rms_norm_rows_in_place(&mut q, &layer.attn_q_norm, c.rms_eps);
        ops::rms_norm_rows_in_place(&mut k, &layer.attn_k_norm, c.rms_eps);
        dump(|| format!("Qcur_normed-{il}"), &q, c.n_head * hk);
        dump(|| format!("Kcur_normed-{il}"), &k, kv.k_width);
        dump(|| format!("Vcur-{il}"), &v, kv.v_width);
        for t in 0..n {
            let (cos, sin) = &rope[t];
            ops::rope_neox_in_place(&mut q[t * c.n_head * hk..(t + 1) * c.n_head * hk], cos, sin);
            ops::rope_neox_in_place(&mut k[t * kv.k_width..(t + 1) * kv.k_width], cos, sin);
        }

        dump(|| format!("Qcur-{il}"), &q, c.n_head * hk);
        dump(|| format!("Kcur-{il}"), &k, kv.k_width);
        // Append this batch's keys and values to the cache, then attend over positions 0..=pos.
        kv.k[il].write(pos0 * kv.k_width, &k);
        kv.v[il].write(pos0 * kv.v_width, &v);
        let n_kv = pos0 + n;
        let keys = kv.k[il].prefix_f32(n_kv * kv.k_width);
        let values = kv.v[il].prefix_f32(n_kv * kv.v_width);
        let attn = attention(
            &q,
            &keys,
            &values,
            AttnShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim_k: hk,
                head_dim_v: hv,
                pos0,
            },
        );

        dump(|| format!("kqv_out-{il}"), &attn, c.n_head * hv);
        // output projection + residual
        let mut o = vec![0f32; n * e];
        if let Some(col) = collector.as_deref_mut() {
            col.dense(&layer.attn_output.name, &attn, layer.attn_output.n_cols());
        }
        matmul(&self.mat(&layer.attn_output), &attn, n, &mut o);
        add_in_place(x, &o);
        dump(|| format!("ffn_inp-{il}"), x, e);

        // feed-forward block + residual
        let h = rms_norm_rows(x, &layer.ffn_norm, c.rms_eps);
        dump(|| format!("ffn_norm-{il}"), &h, e);
        let f = match &layer.ffn {
            Ffn::Moe {
                gate_inp,
                gate_exps,
                up_exps,
                down_exps,
            } => self.moe_ffn(&h, n, [gate_inp, gate_exps, up_exps, down_exps], collector),
            Ffn::Dense { gate, up, down } => swiglu_ffn(
                [&self.mat(gate), &self.mat(up), &self.mat(down)],
                &h,
                n,
                collector.map(|c| (c, None)),
            ),
        };
        dump(|| format!("ffn_moe_out-{il}"), &f, e);
        add_in_place(x, &f);
        dump(|| format!("l_out-{il}"), x, e);
    }

    /// Sparse MoE: route each token to its top-k experts, then run every selected expert once over
    /// all the tokens routed to it (its weights are read once per batch), summing with the weights.
    fn moe_ffn(
        &self,
        h: &[f32],
        n: usize,
        [gate_inp, gate_exps, up_exps, down_exps]: [&WeightRef; 4],
        mut collector: Option<&mut ImatrixCollector>,
    ) -> Vec<f32> {
        let c = &self.config;
        let e = c.n_embd;
        let mut router = vec![0f32; n * c.n_expert];
        if let Some(col) = collector.as_deref_mut() {
            col.dense(&gate_inp.name, h, e);
        }
        matmul(&self.mat(gate_inp), h, n, &mut router);
        dump(|| "ffn_moe_logits".into(), &router, c.n_expert);

        // tokens_of[expert] = [(token, rank among the token's experts, weight)]
        let k = c.n_expert_used;
        let mut tokens_of: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); c.n_expert];
        for (t, logits) in router.chunks_exact(c.n_expert).enumerate() {
            for (rank, (ex, w)) in ops::route_top_k(logits, k).into_iter().enumerate() {
                tokens_of[ex].push((t, rank, w));
            }
        }

        // One expert's SwiGLU over the tokens routed to it (rows in routing order).
        let run_expert =
            |ex: usize, routed: &[(usize, usize, f32)], col: Option<&mut ImatrixCollector>| {
                let m = routed.len();
                let mut xs = Vec::with_capacity(m * e);
                for &(t, _, _) in routed {
                    xs.extend_from_slice(&h[t * e..(t + 1) * e]);
                }
                swiglu_ffn(
                    [
                        &gate_exps.expert(&self.gguf, ex),
                        &up_exps.expert(&self.gguf, ex),
                        &down_exps.expert(&self.gguf, ex),
                    ],
                    &xs,
                    m,
                    col.map(|col| (col, Some((ex, c.n_expert)))),
                )
            };
        let busy = tokens_of.iter().enumerate().filter(|(_, r)| !r.is_empty());
        // Experts run in parallel (each matmul splits its rows too) unless a collector records
        // them; every output is the same either way.
        let outputs: Vec<(usize, Vec<f32>)> = match collector {
            None => busy
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|(ex, routed)| (ex, run_expert(ex, routed, None)))
                .collect(),
            Some(col) => busy
                .map(|(ex, routed)| (ex, run_expert(ex, routed, Some(&mut *col))))
                .collect(),
        };

        // Each token's k weighted expert outputs, by rank; summed in rank order like llama.cpp.
        // One buffer per rank: each stays under malloc's mmap threshold (see keep_freed_memory).
        let mut slots = vec![vec![0f32; n * e]; k];
        for (ex, y) in &outputs {
            for (i, &(t, rank, w)) in tokens_of[*ex].iter().enumerate() {
                let slot = &mut slots[rank][t * e..(t + 1) * e];
                for (o, &yv) in slot.iter_mut().zip(&y[i * e..(i + 1) * e]) {
                    *o = yv * w;
                }
            }
        }
        let mut ranks = slots.into_iter();
        let mut out = ranks.next().expect("at least one expert per token");
        for s in ranks {
            add_in_place(&mut out, &s);
        }
        out
    }
}

/// down(silu(gate(x)) · up(x)) for `n` rows of x. With a collector, the inputs of the three
/// multiplies are recorded, as expert `(index, n_expert)` of 3-D weights when given.
fn swiglu_ffn(
    [gate, up, down]: [&Mat; 3],
    x: &[f32],
    n: usize,
    mut collector: Option<(&mut ImatrixCollector, Option<(usize, usize)>)>,
) -> Vec<f32> {
    let ff = gate.n_rows;
    let mut record = |w: &Mat, input: &[f32]| {
        if let Some((col, expert)) = collector.as_mut() {
            match *expert {
                Some((ex, n_expert)) => col.expert(w.name, n_expert, ex, input, w.n_cols),
                None => col.dense(w.name, input, w.n_cols),
            }
        }
    };
    record(gate, x);
    record(up, x);
    let mut g = vec![0f32; n * ff];
    let mut u = vec![0f32; n * ff];
    matmul(gate, x, n, &mut g);
    matmul(up, x, n, &mut u);
    ops::swiglu_in_place(&mut g, &u, ff);
    record(down, &g);
    let mut y = vec![0f32; n * down.n_rows];
    matmul(down, &g, n, &mut y);
    y
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, r) in out.chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
        ops::rms_norm(r, w, eps, o);
    }
    out
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
