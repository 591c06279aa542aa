"""Paths and fixed settings shared by the reference-model build scripts."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

# The shared tokenizer module in scripts/, re-exported so that the build scripts
# import it from here (this module puts scripts/ on the import path first).  It
# needs nothing beyond the standard library at import time.
import bpe_tokenizer  # noqa: E402

__all__ = ["bpe_tokenizer", "exporter"]


def exporter():
    """The shared GGUF exporter module, imported on demand: it needs ``gguf``,
    which the GPU machine that runs train.py does not have."""
    import qwen3moe_export

    return qwen3moe_export


# Everything large and rebuildable lives in the git-ignored work folder.
WORK = REPO / ".work" / "reference_model"
DATA = REPO / "data"
MODELS = REPO / "pyqmoe" / "models"

TRAIN_TXT = WORK / "train.txt"
VALID_TXT = WORK / "valid.txt"
HELDOUT_TXT = WORK / "heldout.txt"  # plain copy of data/heldout.txt.xz
HELDOUT_XZ = DATA / "heldout.txt.xz"
CALIBRATION_TXT = DATA / "calibration.txt"
TOKENIZER_JSON = WORK / "tokenizer.json"
TRAIN_TOKENS = WORK / "tokens" / "train.npy"  # uint16
VALID_TOKENS = WORK / "tokens" / "valid.npy"
HELDOUT_TOKENS = WORK / "heldout_tokens.npy"
CHECKPOINT = WORK / "checkpoint"  # safetensors shards written by train.py
GGUF_BF16 = MODELS / "qwen3moe-ref-bf16.gguf"
GGUF_F32 = WORK / "qwen3moe-ref-f32.gguf"  # optional, kept out of the repo

# Documents are joined with Qwen's end-of-text token.
DOC_SEPARATOR = "<|endoftext|>"
VOCAB_SIZE = 8192

# A scaled-down Qwen3-30B-A3B: QK-norm, RoPE theta 1e6, GQA 8:2 with head_dim 64,
# every layer MoE with renormalised top-k routing, untied output.  Hidden 512 and
# expert FFN 256 keep every row a multiple of 256 (k-quant super-blocks).
# 31.2M parameters -> 62.4 MB (59.6 MiB) as BF16.
MODEL_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 512,
    "intermediate_size": 1536,  # dense FFN size: unused (all layers are MoE); GGUF feed_forward_length
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.01,
    "bos_token_id": None,
    "eos_token_id": None,
}
MODEL_NAME = "qwen3moe-ref"
