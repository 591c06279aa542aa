//! The engine on small synthetic GGUF models: dense Qwen3 equals a one-expert Qwen3-MoE, batched
//! equals token-by-token evaluation, and bad files give errors naming the key or tensor.

use std::path::{Path, PathBuf};

use pyqmoe_core::gguf::{GgufWriter, TensorSpec, Value};
use pyqmoe_core::model::{KvType, Model};
use pyqmoe_core::quant::testdata;
use pyqmoe_core::GgmlType;

const E: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 8;
const FF: usize = 32;
const VOCAB: usize = 50;
const LAYERS: usize = 2;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyqmoe-engine-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

type Tensors = Vec<(String, Vec<u64>, Vec<f32>)>;

fn metadata(arch: &str, n_expert: Option<u32>) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".to_string(), Value::string(arch)),
        (k("block_count"), Value::U32(LAYERS as u32)),
        (k("context_length"), Value::U32(128)),
        (k("embedding_length"), Value::U32(E as u32)),
        (k("feed_forward_length"), Value::U32(FF as u32)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (k("attention.key_length"), Value::U32(HD as u32)),
        (k("attention.value_length"), Value::U32(HD as u32)),
        (k("rope.freq_base"), Value::F32(10000.0)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
    ];
    if let Some(n) = n_expert {
        m.push((k("expert_count"), Value::U32(n)));
        m.push((k("expert_used_count"), Value::U32(n.min(2))));
        m.push((k("expert_feed_forward_length"), Value::U32(FF as u32)));
    }
    m
}

/// Random weights; `n_expert` None = dense FFN tensors, Some(n) = stacked expert tensors where
/// expert 0 holds the dense FFN's weights.
fn tensors(n_expert: Option<usize>, seed: u64) -> Tensors {
    let mut seed = seed;
    let mut rnd = |n: usize, scale: f32| {
        seed += 1;
        testdata::gaussian(seed, n)
            .into_iter()
            .map(|v| v * scale / 0.02) // gaussian() has std 0.02
            .collect::<Vec<f32>>()
    };
    let mut t: Tensors = vec![];
    let mut add = |name: String, dims: Vec<u64>, data: Vec<f32>| t.push((name, dims, data));
    add(
        "token_embd.weight".into(),
        vec![E as u64, VOCAB as u64],
        rnd(E * VOCAB, 1.0),
    );
    for l in 0..LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let norm = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + x).collect::<Vec<f32>>();
        add(n("attn_norm"), vec![E as u64], norm(rnd(E, 0.1)));
        add(
            n("attn_q"),
            vec![E as u64, (HEADS * HD) as u64],
            rnd(E * HEADS * HD, 0.2),
        );
        add(
            n("attn_k"),
            vec![E as u64, (KV_HEADS * HD) as u64],
            rnd(E * KV_HEADS * HD, 0.2),
        );
        add(
            n("attn_v"),
            vec![E as u64, (KV_HEADS * HD) as u64],
            rnd(E * KV_HEADS * HD, 0.2),
        );
        add(
            n("attn_output"),
            vec![(HEADS * HD) as u64, E as u64],
            rnd(E * HEADS * HD, 0.2),
        );
        add(n("attn_q_norm"), vec![HD as u64], norm(rnd(HD, 0.1)));
        add(n("attn_k_norm"), vec![HD as u64], norm(rnd(HD, 0.1)));
        add(n("ffn_norm"), vec![E as u64], norm(rnd(E, 0.1)));
        let (gate, up, down) = (rnd(E * FF, 0.2), rnd(E * FF, 0.2), rnd(E * FF, 0.25));
        // Draw the extra experts' weights in both cases, so later tensors get the same values.
        let ne = n_expert.unwrap_or(1);
        let more = (ne - 1) * E * FF;
        let (router, more_gate, more_up, more_down) = (
            rnd(E * ne, 0.5),
            rnd(more, 0.2),
            rnd(more, 0.2),
            rnd(more, 0.25),
        );
        match n_expert {
            None => {
                let _ = (router, more_gate, more_up, more_down);
                add(n("ffn_gate"), vec![E as u64, FF as u64], gate);
                add(n("ffn_up"), vec![E as u64, FF as u64], up);
                add(n("ffn_down"), vec![FF as u64, E as u64], down);
            }
            Some(ne) => {
                let stack = |first: Vec<f32>, rest: Vec<f32>| [first, rest].concat();
                add(n("ffn_gate_inp"), vec![E as u64, ne as u64], router);
                add(
                    n("ffn_gate_exps"),
                    vec![E as u64, FF as u64, ne as u64],
                    stack(gate, more_gate),
                );
                add(
                    n("ffn_up_exps"),
                    vec![E as u64, FF as u64, ne as u64],
                    stack(up, more_up),
                );
                add(
                    n("ffn_down_exps"),
                    vec![FF as u64, E as u64, ne as u64],
                    stack(down, more_down),
                );
            }
        }
    }
    add(
        "output_norm.weight".into(),
        vec![E as u64],
        rnd(E, 0.1).into_iter().map(|x| 1.0 + x).collect(),
    );
    add(
        "output.weight".into(),
        vec![E as u64, VOCAB as u64],
        rnd(E * VOCAB, 0.3),
    );
    t
}

fn write(path: &Path, meta: &[(String, Value)], tensors: &Tensors, ty: GgmlType) {
    let specs = tensors
        .iter()
        .map(|(name, dims, _)| TensorSpec {
            name: name.clone(),
            dims: dims.clone(),
            ty: if dims.len() >= 2 { ty } else { GgmlType::F32 },
        })
        .collect();
    let mut w = GgufWriter::create(path, meta, specs).unwrap();
    for (name, dims, data) in tensors {
        let t = if dims.len() >= 2 { ty } else { GgmlType::F32 };
        let raw = pyqmoe_core::quant::quantize(name, data, dims[0] as usize, t, None).unwrap();
        w.write_tensor(&raw).unwrap();
    }
    w.finish().unwrap();
}

fn logits(path: &Path, tokens: &[u32], kv: KvType) -> Vec<f32> {
    let m = Model::open(path).unwrap();
    let mut s = m.new_state(64, kv, kv).unwrap();
    m.eval(&mut s, tokens, true).unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

const TOKENS: [u32; 9] = [3, 17, 42, 0, 49, 5, 5, 23, 8];

#[test]
fn dense_qwen3_equals_single_expert_qwen3moe() {
    // One expert, used with weight softmax([x]) = 1: the MoE block is exactly the dense FFN.
    let dense = tmp("dense.gguf");
    write(
        &dense,
        &metadata("qwen3", None),
        &tensors(None, 10),
        GgmlType::F32,
    );
    let moe = tmp("moe1.gguf");
    let mut meta = metadata("qwen3moe", Some(1));
    meta.retain(|(k, _)| k != "qwen3moe.expert_used_count");
    meta.push(("qwen3moe.expert_used_count".into(), Value::U32(1)));
    write(&moe, &meta, &tensors(Some(1), 10), GgmlType::F32);
    let (a, b) = (
        logits(&dense, &TOKENS, KvType::F32),
        logits(&moe, &TOKENS, KvType::F32),
    );
    assert_eq!(a.len(), TOKENS.len() * VOCAB);
    assert!(max_rel_diff(&a, &b) < 1e-6, "{}", max_rel_diff(&a, &b));
}

#[test]
fn batched_chunked_and_incremental_evaluation_agree() {
    for ty in [GgmlType::F32, GgmlType::BF16, GgmlType::Q8_0] {
        let p = tmp(&format!("moe8-{ty}.gguf"));
        write(
            &p,
            &metadata("qwen3moe", Some(8)),
            &tensors(Some(8), 20),
            ty,
        );
        let m = Model::open(&p).unwrap();
        let mut s = m.new_state(32, KvType::F32, KvType::F32).unwrap();
        let batched = m.eval(&mut s, &TOKENS, true).unwrap();
        s.reset();
        let mut one_by_one = vec![];
        for t in TOKENS {
            one_by_one.extend(m.eval(&mut s, &[t], true).unwrap());
        }
        assert_eq!(batched, one_by_one, "{ty}");
        // Truncate and redo the tail in one chunk; the last-token-only call gives the last row.
        s.truncate(4);
        let tail = m.eval(&mut s, &TOKENS[4..], false).unwrap();
        assert_eq!(tail, batched[(TOKENS.len() - 1) * VOCAB..], "{ty}");
        assert_eq!(s.n_past, TOKENS.len());
        // An f16 cache only rounds keys and values. (Not checked for Q8_0: there the rounding can
        // flip activation quants and near-tied router choices of this random model.)
        if ty == GgmlType::Q8_0 {
            continue;
        }
        let mut s16 = m.new_state(32, KvType::F16, KvType::F16).unwrap();
        let half = m.eval(&mut s16, &TOKENS, true).unwrap();
        assert!(
            max_rel_diff(&half, &batched) < 2e-3,
            "{ty}: {}",
            max_rel_diff(&half, &batched)
        );
    }
}

#[test]
fn tied_output_uses_the_embedding() {
    let p = tmp("tied.gguf");
    let mut t = tensors(None, 30);
    let embd = t[0].2.clone();
    t.retain(|(n, _, _)| n != "output.weight");
    write(&p, &metadata("qwen3", None), &t, GgmlType::F32);
    let untied = tmp("untied.gguf");
    let last = t.len();
    t.insert(
        last,
        ("output.weight".into(), vec![E as u64, VOCAB as u64], embd),
    );
    write(&untied, &metadata("qwen3", None), &t, GgmlType::F32);
    assert_eq!(
        logits(&p, &TOKENS, KvType::F32),
        logits(&untied, &TOKENS, KvType::F32)
    );
}

#[test]
fn errors_name_the_key_or_tensor() {
    let err = |meta: Vec<(String, Value)>, t: Tensors| {
        let p = tmp("bad.gguf");
        write(&p, &meta, &t, GgmlType::F32);
        match Model::open(&p) {
            Ok(_) => panic!("a bad model loaded"),
            Err(e) => e.to_string(),
        }
    };
    let mut meta = metadata("qwen3moe", Some(4));
    meta.retain(|(k, _)| k != "qwen3moe.expert_count");
    let msg = err(meta, tensors(Some(4), 1));
    assert!(
        msg.contains("qwen3moe.expert_count") && msg.contains("missing"),
        "{msg}"
    );

    let mut t = tensors(Some(4), 1);
    t.retain(|(n, _, _)| n != "blk.1.attn_k_norm.weight");
    let msg = err(metadata("qwen3moe", Some(4)), t);
    assert!(
        msg.contains("blk.1.attn_k_norm.weight") && msg.contains("missing"),
        "{msg}"
    );

    let mut t = tensors(Some(4), 1);
    t.retain(|(n, _, _)| n != "blk.0.attn_q.weight");
    t.push((
        "blk.0.attn_q.weight".into(),
        vec![E as u64, 8],
        vec![0.0; E * 8],
    ));
    let msg = err(metadata("qwen3moe", Some(4)), t);
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("expected"),
        "{msg}"
    );

    let mut meta = metadata("llama", None);
    meta[0].1 = Value::string("llama");
    let msg = err(meta, tensors(None, 1));
    assert!(msg.contains("'llama' is not supported"), "{msg}");

    let p = tmp("ok.gguf");
    write(
        &p,
        &metadata("qwen3", None),
        &tensors(None, 1),
        GgmlType::F32,
    );
    let m = Model::open(&p).unwrap();
    let mut s = m.new_state(4, KvType::F32, KvType::F32).unwrap();
    let e = m
        .eval(&mut s, &[VOCAB as u32], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let e = m.eval(&mut s, &[1; 5], true).unwrap_err().to_string();
    assert!(e.contains("context is full"), "{e}");
}
