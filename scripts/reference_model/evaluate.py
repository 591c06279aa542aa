"""Step 5: held-out perplexity of the reference model, three ways.

The held-out text ``data/heldout.txt.xz`` is tokenized with the model's
tokenizer (documents separated by ``<|endoftext|>``), cut into non-overlapping
512-token windows, and the first ``--windows`` windows are scored: in each
window every token after the first is predicted from the ones before it
(511 predictions per window, no BOS, the cache cleared between windows).

* unigram: the same predictions scored by token frequencies; (a) estimated on
  the training stream with add-one smoothing, (b) the held-out text's own
  frequencies (an oracle lower bound for any unigram model);
* transformers: ``Qwen3MoeForCausalLM`` in float32 on the CPU with the
  trained (BF16-valued) weights;
* llama.cpp: llama-cpp-python on ``pyqmoe/models/qwen3moe-ref-bf16.gguf``
  (CPU, F32 KV cache).

Prints and writes ``.work/reference_model/eval.json``.
Usage: python scripts/reference_model/evaluate.py [--windows 200] [--skip-hf] [--skip-llama]
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import time
from pathlib import Path

import numpy as np
from common import CHECKPOINT, GGUF_BF16, HELDOUT_XZ, TOKENIZER_JSON, TRAIN_TOKENS, WORK

CTX = 512


def heldout_tokens(tokenizer_json: str) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    text = lzma.decompress(HELDOUT_XZ.read_bytes()).decode("utf-8")
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def nll_windows_hf(windows: np.ndarray, checkpoint: Path, batch: int = 4) -> np.ndarray:
    """Per-window negative log-likelihood with transformers (float32; CUDA if present)."""
    import torch
    from checkpoint import load_checkpoint
    from model import hf_config
    from transformers import Qwen3MoeForCausalLM

    cfg, sd = load_checkpoint(checkpoint)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 matmuls on the GPU too
    model = Qwen3MoeForCausalLM(hf_config(cfg)).eval().to(torch.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    model.to(dev)
    out = []
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            x = torch.from_numpy(windows[s : s + batch]).to(dev)
            logits = model(x).logits.float()
            lp = torch.log_softmax(logits[:, :-1].double(), -1)
            out += (-lp.gather(-1, x[:, 1:, None])[..., 0].sum(-1)).tolist()
    return np.asarray(out)


def nll_windows_llama(windows: np.ndarray, gguf_path: Path, threads: int) -> np.ndarray:
    """Per-window negative log-likelihood with llama.cpp (llama-cpp-python)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=CTX,
        n_batch=CTX,
        n_ubatch=CTX,
        n_threads=threads,
        logits_all=True,
        type_k=0,  # F32 KV cache
        type_v=0,
        verbose=False,
    )
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        lp = log_softmax(np.asarray(llm.scores[: len(w) - 1]))
        out.append(-float(lp[np.arange(len(w) - 1), w[1:]].sum()))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=200, help="number of 512-token windows (0 = all)")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--gguf", type=Path, default=GGUF_BF16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--out", type=Path, default=WORK / "eval.json")
    args = ap.parse_args()

    tok_json = TOKENIZER_JSON.read_text(encoding="utf-8")
    vocab = json.loads(tok_json)
    n_vocab = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    ids = heldout_tokens(tok_json)
    n_all = len(ids) // CTX
    n_win = n_all if args.windows <= 0 else min(args.windows, n_all)
    windows = ids[: n_win * CTX].reshape(n_win, CTX)
    targets = windows[:, 1:].reshape(-1)
    n_pred = targets.size
    res: dict = {
        "heldout_tokens": int(len(ids)),
        "windows": n_win,
        "windows_available": n_all,
        "context": CTX,
        "predicted_tokens": int(n_pred),
    }

    # Unigram baselines over the same predicted tokens.
    train = np.load(TRAIN_TOKENS)
    counts = np.bincount(train, minlength=n_vocab).astype(np.float64) + 1.0
    res["unigram_ppl_train_add1"] = math.exp(-np.log(counts / counts.sum())[targets].mean())
    own = np.bincount(targets, minlength=n_vocab).astype(np.float64)
    with np.errstate(divide="ignore"):
        res["unigram_ppl_heldout_oracle"] = math.exp(-np.log(own / own.sum())[targets].mean())

    def record(label: str, nll: np.ndarray) -> None:
        res[f"{label}_ppl"] = math.exp(nll.sum() / n_pred)
        for k in (100, 200):  # also over the first k windows, for comparison with shorter runs
            if k < len(nll):
                res[f"{label}_ppl_first_{k}_windows"] = math.exp(nll[:k].sum() / (k * (CTX - 1)))

    if not args.skip_hf:
        t = time.time()
        record("transformers", nll_windows_hf(windows, args.checkpoint))
        res["transformers_seconds"] = round(time.time() - t, 1)
    if not args.skip_llama:
        t = time.time()
        record("llamacpp", nll_windows_llama(windows, args.gguf, args.threads))
        res["llamacpp_seconds"] = round(time.time() - t, 1)
    if "transformers_ppl" in res and "llamacpp_ppl" in res:
        res["relative_difference"] = abs(res["llamacpp_ppl"] / res["transformers_ppl"] - 1)
    print(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
