"""Store llama.cpp's logits for the tiny fixture quantized by ``pyqmoe quantize``.

Outputs (next to this script), each with
* ``logits``  float32 [24, vocab]: llama.cpp's logits for ``tiny-qwen3moe-tokens.npy``,
* ``tokens``  int32 [24],
* ``sha256``  of the quantized file it ran on (the test re-quantizes and notes a mismatch):

``tiny-qwen3moe-q8_0-llamacpp-logits.npz`` (Q8_0) and ``tiny-qwen3moe-legacy-llamacpp-logits.npz``
(keys prefixed ``q4_0/``, ``q4_1/``, ``q5_0/``, ``q5_1/``, ``iq4_nl/``).

llama.cpp runs with an F32 KV cache (its F16 default would add ~1e-3 of rounding) and one
thread; its matmuls quantize activations to Q8_0 (Q8_1 for Q4_1/Q5_1), which pyqmoe's engine
does too.
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
OUT_LEGACY = HERE / "tiny-qwen3moe-legacy-llamacpp-logits.npz"
LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")


def llamacpp_logits(qtype: str, tokens: np.ndarray) -> tuple[np.ndarray, str]:
    """Quantize the fixture to ``qtype`` with pyqmoe; llama.cpp's logits and the file's sha256."""
    import llama_cpp

    from pyqmoe import _core

    with tempfile.TemporaryDirectory() as d:
        q = Path(d) / f"tiny-{qtype.lower()}.gguf"
        _core.quantize_model(str(HERE / "tiny-qwen3moe-f32.gguf"), str(q), qtype, pure=True)
        digest = hashlib.sha256(q.read_bytes()).hexdigest()
        llm = llama_cpp.Llama(
            model_path=str(q),
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
    return logits, digest


def main() -> int:
    tokens = np.load(HERE / "tiny-qwen3moe-tokens.npy").astype(np.int32)
    logits, digest = llamacpp_logits("Q8_0", tokens)
    np.savez_compressed(OUT, logits=logits, tokens=tokens, sha256=np.array(digest))
    print(f"wrote {OUT.name}: logits {logits.shape}, q8_0 sha256 {digest[:16]}...")
    legacy = {"tokens": tokens}
    for t in LEGACY_TYPES:
        logits, digest = llamacpp_logits(t, tokens)
        legacy[f"{t.lower()}/logits"] = logits
        legacy[f"{t.lower()}/sha256"] = np.array(digest)
    np.savez_compressed(OUT_LEGACY, **legacy)
    print(f"wrote {OUT_LEGACY.name}: {', '.join(LEGACY_TYPES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
