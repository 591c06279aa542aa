"""A plain-PyTorch Qwen3-MoE used for training (needs torch only).

It computes exactly what transformers' ``Qwen3MoeForCausalLM`` computes
(``compare_with_hf`` checks it) and its ``state_dict`` uses transformers 5.x
names and layouts, so the trained weights load into ``Qwen3MoeForCausalLM``
with ``load_state_dict(strict=True)``.  It exists so that the GPU run depends
on torch alone (not on the transformers version there) and so that the expert
dispatch is a sort + per-expert matmul instead of transformers' one-hot loop.

Per layer: x += o_proj(attn(q_norm(q), k_norm(k), v) with NEOX RoPE) after an
RMSNorm; then x += sum_{top-k e} w_e * down_e(silu(gate_e(h)) * up_e(h)), h =
RMSNorm(x), w = softmax(router(h)) restricted to the top k and renormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(n: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, self.nh, self.nkv, self.hd = (
            c["hidden_size"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["head_dim"],
        )
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.q_norm = RMSNorm(self.hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(self.hd, c["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q, k = q.to(v.dtype), k.to(v.dtype)  # the norms return float32 under autocast
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class Router(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c["num_experts"], c["hidden_size"]))


class Experts(nn.Module):
    """Expert weights in transformers 5.x's fused layout."""

    def __init__(self, c: dict):
        super().__init__()
        e, h, f = c["num_experts"], c["hidden_size"], c["moe_intermediate_size"]
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, f))


class SparseMoe(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.top_k = c["num_experts_per_tok"]
        self.n_expert = c["num_experts"]
        self.norm_topk = c["norm_topk_prob"]
        self.gate = Router(c)
        self.experts = Experts(c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = F.linear(x, self.gate.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(x.dtype)
        # Switch-style load-balancing loss: E * sum_e (fraction routed to e) * (mean prob of e).
        frac = torch.bincount(top_i.reshape(-1), minlength=self.n_expert).float() / top_i.numel()
        aux = self.n_expert * (frac * probs.mean(0)).sum()
        # Dispatch: sort (token, slot) pairs by expert, one matmul chain per expert.
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        tok = order // self.top_k
        counts = torch.bincount(flat_e, minlength=self.n_expert).tolist()
        xs = x[tok]
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = xs[start : start + n]
            gate, up = F.linear(seg, self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.experts.down_proj[e]))
            start += n
        ys = torch.cat(outs) * top_w.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, tok, ys.to(x.dtype))
        return out.reshape(shape), aux


class DecoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = SparseMoe(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, aux = self.mlp(self.post_attention_layernorm(x))
        return x + y, aux


class Backbone(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class Qwen3Moe(nn.Module):
    """Qwen3-MoE causal LM; ``state_dict()`` keys match ``Qwen3MoeForCausalLM``."""

    def __init__(self, c: dict):
        super().__init__()
        self.config = dict(c)
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """transformers' init: N(0, initializer_range) for matrices, ones for norms."""
        std = self.config["initializer_range"]
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, mean load-balancing loss over layers)."""
        c = self.config
        cos, sin = rope_cos_sin(ids.shape[1], c["head_dim"], c["rope_theta"], ids.device)
        x = self.model.embed_tokens(ids)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.model.layers:
            x, a = layer(x, cos, sin)
            aux = aux + a
        x = self.model.norm(x)
        return self.lm_head(x), aux / len(self.model.layers)


def hf_config(c: dict):
    """A transformers ``Qwen3MoeConfig`` for the same model."""
    from transformers import Qwen3MoeConfig

    d = {k: v for k, v in c.items() if k not in ("rope_theta", "architectures", "model_type")}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    return Qwen3MoeConfig(**d)


def compare_with_hf(c: dict, seed: int = 0) -> float:
    """Max abs logit difference between this model and transformers' (float32, CPU)."""
    from transformers import Qwen3MoeForCausalLM

    g = torch.Generator().manual_seed(seed)
    ours = Qwen3Moe(c)
    ours.init_weights(g)
    with torch.no_grad():  # make norms and the router non-trivial for the check
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.2, generator=g)
    hf = Qwen3MoeForCausalLM(hf_config(c)).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, c["vocab_size"], (2, 64), generator=g)
    with torch.no_grad():
        a = ours(ids)[0]
        b = hf(ids).logits
    return float((a - b).abs().max())
