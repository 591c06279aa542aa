"""Dev-only check: llama.cpp (via llama-cpp-python) loads the tiny fixture and agrees.

Checks that llama.cpp
* loads ``tiny-qwen3moe-f32.gguf`` as a qwen3moe model,
* tokenizes the fixture sentence like the HF tokenizer (``tokenizer.ggml.pre=qwen2``),
* computes the same logits as transformers for ``tiny-qwen3moe-tokens.npy``
  (prints the max abs difference against ``tiny-qwen3moe-logits.npy``).

Not part of the test suite (needs llama-cpp-python).
Usage: python tests/data/check_tiny_with_llamacpp.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOL = 1e-4


def main() -> int:
    import llama_cpp
    from tokenizers import Tokenizer

    tokens = np.load(HERE / "tiny-qwen3moe-tokens.npy")
    ref = np.load(HERE / "tiny-qwen3moe-logits.npy")
    llm = llama_cpp.Llama(
        model_path=str(HERE / "tiny-qwen3moe-f32.gguf"),
        n_ctx=64,
        n_batch=64,
        n_threads=1,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32: keep the KV cache in F32 (the default F16 costs ~1e-3)
        type_v=0,
        verbose=False,
    )
    meta = llm.metadata
    assert meta["general.architecture"] == "qwen3moe", meta

    # Tokenizer agreement on a sentence with spaces, punctuation, digits and a newline.
    hf_tok = Tokenizer.from_str((HERE / "tiny-qwen3moe-tokenizer.json").read_text(encoding="utf-8"))
    text = "Python is an easy to learn, powerful programming language.\nIt's 2024: 3 + 4 = 7!"
    hf_ids = hf_tok.encode(text).ids
    ll_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    print("tokenizer agrees:", hf_ids == ll_ids)
    assert hf_ids == ll_ids, (hf_ids, ll_ids)
    special = llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)
    assert special[0] == hf_tok.token_to_id("<|im_start|>"), special

    llm.reset()
    llm.eval(tokens.tolist())
    got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    diff = float(np.abs(got - ref).max())
    print(
        json.dumps(
            {
                "n_tokens": len(tokens),
                "vocab": ref.shape[1],
                "max_abs_diff": diff,
                "ref_abs_max": float(np.abs(ref).max()),
                "argmax_agree": bool((got.argmax(1) == ref.argmax(1)).all()),
            }
        )
    )
    return 0 if diff < TOL else 1


if __name__ == "__main__":
    sys.exit(main())
