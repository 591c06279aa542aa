"""Store transformers' and llama.cpp's outputs on the bundled reference model, for tests/test_engine_reference.py.

    python tests/data/make_reference_model_vectors.py        # dev-only: torch, transformers, llama-cpp-python

Writes ``tests/data/reference-model-vectors.npz``:

* ``hf/tokens`` int32 [32], ``hf/logits`` f32 [32, vocab]: transformers' ``Qwen3MoeForCausalLM`` in
  float32 on the trained checkpoint (the BF16 values in the GGUF), for the first 32 held-out tokens.
* ``heldout/tokens`` int32 [W, 512]: W windows of 512 held-out tokens, evenly spaced over the text.
* for each quantized file ``Q8_0``, ``Q4_K_M``, ``IQ4_XS``, ``IQ2_XS`` (IQ2_XS with
  ``tests/data/reference-imatrix.dat``), made by ``pyqmoe quantize`` from the bundled BF16 model:
  ``<q>/top1`` int32 [W, 512] llama.cpp's arg-max next token at every position (each window from an
  empty cache), ``<q>/margin`` f32 [W, 512] its gap between the best and second-best logit, and
  ``<q>/sha256`` of the tensor data of the file llama.cpp ran on (not of the whole file: the
  metadata records the imatrix file's path), and ``<q>/nll`` f64 [W]: llama.cpp's summed negative
  log-likelihood of the last 255 tokens of each window given the rest (llama-perplexity's scoring).
* ``greedy/prompts`` int32 [P, 16] and ``greedy/Q8_0`` int32 [P, 64]: llama.cpp's greedy
  continuation (arg-max each step) of each prompt on the Q8_0 file.

llama.cpp runs with an F32 KV cache and 2 threads. ``reference-imatrix.dat`` was made by
``pyqmoe imatrix -m pyqmoe/models/qwen3moe-ref-bf16.gguf -f data/calibration.txt --chunks 20``.
"""

from __future__ import annotations

import hashlib
import lzma
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "scripts" / "reference_model"))

OUT = HERE / "reference-model-vectors.npz"
IMATRIX = HERE / "reference-imatrix.dat"
MODEL = REPO / "pyqmoe" / "models" / "qwen3moe-ref-bf16.gguf"
PRESETS = {"Q8_0": None, "Q4_K_M": None, "IQ4_XS": None, "IQ2_XS": IMATRIX}
CTX = 512
N_WINDOWS = 8
N_PROMPTS = 4
PROMPT_LEN = 16
N_GREEDY = 64
N_HF = 32


def heldout_ids() -> np.ndarray:
    import pyqmoe

    text = lzma.decompress((REPO / "data" / "heldout.txt.xz").read_bytes()).decode("utf-8")
    ids = pyqmoe.Model(MODEL, n_ctx=16).tokenize(text, add_bos=False)
    return np.asarray(ids, dtype=np.int32)


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's bytes, in file order."""
    import pyqmoe

    f = pyqmoe.GGUFFile(path)
    h = hashlib.sha256()
    for t in f.tensors:
        h.update(bytes(f.tensor_bytes(t.name)))
    return h.hexdigest()


def hf_logits(tokens: np.ndarray) -> np.ndarray:
    import torch
    from checkpoint import load_checkpoint
    from common import CHECKPOINT
    from model import hf_config
    from transformers import Qwen3MoeForCausalLM

    cfg, sd = load_checkpoint(CHECKPOINT)
    model = Qwen3MoeForCausalLM(hf_config(cfg)).eval().to(torch.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(tokens[None].astype(np.int64))).logits[0].float().numpy()


def llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=CTX,
        n_batch=CTX,
        n_ubatch=CTX,
        n_threads=2,
        logits_all=True,
        type_k=0,  # F32 KV cache
        type_v=0,
        verbose=False,
    )


def top1(llm, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    best = np.zeros(windows.shape, np.int32)
    margin = np.zeros(windows.shape, np.float32)
    nll = np.zeros(len(windows), np.float64)
    first = CTX // 2
    for i, w in enumerate(windows):
        llm.reset()
        llm.eval(w.tolist())
        s = np.asarray(llm.scores[: len(w)], dtype=np.float32)
        two = np.partition(s, -2, axis=1)[:, -2:]
        best[i] = s.argmax(1)
        margin[i] = two[:, 1] - two[:, 0]
        rows = s[first:-1].astype(np.float64)
        mx = rows.max(1, keepdims=True)
        logz = mx[:, 0] + np.log(np.exp(rows - mx).sum(1))
        nll[i] = float((logz - rows[np.arange(len(rows)), w[first + 1 :]]).sum())
    return best, margin, nll


def greedy(llm, prompts: np.ndarray) -> np.ndarray:
    out = np.zeros((len(prompts), N_GREEDY), np.int32)
    for i, p in enumerate(prompts):
        llm.reset()
        llm.eval(p.tolist())
        for j in range(N_GREEDY):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out[i, j] = t
            llm.eval([t])
    return out


def main() -> int:
    from pyqmoe import _core

    ids = heldout_ids()
    n_all = len(ids) // CTX
    starts = np.linspace(0, n_all - 1, N_WINDOWS).astype(int) * CTX
    windows = np.stack([ids[s : s + CTX] for s in starts])
    prompts = np.stack([ids[s + 100 : s + 100 + PROMPT_LEN] for s in starts[:N_PROMPTS]])
    out: dict[str, np.ndarray] = {
        "heldout/tokens": windows,
        "greedy/prompts": prompts,
        "hf/tokens": ids[:N_HF],
        "hf/logits": hf_logits(ids[:N_HF]),
    }
    print(f"transformers logits {out['hf/logits'].shape}")
    with tempfile.TemporaryDirectory() as d:
        for preset, imatrix in PRESETS.items():
            q = Path(d) / f"ref-{preset.lower()}.gguf"
            _core.quantize_model(str(MODEL), str(q), preset, imatrix=str(imatrix) if imatrix else None)
            out[f"{preset}/sha256"] = np.array(tensor_digest(q))
            llm = llama(q)
            out[f"{preset}/top1"], out[f"{preset}/margin"], out[f"{preset}/nll"] = top1(llm, windows)
            if preset == "Q8_0":
                out["greedy/Q8_0"] = greedy(llm, prompts)
            del llm
            print(f"{preset}: top-1 of {windows.size} positions stored")
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
