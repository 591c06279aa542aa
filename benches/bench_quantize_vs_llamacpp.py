"""End-to-end `pyqmoe quantize` vs llama.cpp's `llama_model_quantize`: wall time, peak RSS, bytes.

Both run on the same input with the same preset, importance matrix and thread count, each in its
own subprocess (pyqmoe through its CLI; llama.cpp through llama-cpp-python, loading the same
legacy imatrix file and normalising it as llama-quantize does). Peak RSS is the child's
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read in a small launcher process that runs only
that one command. Afterwards the outputs are compared tensor by tensor.

Usage:
    python benches/bench_quantize_vs_llamacpp.py [--model PATH] [--preset Q4_K_M --preset Q8_0]
        [--threads N] [--repeat R]

Without --model it generates the synthetic ``moe8`` model (tests/data/make_preset_model.py), and
also uses pyqmoe/models/qwen3moe-ref-bf16.gguf when that exists. The imatrix is random (made for
each model by the same script); both tools read the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "data"))

FTYPES = {  # preset -> llama_ftype
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29,
    "IQ1_S": 24, "IQ1_M": 31, "Q2_K": 10, "Q2_K_S": 21, "IQ3_XXS": 23, "IQ3_S": 26, "IQ3_M": 27,
    "IQ3_XS": 22, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "IQ4_NL": 25, "IQ4_XS": 30, "Q4_K_S": 14,
    "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "F16": 1, "BF16": 32, "F32": 0,
}  # fmt: skip


GGML_TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19,
    "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30,
}  # fmt: skip


def run_llamacpp(src: str, dst: str, preset: str, imatrix: str, nthread: int, options: dict | None = None) -> int:
    """In a subprocess: llama.cpp quantizes src with the legacy imatrix at `imatrix`; `options`:
    tensor_types [[regex, type]], token_embedding_type, output_tensor_type, allow_requantize, prune."""
    import ctypes
    import struct

    import llama_cpp as L
    import numpy as np

    @L.llama_log_callback
    def quiet(level, text, user_data):
        pass

    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    buf = Path(imatrix).read_bytes()
    (n,), pos = struct.unpack_from("<i", buf, 0), 4
    names, arrays = [], []
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", buf, pos)
        pos += 4
        name = buf[pos : pos + ln]
        pos += ln
        ncall, nval = struct.unpack_from("<ii", buf, pos)
        pos += 8
        v = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).copy()
        pos += 4 * nval
        if ncall > 0:
            v /= np.float32(ncall)  # llama-quantize's normalisation of the legacy format
        names.append(name)
        arrays.append(v)
    im = (L.llama_model_imatrix_data * (n + 1))()
    for i, (name, v) in enumerate(zip(names, arrays)):
        im[i].name, im[i].data, im[i].size = name, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    im[n].name = None
    p = L.llama_model_quantize_default_params()
    p.ftype = FTYPES[preset]
    p.nthread = nthread
    p.imatrix = ctypes.cast(im, ctypes.POINTER(L.llama_model_imatrix_data))
    o = options or {}
    tts = o.get("tensor_types", [])
    tt = (L.llama_model_tensor_override * (len(tts) + 1))()
    for i, (pat, ty) in enumerate(tts):
        tt[i].pattern, tt[i].type = pat.encode(), GGML_TYPES[ty.upper()]
    tt[len(tts)].pattern = None
    if tts:
        p.tt_overrides = ctypes.cast(tt, ctypes.POINTER(L.llama_model_tensor_override))
    if o.get("token_embedding_type"):
        p.token_embedding_type = GGML_TYPES[o["token_embedding_type"].upper()]
    if o.get("output_tensor_type"):
        p.output_tensor_type = GGML_TYPES[o["output_tensor_type"].upper()]
    p.allow_requantize = bool(o.get("allow_requantize"))
    prune = (ctypes.c_int32 * (len(o.get("prune", [])) + 1))(*o.get("prune", []), -1)
    if o.get("prune"):
        p.prune_layers = ctypes.cast(prune, ctypes.POINTER(ctypes.c_int32))
    return L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))


# Runs the command and reports its wall time and peak RSS. A small launcher process, because on
# Linux a child's ru_maxrss starts at its parent's RSS at fork time: launched straight from this
# (numpy-heavy) process, every child would report at least this process's size.
_LAUNCHER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t0
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, rc)
"""


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one child process."""
    p = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    wall, rss, rc = p.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({rc}): {p.stderr[-1500:]}")
    return float(wall), float(rss), int(rc)


def compare(a: str, b: str) -> tuple[int, int, list[str]]:
    """(identical tensors, tensors, names that differ in type or bytes)."""
    import numpy as np
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    same, diff = 0, []
    for t in ra.tensors:
        u = tb.get(t.name)
        if (
            u is not None
            and t.tensor_type == u.tensor_type
            and np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8))
        ):
            same += 1
        else:
            diff.append(t.name)
    return same, len(ra.tensors), diff


def seeds(threads: int) -> None:
    """The task's three seed command lines on the synthetic moe16 model, against llama.cpp given the
    same rules through its API (--custom-q/--tensor-type -> tt_overrides, in order)."""
    from make_preset_model import imatrix_entries, write_legacy_imatrix, write_model

    custom = r"ffn_down_exps=iq4_nl,blk\.[0-3]\.attn_(q|k)=q6_k"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        bf16, q8, f32 = t / "in-BF16.gguf", t / "src-Q8_0.gguf", t / "model-f32.gguf"
        write_model(bf16, "moe16", "bf16")
        write_model(f32, "moe16", "f32")
        imatrix = t / "imatrix.dat"
        write_legacy_imatrix(imatrix, imatrix_entries(bf16), 10, "synthetic")
        subprocess.run([sys.executable, "-m", "pyqmoe.cli", "quantize", str(bf16), str(q8), "Q8_0"], check=True,
                       capture_output=True)  # fmt: skip
        runs = [
            (["--custom-q", custom, "--imatrix", str(imatrix), str(bf16), "{out}", "IQ4_XS", "24"],
             bf16, "IQ4_XS", dict(tensor_types=[r.split("=") for r in custom.split(",")])),
            (["--allow-requantize", "--imatrix", str(imatrix), "--tensor-type", "ffn_gate_exps=IQ2_S",
              "--tensor-type", "ffn_down_exps=IQ3_S", "--tensor-type", "attn_q=Q4_K", "--token-embedding-type", "Q6_K",
              "--output-tensor-type", "Q6_K", str(q8), "{out}", "IQ3_S"],
             q8, "IQ3_S", dict(allow_requantize=True, token_embedding_type="Q6_K", output_tensor_type="Q6_K",
                               tensor_types=[["ffn_gate_exps", "IQ2_S"], ["ffn_down_exps", "IQ3_S"],
                                             ["attn_q", "Q4_K"]])),
            (["--tensor-type", "attn=q6_k", "--prune-layers", "3,7,11", "--imatrix", str(imatrix), str(f32), "{out}",
              "q4_k_m"], f32, "Q4_K_M", dict(tensor_types=[["attn", "Q6_K"]], prune=[3, 7, 11])),
        ]  # fmt: skip
        print(f"threads: {threads}")
        print(
            f"{'seed':<5} {'pyqmoe s':>9} {'llama s':>8} {'time x':>7} {'pyqmoe MiB':>10} {'llama MiB':>9}  identical"
        )
        for i, (args, src, preset, opts) in enumerate(runs, 1):
            ours, theirs = t / "ours.gguf", t / "theirs.gguf"
            args = [x.replace("{out}", str(ours)) for x in args]
            if args[-1] == "24":
                args[-1] = str(threads)
            o = measure([sys.executable, "-m", "pyqmoe.cli", "quantize", *args])
            ll = measure([sys.executable, __file__, "--llamacpp-worker", str(src), str(theirs), preset, str(imatrix),
                          str(threads), json.dumps(opts)])  # fmt: skip
            same, n, diff = compare(str(ours), str(theirs))
            print(
                f"{i:<5} {o[0]:9.2f} {ll[0]:8.2f} {o[0] / ll[0]:7.2f} {o[1]:10.1f} {ll[1]:9.1f}  {same}/{n} {diff[:4]}"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--preset", action="append", default=[])
    ap.add_argument("--synthetic", default="moe8", help="synthetic model to generate when no --model is given")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (the best wall time is kept)")
    ap.add_argument("--seeds", action="store_true", help="run the three seed command lines instead")
    ap.add_argument("--llamacpp-worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llamacpp_worker:
        src, dst, preset, imatrix, nthread, options = a.llamacpp_worker
        sys.exit(run_llamacpp(src, dst, preset, imatrix, int(nthread), json.loads(options)))
    if a.seeds:
        return seeds(a.threads)

    from make_preset_model import imatrix_entries, write_legacy_imatrix, write_model

    presets = a.preset or ["Q4_K_M", "Q8_0"]
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in a.model]
        if not models:
            models.append(Path(tmp) / f"{a.synthetic}-f16.gguf")
            write_model(models[0], a.synthetic, "f16")
            ref = ROOT / "pyqmoe" / "models" / "qwen3moe-ref-bf16.gguf"
            if ref.is_file():
                models.append(ref)
        print(f"threads: {a.threads}")
        header = f"{'model':<28} {'preset':<7} {'pyqmoe s':>9} {'llama s':>8} {'time x':>7} "
        header += f"{'pyqmoe MiB':>10} {'llama MiB':>9} {'RSS x':>6}  identical tensors"
        print(header)
        for model in models:
            imatrix = Path(tmp) / f"{model.stem}.imatrix.dat"
            write_legacy_imatrix(imatrix, imatrix_entries(model), 10, "synthetic")
            for preset in presets:
                ours, theirs = Path(tmp) / "pyqmoe.gguf", Path(tmp) / "llamacpp.gguf"
                cmd_ours = [sys.executable, "-m", "pyqmoe.cli", "quantize", "--imatrix", str(imatrix)]
                cmd_ours += [str(model), str(ours), preset, str(a.threads)]
                cmd_theirs = [sys.executable, __file__, "--llamacpp-worker", str(model), str(theirs)]
                cmd_theirs += [preset, str(imatrix), str(a.threads), "{}"]
                best_o = best_t = (float("inf"), 0.0, 0)
                for _ in range(a.repeat):
                    best_o = min(best_o, measure(cmd_ours))
                    best_t = min(best_t, measure(cmd_theirs))
                same, n, diff = compare(str(ours), str(theirs))
                print(
                    f"{model.name[:28]:<28} {preset:<7} {best_o[0]:9.2f} {best_t[0]:8.2f} {best_o[0] / best_t[0]:7.2f} "
                    f"{best_o[1]:10.1f} {best_t[1]:9.1f} {best_o[1] / best_t[1]:6.2f}  {same}/{n}"
                    + (f" (differ: {', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''})" if diff else "")
                )
                ours.unlink()
                theirs.unlink()


if __name__ == "__main__":
    main()
