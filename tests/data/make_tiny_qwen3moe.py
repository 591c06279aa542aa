"""Generate the tiny Qwen3-MoE test fixture (needs torch + transformers; dev-only).

Outputs, next to this script:

* ``tiny-qwen3moe-f32.gguf``      - the model, every tensor F32, llama.cpp ``qwen3moe`` layout
* ``tiny-qwen3moe-tokenizer.json`` - the HF ``tokenizers`` tokenizer it embeds
* ``tiny-qwen3moe-tokens.npy``     - int32 [24] token ids of a fixed English sentence
* ``tiny-qwen3moe-logits.npy``     - float32 [24, vocab] logits of HF ``Qwen3MoeForCausalLM``

The model: 2 layers, hidden 64, 4 query / 2 KV heads of dim 16 with QK-norm,
8 experts (2 used, ``norm_topk_prob=True``) of FFN 32, RoPE theta 1e6, RMS eps
1e-6, untied output, a 384-token byte-level BPE (Qwen2 pre-tokenizer, Qwen
special tokens) trained on ``tiny-corpus.txt`` (the first two chapters of the
Python 3.11 tutorial, ``appetite.rst`` + ``interpreter.rst`` from Debian's
python3.11-doc, PSF licence).

Weights come from numpy's PCG64 with a fixed seed (not torch's RNG), scaled so
that every part of the network matters: norm weights vary around 1, the router
is large enough that the top-2 experts are clear-cut and differ between tokens.
The script is deterministic: rerunning it gives byte-identical files.

Usage: python tests/data/make_tiny_qwen3moe.py
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "scripts"))

from bpe_tokenizer import tokenizer_json, train_bpe
from qwen3moe_export import describe_gguf, write_qwen3moe_gguf

SEED = 20241203
VOCAB_SIZE = 384
TEXT = (
    "Python is an easy to learn, powerful programming language. It has efficient "
    "high-level data structures and a simple approach."
)
N_TOKENS = 24
MIN_MARGIN = 0.1

CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,  # dense FFN size: unused (all layers are MoE), written as feed_forward_length
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "attention_bias": False,
}


def make_weights(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-named float32 weights (transformers 5.x fused expert layout)."""
    h, nh, nkv, hd = (
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    ne, ff, v = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["vocab_size"]

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n):
        return (1.0 + rng.standard_normal(n) * 0.2).astype(np.float32)

    sd = {"model.embed_tokens.weight": normal((v, h), 1.0)}
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}"
        sd[f"{p}.input_layernorm.weight"] = norm_weight(h)
        sd[f"{p}.self_attn.q_proj.weight"] = normal((nh * hd, h), h**-0.5)
        sd[f"{p}.self_attn.k_proj.weight"] = normal((nkv * hd, h), h**-0.5)
        sd[f"{p}.self_attn.v_proj.weight"] = normal((nkv * hd, h), h**-0.5)
        sd[f"{p}.self_attn.o_proj.weight"] = normal((h, nh * hd), (nh * hd) ** -0.5)
        sd[f"{p}.self_attn.q_norm.weight"] = norm_weight(hd)
        sd[f"{p}.self_attn.k_norm.weight"] = norm_weight(hd)
        sd[f"{p}.post_attention_layernorm.weight"] = norm_weight(h)
        # Router: logits of std ~2 so the top-2 choice is clear-cut and varies.
        sd[f"{p}.mlp.gate.weight"] = normal((ne, h), 2.0 * h**-0.5)
        sd[f"{p}.mlp.experts.gate_up_proj"] = normal((ne, 2 * ff, h), h**-0.5)
        sd[f"{p}.mlp.experts.down_proj"] = normal((ne, h, ff), ff**-0.5)
    sd["model.norm.weight"] = norm_weight(h)
    sd["lm_head.weight"] = normal((v, h), 0.5 * h**-0.5)
    return sd


def hf_logits(cfg: dict, sd: dict[str, np.ndarray], tokens: np.ndarray):
    """Run transformers' Qwen3MoeForCausalLM in float32; also return router margins."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hf_cfg = {k: v for k, v in cfg.items() if k != "rope_theta"}
    hf_cfg["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": cfg["rope_theta"],
    }
    config = Qwen3MoeConfig(**hf_cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval().to(torch.float32)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(a) for k, a in sd.items()}, strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        out = model(torch.from_numpy(tokens.astype(np.int64))[None], output_router_logits=True)
    logits = out.logits[0].to(torch.float32).numpy()
    # Smallest gap between the 2nd and 3rd router logit over all tokens/layers:
    # if it were tiny, another engine could legitimately pick a different expert.
    margins, chosen = [], set()
    for rl in out.router_logits:
        top = torch.topk(rl.float(), 3, -1)
        margins.append(float((top.values[:, 1] - top.values[:, 2]).min()))
        chosen |= {tuple(sorted(r)) for r in top.indices[:, :2].tolist()}
    return logits, min(margins), len(chosen)


def main() -> None:
    corpus = (HERE / "tiny-corpus.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in corpus.split("\n\n") if p.strip()]
    tok = train_bpe(paragraphs, VOCAB_SIZE)
    tok_json = tokenizer_json(tok)
    (HERE / "tiny-qwen3moe-tokenizer.json").write_text(tok_json, encoding="utf-8")

    ids = tok.encode(TEXT).ids
    assert len(ids) >= N_TOKENS, len(ids)
    tokens = np.asarray(ids[:N_TOKENS], dtype=np.int32)
    np.save(HERE / "tiny-qwen3moe-tokens.npy", tokens)

    # Take the first seed from SEED on whose router choices are clear-cut on the
    # fixture tokens (2nd-3rd router logit gap >= MIN_MARGIN everywhere), so that
    # engines (and lightly quantized copies) agree on which experts run.
    for seed in range(SEED, SEED + 1000):
        sd = make_weights(CONFIG, np.random.default_rng(seed))
        logits, margin, n_pairs = hf_logits(CONFIG, sd, tokens)
        if margin >= MIN_MARGIN:
            break
    else:
        raise RuntimeError("no seed with clear-cut routing")
    np.save(HERE / "tiny-qwen3moe-logits.npy", logits.astype(np.float32))

    gguf_path = HERE / "tiny-qwen3moe-f32.gguf"
    write_qwen3moe_gguf(str(gguf_path), CONFIG, sd, tok_json, name="tiny-qwen3moe", outtype="f32")

    info = describe_gguf(str(gguf_path))
    assert all(t == "F32" for _, t in info.values())
    assert info["blk.0.ffn_gate_exps.weight"][0] == (64, 32, 8)
    assert info["blk.0.ffn_down_exps.weight"][0] == (32, 64, 8)
    print("seed:", seed)
    print("tokens:", tokens.tolist())
    print("decoded:", repr(tok.decode(tokens.tolist())))
    print(
        f"logits: shape {logits.shape}, std {logits.std():.3f}, min router 2nd-3rd logit gap {margin:.4f}, "
        f"distinct expert pairs {n_pairs}"
    )
    for p in sorted(HERE.glob("tiny-qwen3moe*")):
        print(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.stat().st_size:8d}  {p.name}")


if __name__ == "__main__":
    main()
