"""pyqmoe's engine against llama.cpp (llama-cpp-python) on the same GGUF files, same thread count,
in the same run: prompt processing (pp, one batch of P tokens) and generation (tg, N tokens one at
a time from an empty cache), tokens/second, best of R runs, and the ratio pyqmoe / llama.cpp.

It also prints the memory-bandwidth bound of generation: the weight bytes one token reads (every
tensor, but only n_expert_used / n_expert of each expert tensor and one row of token_embd) against
the copy bandwidth measured here with the same thread count (bytes read + written per second by
numpy copies of 256 MiB), and the share of that bound each engine reaches.

Usage: python benches/bench_vs_llamacpp.py -m MODEL.gguf [-m ...] [-p 512] [-n 128] [-t THREADS] [-r 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

# numpy's OpenBLAS threads would otherwise spin beside the engines on a small machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def active_weight_bytes(path: str) -> int:
    """Bytes of weights read to generate one token (MoE: only the routed experts' share)."""
    from pyqmoe import GGUFFile

    f = GGUFFile(path)
    arch = f.metadata["general.architecture"]
    n_expert = int(f.metadata.get(f"{arch}.expert_count", 0) or 0)
    n_used = int(f.metadata.get(f"{arch}.expert_used_count", 0) or 0)
    total = 0.0
    for t in f.tensors:
        if "_exps" in t.name and n_expert:
            total += t.nbytes * n_used / n_expert
        elif t.name == "token_embd.weight":
            total += t.nbytes / t.shape[0]  # one row per token
        else:
            total += t.nbytes
    return int(total)


def copy_bandwidth(threads: int, size: int = 256 << 20, repeat: int = 5) -> float:
    """Bytes moved (read + written) per second by `threads` concurrent numpy copies."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(size // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    spans = [(p[0], p[-1] + 1) for p in parts if p.size]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s[0] : s[1]], src[s[0] : s[1]]), spans))
            best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    return best


def bench_llamacpp(path: str, n_prompt: int, n_gen: int, threads: int, repeat: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=max(n_prompt, n_gen) + 16,
        n_batch=max(n_prompt, 1),
        n_ubatch=max(n_prompt, 1),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    vocab = llm.n_vocab()
    prompt = np.random.default_rng(0).integers(0, vocab, n_prompt).tolist()
    llm.eval(prompt[:8] or [0])  # warm-up
    pp, tg = [], []
    for _ in range(repeat):
        if n_prompt:
            llm.reset()
            llm._ctx.kv_cache_clear()
            t0 = time.perf_counter()
            llm.eval(prompt)
            pp.append(n_prompt / (time.perf_counter() - t0))
        if n_gen:
            llm.reset()
            llm._ctx.kv_cache_clear()
            tok = prompt[0] if prompt else 0
            t0 = time.perf_counter()
            for _ in range(n_gen):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tg.append(n_gen / (time.perf_counter() - t0))
    return {"pp_tok_s": max(pp) if pp else None, "tg_tok_s": max(tg) if tg else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", action="append", required=True)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from pyqmoe.model import bench as bench_pyqmoe

    bandwidth = copy_bandwidth(a.threads)
    if not a.json:
        print(f"copy bandwidth ({a.threads} threads): {bandwidth / 1e9:.2f} GB/s")
    rows = []
    for path in a.model:
        ours = bench_pyqmoe(path, a.n_prompt, a.n_gen, a.threads, a.repetitions)
        theirs = bench_llamacpp(path, a.n_prompt, a.n_gen, a.threads, a.repetitions)
        active = active_weight_bytes(path)
        bound = bandwidth / active
        row = {
            "model": path,
            "threads": a.threads,
            "n_prompt": a.n_prompt,
            "n_gen": a.n_gen,
            "active_weight_bytes": active,
            "copy_bandwidth_bytes_s": bandwidth,
            "tg_bound_tok_s": bound,
        }
        for k in ("pp_tok_s", "tg_tok_s"):
            row[f"pyqmoe_{k}"] = ours[k]
            row[f"llamacpp_{k}"] = theirs[k]
            row[f"ratio_{k.split('_')[0]}"] = ours[k] / theirs[k] if ours[k] and theirs[k] else None
        rows.append(row)
        if not a.json:
            print(f"{os.path.basename(path)}  threads={a.threads}")
            for k, label in (("pp", f"pp{a.n_prompt}"), ("tg", f"tg{a.n_gen}")):
                o, t, r = row[f"pyqmoe_{k}_tok_s"], row[f"llamacpp_{k}_tok_s"], row[f"ratio_{k}"]
                if o is not None:
                    print(f"  {label:>7}: pyqmoe {o:10.1f} tok/s   llama.cpp {t:10.1f} tok/s   ratio {r:6.3f}")
            if row["pyqmoe_tg_tok_s"]:
                print(
                    f"  bandwidth bound: {active / 2**20:.1f} MiB of weights per token -> {bound:.0f} tok/s; "
                    f"pyqmoe reaches {row['pyqmoe_tg_tok_s'] / bound:.0%}, "
                    f"llama.cpp {row['llamacpp_tg_tok_s'] / bound:.0%}"
                )
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
