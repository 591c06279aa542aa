"""Write a HF ``Qwen3MoeForCausalLM`` (config + state dict) as a llama.cpp GGUF.

The file matches what llama.cpp's ``convert_hf_to_gguf.py`` writes for
``Qwen3MoeForCausalLM`` (class ``Qwen3MoeModel(Qwen2MoeModel)``):

* architecture ``qwen3moe``; tensor names from gguf-py's ``TENSOR_NAMES``
  (``token_embd``, ``blk.N.attn_q`` ... ``blk.N.ffn_down_exps``, ``output_norm``,
  ``output``);
* Q/K weights are written as they are: the Qwen2/Qwen3 converters, unlike the
  Llama one, do not permute them (llama.cpp uses NEOX-style RoPE for qwen3moe,
  which is what HF's ``rotate_half`` computes);
* per-expert weights are stacked into 3D tensors, PyTorch shape
  ``[n_expert, n_ff_exp, n_embd]`` for gate/up and ``[n_expert, n_embd,
  n_ff_exp]`` for down (GGUF reverses the order of the dimensions);
* tensor types as the converter's ``--outtype f32|bf16``: 1D tensors, every
  ``*_norm.weight`` and the router ``ffn_gate_inp`` always F32, other matrices
  in the chosen type;
* the hyper-parameter keys of ``TextModel.set_gguf_parameters`` plus
  ``expert_feed_forward_length`` from ``Qwen2MoeModel``.

The state dict may use transformers 5.x's fused expert layout
(``mlp.experts.gate_up_proj`` ``[E, 2F, H]``, gate rows first, and
``mlp.experts.down_proj`` ``[E, H, F]``) or the per-expert layout of the
original checkpoints (``mlp.experts.{e}.gate_proj.weight`` ...).  Arrays are
numpy (any float dtype); torch is not needed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
from bpe_tokenizer import add_tokenizer_to_gguf, gguf_tokenizer_fields

ARCH = "qwen3moe"


def _tensor_name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[kind]
    if bid is not None:
        name = name.format(bid=bid)
    assert kind in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE], kind
    return name + ".weight"


def _experts(sd: Mapping[str, np.ndarray], bid: int, n_expert: int, n_ff: int):
    """Return stacked (gate, up, down) expert weights for layer ``bid``."""
    p = f"model.layers.{bid}.mlp.experts"
    if f"{p}.gate_up_proj" in sd:
        gate_up = np.asarray(sd[f"{p}.gate_up_proj"])
        down = np.asarray(sd[f"{p}.down_proj"])
        if gate_up.shape[1] != 2 * n_ff:
            raise ValueError(f"unexpected gate_up_proj shape {gate_up.shape}")
        return gate_up[:, :n_ff, :], gate_up[:, n_ff:, :], down
    stack = [
        np.stack([np.asarray(sd[f"{p}.{e}.{w}.weight"]) for e in range(n_expert)])
        for w in ("gate_proj", "up_proj", "down_proj")
    ]
    return stack[0], stack[1], stack[2]


def gguf_tensors(config: Mapping[str, Any], sd: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Map a HF Qwen3-MoE state dict to (GGUF name, array) pairs in llama.cpp's order."""
    T = gguf.MODEL_TENSOR
    n_layer = config["num_hidden_layers"]
    n_expert = config["num_experts"]
    n_ff = config["moe_intermediate_size"]
    if config.get("tie_word_embeddings", False):
        raise ValueError("tied embeddings are not supported here (the reference models are untied)")
    if any(k.startswith("model.layers.") and "shared_expert" in k for k in sd):
        raise ValueError("shared experts are not part of Qwen3-MoE")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError("every layer must be a MoE layer")
    out: list[tuple[str, np.ndarray]] = [(_tensor_name(T.TOKEN_EMBD), sd["model.embed_tokens.weight"])]
    for b in range(n_layer):
        p = f"model.layers.{b}"
        gate, up, down = _experts(sd, b, n_expert, n_ff)
        out += [
            (_tensor_name(T.ATTN_NORM, b), sd[f"{p}.input_layernorm.weight"]),
            (_tensor_name(T.ATTN_Q, b), sd[f"{p}.self_attn.q_proj.weight"]),
            (_tensor_name(T.ATTN_K, b), sd[f"{p}.self_attn.k_proj.weight"]),
            (_tensor_name(T.ATTN_V, b), sd[f"{p}.self_attn.v_proj.weight"]),
            (_tensor_name(T.ATTN_OUT, b), sd[f"{p}.self_attn.o_proj.weight"]),
            (_tensor_name(T.ATTN_Q_NORM, b), sd[f"{p}.self_attn.q_norm.weight"]),
            (_tensor_name(T.ATTN_K_NORM, b), sd[f"{p}.self_attn.k_norm.weight"]),
            (_tensor_name(T.FFN_NORM, b), sd[f"{p}.post_attention_layernorm.weight"]),
            (_tensor_name(T.FFN_GATE_INP, b), sd[f"{p}.mlp.gate.weight"]),
            (_tensor_name(T.FFN_GATE_EXP, b), gate),
            (_tensor_name(T.FFN_UP_EXP, b), up),
            (_tensor_name(T.FFN_DOWN_EXP, b), down),
        ]
    out += [
        (_tensor_name(T.OUTPUT_NORM), sd["model.norm.weight"]),
        (_tensor_name(T.OUTPUT), sd["lm_head.weight"]),
    ]
    return out


def _keep_f32(name: str, arr: np.ndarray) -> bool:
    """The converter's rule: 1D tensors, norms and the MoE router stay F32."""
    return arr.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name


def write_qwen3moe_gguf(
    path: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    tokenizer_json: str,
    *,
    name: str,
    outtype: str = "f32",
    eos_token: str = "<|endoftext|>",
) -> None:
    """Write ``state_dict`` (HF names) and the tokenizer as a qwen3moe GGUF.

    ``config`` holds the HF ``Qwen3MoeConfig`` fields (``config.to_dict()``).
    ``outtype`` is ``"f32"`` (every tensor F32) or ``"bf16"`` (matrices BF16,
    norms/router F32), as ``convert_hf_to_gguf.py --outtype``.
    """
    if outtype not in ("f32", "bf16"):
        raise ValueError(outtype)
    c = config
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    rope_theta = c.get("rope_theta")
    if rope_theta is None:  # transformers 5.x keeps it in rope_parameters
        rope_theta = c["rope_parameters"]["rope_theta"]
    rope_scaling = c.get("rope_scaling") or {}
    if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) not in (
        "default",
        None,
    ):
        raise ValueError("RoPE scaling is not supported by this exporter")

    w = gguf.GGUFWriter(path, ARCH)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_expert_count(c["num_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    ftype = gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_BF16
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer_to_gguf(w, gguf_tokenizer_fields(tokenizer_json, c["vocab_size"], eos_token=eos_token))

    for tname, arr in gguf_tensors(c, state_dict):
        data = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
        if outtype == "f32" or _keep_f32(tname, data):
            w.add_tensor(tname, data)
        else:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(tname, q, raw_dtype=gguf.GGMLQuantizationType.BF16)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def describe_gguf(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Read a GGUF back: {tensor name: (GGUF shape ne0.., type name)}."""
    r = gguf.GGUFReader(path)
    return {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in r.tensors}
