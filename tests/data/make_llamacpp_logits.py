"""Store llama.cpp's logits for the tiny fixture quantized to Q8_0 by ``pyqmoe quantize``.

Output (next to this script): ``tiny-qwen3moe-q8_0-llamacpp-logits.npz`` with
* ``logits``  float32 [24, vocab]: llama.cpp's logits for ``tiny-qwen3moe-tokens.npy``,
* ``tokens``  int32 [24],
* ``sha256``  of the Q8_0 file it ran on (the test re-quantizes and notes a mismatch).

llama.cpp runs with an F32 KV cache (its F16 default would add ~1e-3 of rounding) and one
thread; its Q8_0 matmuls quantize activations to Q8_0, which pyqmoe's engine does too.
Dev-only (needs llama-cpp-python). Usage: python tests/data/make_llamacpp_logits.py
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny-qwen3moe-q8_0-llamacpp-logits.npz"


def main() -> int:
    import llama_cpp

    from pyqmoe import _core

    tokens = np.load(HERE / "tiny-qwen3moe-tokens.npy").astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        q8 = Path(d) / "tiny-q8_0.gguf"
        _core.quantize_model(str(HERE / "tiny-qwen3moe-f32.gguf"), str(q8), "Q8_0")
        digest = hashlib.sha256(q8.read_bytes()).hexdigest()
        llm = llama_cpp.Llama(
            model_path=str(q8),
            n_ctx=64,
            n_batch=64,
            n_threads=1,
            logits_all=True,
            type_k=0,  # GGML_TYPE_F32
            type_v=0,
            verbose=False,
        )
        llm.eval(tokens.tolist())
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
        del llm
    np.savez_compressed(OUT, logits=logits, tokens=tokens, sha256=np.array(digest))
    print(f"wrote {OUT.name}: logits {logits.shape}, q8_0 sha256 {digest[:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
