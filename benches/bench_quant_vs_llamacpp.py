"""pyqmoe vs llama.cpp on the same inputs: importance-weighted error and quantization speed.

    python benches/bench_quant_vs_llamacpp.py [--types Q4_0 Q4_K ...] [--rows 768] [--out docs/FILE.md]

Inputs: synthetic heavy-tailed rows shaped like one Qwen3-30B-A3B expert of ``ffn_gate_exps``
(GGUF dims [n_embd=2048, n_ff=768, n_expert]: rows of 2048, 768 rows per expert), with a
log-normal importance matrix; plus expert 0 of the first ``ffn_gate_exps`` tensor of the
reference model when a GGUF is found in pyqmoe/models (or given with --model).

Per type and imatrix mode it prints: importance-weighted RMSE of each side and their ratio
(pyqmoe / llama.cpp, < 1 is better), whether the bytes are identical, and throughput on one thread
and on all cores (ratio pyqmoe / llama.cpp, > 1 is faster). pyqmoe's one-thread numbers come from a
subprocess with RAYON_NUM_THREADS=1; llama.cpp is driven through ctypes (benches/llamacpp_ref.py) in
the same subprocess, split over Python threads for the all-core run; the two alternate run by run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import llamacpp_ref  # noqa: E402  (found through the sys.path entry above)

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def synthetic_expert(n_rows: int, n_per_row: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Student-t(4) weights with per-row scales and a few channels of larger magnitude.
    x = rng.standard_t(4, (n_rows, n_per_row)) * 0.015
    x *= np.exp(0.3 * rng.standard_normal((n_rows, 1)))
    x[:, rng.choice(n_per_row, 8, replace=False)] *= 6.0
    imatrix = np.exp(1.5 * rng.standard_normal(n_per_row))
    return x.astype(np.float32), imatrix.astype(np.float32)


def model_expert(path: Path, n_rows: int) -> tuple[str, np.ndarray, np.ndarray] | None:
    import pyqmoe

    g = pyqmoe.GGUFFile(path)
    names = [t.name for t in g.tensors if "ffn_gate_exps" in t.name]
    if not names:
        return None
    x = g.dequantize(names[0])[0][:n_rows]  # numpy shape [n_expert, n_ff, n_embd]: expert 0
    imatrix = np.exp(1.5 * np.random.default_rng(1).standard_normal(x.shape[1])).astype(np.float32)
    return f"{path.name}:{names[0]}[0]", np.ascontiguousarray(x, dtype=np.float32), imatrix


def weighted_rmse(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    err = (x.astype(np.float64) - y) ** 2
    return float(np.sqrt((err * w).sum() / (w.sum() * x.shape[0])))


def modes(t: str) -> list[bool]:
    """imatrix off/on as each side allows it (float types ignore it; some types need it)."""
    if t in ("F32", "F16", "BF16"):
        return [False]
    if llamacpp_ref.requires_imatrix(t):
        return [True]
    return [False, True]


def paired_times(x_path: Path, w_path: Path, types: list[str], repeats: int, threads: int | None) -> dict:
    """Best quantize times {"TYPE:imatrix": [pyqmoe, llama.cpp]} measured in a fresh interpreter,
    pyqmoe limited by RAYON_NUM_THREADS and llama.cpp split over as many Python threads; the two
    alternate round by round, so a change of machine load hits both alike."""
    env = dict(os.environ)
    if threads is None:
        env.pop("RAYON_NUM_THREADS", None)
    else:
        env["RAYON_NUM_THREADS"] = str(threads)
    n = threads or os.cpu_count() or 1
    args = [sys.executable, __file__, "--worker", str(x_path), str(w_path), str(repeats), str(n), *types]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def worker(x_path: str, w_path: str, repeats: str, nthreads: str, types: list[str]) -> None:
    import pyqmoe

    x, w = np.load(x_path), np.load(w_path)
    # Let thread pools, page mappings and clock speed settle before anything is timed.
    warm_w = w if llamacpp_ref.requires_imatrix(types[0]) else None  # IQ2_XXS etc. need one
    for _ in range(5):
        pyqmoe.quantize(x, types[0], warm_w)
        llamacpp_ref.quantize(types[0], x, imatrix=warm_w, nthreads=int(nthreads))
    res = {}
    for t in types:
        for use_w in modes(t):
            imat = w if use_w else None
            ours = lambda t=t, imat=imat: pyqmoe.quantize(x, t, imat)  # noqa: E731
            ref = lambda t=t, imat=imat: llamacpp_ref.quantize(t, x, imatrix=imat, nthreads=int(nthreads))  # noqa: E731
            ours(), ref()  # warm-up
            best = [float("inf"), float("inf")]
            for _ in range(int(repeats)):
                for k, fn in enumerate((ours, ref)):
                    t0 = time.perf_counter()
                    fn()
                    best[k] = min(best[k], time.perf_counter() - t0)
            res[f"{t}:{int(use_w)}"] = best
    print(json.dumps(res))


def bench(label: str, x: np.ndarray, w: np.ndarray, types: list[str], repeats: int) -> list[dict]:
    import pyqmoe

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x_path, w_path = Path(tmp) / "x.npy", Path(tmp) / "w.npy"
        np.save(x_path, x)
        np.save(w_path, w)
        one = paired_times(x_path, w_path, types, repeats, 1)
        many = paired_times(x_path, w_path, types, repeats, None)
    for t in types:
        for use_w in modes(t):
            imat = w if use_w else None
            q_ours = pyqmoe.quantize(x, t, imat)
            q_ref = llamacpp_ref.quantize(t, x, imatrix=imat)
            y_ours = pyqmoe.dequantize(q_ours, t, x.shape)
            y_ref = llamacpp_ref.dequantize(t, q_ref, x.shape[1])
            key = f"{t}:{int(use_w)}"
            rows.append(
                {
                    "input": label,
                    "type": t,
                    "imatrix": use_w,
                    "rmse_pyqmoe": weighted_rmse(x, y_ours, w),
                    "rmse_llamacpp": weighted_rmse(x, y_ref, w),
                    "bytes_equal": bool(np.array_equal(q_ours, q_ref)),
                    "melems_1t_pyqmoe": x.size / one[key][0] / 1e6,
                    "melems_1t_llamacpp": x.size / one[key][1] / 1e6,
                    "melems_nt_pyqmoe": x.size / many[key][0] / 1e6,
                    "melems_nt_llamacpp": x.size / many[key][1] / 1e6,
                }
            )
    return rows


def markdown(rows: list[dict], header: str) -> str:
    n = os.cpu_count() or 1
    lines = [
        header,
        "",
        "| input | type | imatrix | wRMSE pyqmoe | wRMSE llama.cpp | RMSE ratio | same bytes "
        f"| 1 thread Melem/s (pyqmoe / llama.cpp) | speed ratio | {n} threads Melem/s | speed ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["rmse_pyqmoe"] / r["rmse_llamacpp"] if r["rmse_llamacpp"] else float("nan")
        lines.append(
            f"| {r['input']} | {r['type']} | {'yes' if r['imatrix'] else 'no'} "
            f"| {r['rmse_pyqmoe']:.4e} | {r['rmse_llamacpp']:.4e} | {ratio:.4f} "
            f"| {'yes' if r['bytes_equal'] else 'no'} "
            f"| {r['melems_1t_pyqmoe']:.1f} / {r['melems_1t_llamacpp']:.1f} "
            f"| {r['melems_1t_pyqmoe'] / r['melems_1t_llamacpp']:.2f} "
            f"| {r['melems_nt_pyqmoe']:.1f} / {r['melems_nt_llamacpp']:.1f} "
            f"| {r['melems_nt_pyqmoe'] / r['melems_nt_llamacpp']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6], sys.argv[6:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=LEGACY)
    ap.add_argument("--rows", type=int, default=768, help="rows per input (768 = one expert)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    ap.add_argument("--model", type=Path, help="GGUF to take an expert tensor from")
    ap.add_argument("--no-model", action="store_true", help="synthetic input only")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here (e.g. docs/bench.md)")
    args = ap.parse_args()

    import pyqmoe

    inputs = [(f"synthetic {args.rows}x2048", *synthetic_expert(args.rows))]
    model = args.model
    if model is None and not args.no_model:
        found = sorted((ROOT / "pyqmoe" / "models").glob("*.gguf"), key=lambda p: "ref" not in p.name)
        model = found[0] if found else None
    if model is not None and not args.no_model:
        m = model_expert(model, args.rows)
        if m is not None:
            inputs.append(m)

    rows = []
    for label, x, w in inputs:
        block = {t: pyqmoe.type_info()[t]["block_size"] for t in args.types}
        types = [t for t in args.types if x.shape[1] % block[t] == 0]
        skipped = sorted(set(args.types) - set(types))
        if skipped:
            print(f"# {label}: row length {x.shape[1]} does not fit the blocks of {skipped}; skipped")
        if types:
            rows += bench(label, x, w, types, args.repeats)

    header = (
        f"pyqmoe {pyqmoe.__version__} ({pyqmoe._core.cpu_features()}) vs llama.cpp "
        f"({llamacpp_ref.library_path().resolve().name}); {os.cpu_count()} cores; best of {args.repeats}. "
        "RMSE is importance-weighted with the input's imatrix; ratio = pyqmoe / llama.cpp."
    )
    table = markdown(rows, header)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
