"""Record llama.cpp's per-tensor type choice for every quantization preset (dev-only).

For each model (the synthetic ones from ``tests/data/make_preset_model.py``, plus the tiny fixture
and the reference model pyqmoe/models/qwen3moe-ref-bf16.gguf when present) and each case (every
preset, without and with an importance matrix, plus a few cases with --tensor-type rules,
token/output types, --pure, --leave-output-tensor and --prune-layers), llama.cpp's
``llama_model_quantize`` runs in dry-run mode (it picks the types and logs them without
quantizing) and the types are parsed from its log. Each model runs in its own subprocess because
llama.cpp may abort the process.

Writes ``tests/data/llamacpp_preset_types.json``:
``{"llama_cpp_python": version, "models": {model: {"names": [...], "cases": [{case..., "types": "T1 T2 ..."}
or {case..., "error": message}]}}}``: names in llama.cpp's order, types aligned with them (a case
that prunes layers has its own "names", after renaming).

Usage: python scripts/make_llamacpp_preset_types.py [--model NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
REF_MODEL = ROOT / "pyqmoe" / "models" / "qwen3moe-ref-bf16.gguf"
sys.path.insert(0, str(DATA))

PRESETS = {  # name -> llama_ftype
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29,
    "IQ1_S": 24, "IQ1_M": 31, "Q2_K": 10, "Q2_K_S": 21, "IQ3_XXS": 23, "IQ3_S": 26, "IQ3_M": 27,
    "IQ3_XS": 22, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "IQ4_NL": 25, "IQ4_XS": 30, "Q4_K_S": 14,
    "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "F16": 1, "BF16": 32, "F32": 0,
}  # fmt: skip

# Extra cases per model: (id, preset, imatrix, overrides).
EXTRA = {
    "moe8": [
        ("IQ3_S-seed", "IQ3_S", True, dict(
            tensor_types=[["ffn_gate_exps", "IQ2_S"], ["ffn_down_exps", "IQ3_S"], ["attn_q", "Q4_K"]],
            token_embedding_type="Q6_K", output_tensor_type="Q6_K")),
        ("Q4_K_M-pure", "Q4_K_M", False, dict(pure=True)),
        ("Q4_K_M-leave-output", "Q4_K_M", False, dict(leave_output=True)),
        ("Q4_K_M-prune", "Q4_K_M", True, dict(prune=[1, 3], tensor_types=[["attn", "Q6_K"]])),
    ],
    "moe16": [
        ("Q4_K_M-prune-3-7-11", "Q4_K_M", True, dict(prune=[3, 7, 11], tensor_types=[["attn", "Q6_K"]])),
        ("Q4_K_M-tied-output-type", "Q4_K_M", False, dict(output_tensor_type="Q8_0")),
        ("IQ2_M-embd", "IQ2_M", True, dict(token_embedding_type="Q4_K")),
    ],
    "ref": [
        ("IQ3_S-seed", "IQ3_S", True, dict(
            tensor_types=[["ffn_gate_exps", "IQ2_S"], ["ffn_down_exps", "IQ3_S"], ["attn_q", "Q4_K"]],
            token_embedding_type="Q6_K", output_tensor_type="Q6_K")),
        ("Q4_K_M-prune", "Q4_K_M", True, dict(prune=[1, 3], tensor_types=[["attn", "Q6_K"]])),
    ],
    "dense": [
        ("Q4_K_M-layer-rule", "Q4_K_M", False, dict(tensor_types=[[r"\.([0-9]|1[01257]|31)\.attn_k", "Q4_K"]])),
        ("Q3_K_M-prune", "Q3_K_M", False, dict(prune=[0, 15])),
    ],
}  # fmt: skip

GGML_TYPE_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19,
    "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30,
}  # fmt: skip

LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^\n]*?(?:\((\w+)\))?\s*$", re.M)


def cases_for(model: str):
    out = []
    for name in PRESETS:
        for im in (False, True):
            out.append(dict(id=f"{name}{'+imatrix' if im else ''}", preset=name, imatrix=im))
    for cid, preset, im, extra in EXTRA.get(model, []):
        out.append(dict(id=cid, preset=preset, imatrix=im, **extra))
    return out


def worker(path: str, cases: list[dict]) -> list[dict]:
    """Runs in a subprocess: dry-run llama.cpp for each case and parse its log."""
    import ctypes

    import llama_cpp as L

    buf: list[str] = []

    @L.llama_log_callback
    def on_log(level, text, user_data):
        buf.append(text.decode("utf-8", "replace"))

    L.llama_log_set(on_log, None)
    L.llama_backend_init()
    results = []
    for case in cases:
        buf.clear()
        p = L.llama_model_quantize_default_params()
        p.ftype = PRESETS[case["preset"]]
        p.nthread = 1
        p.dry_run = True
        keep = []
        if case["imatrix"]:
            # Any entry makes llama.cpp's has_imatrix true, which some rules look at.
            vals = (ctypes.c_float * 4)(1, 1, 1, 1)
            im = (L.llama_model_imatrix_data * 2)()
            im[0].name, im[0].data, im[0].size = b"dummy", vals, 4
            im[1].name = None
            keep += [vals, im]
            p.imatrix = ctypes.cast(im, ctypes.POINTER(L.llama_model_imatrix_data))
        if case.get("tensor_types"):
            tts = case["tensor_types"]
            tt = (L.llama_model_tensor_override * (len(tts) + 1))()
            for i, (pat, ty) in enumerate(tts):
                tt[i].pattern, tt[i].type = pat.encode(), GGML_TYPE_IDS[ty]
            tt[len(tts)].pattern = None
            keep.append(tt)
            p.tt_overrides = ctypes.cast(tt, ctypes.POINTER(L.llama_model_tensor_override))
        if case.get("token_embedding_type"):
            p.token_embedding_type = GGML_TYPE_IDS[case["token_embedding_type"]]
        if case.get("output_tensor_type"):
            p.output_tensor_type = GGML_TYPE_IDS[case["output_tensor_type"]]
        if case.get("pure"):
            p.pure = True
        if case.get("leave_output"):
            p.quantize_output_tensor = False
        if case.get("prune"):
            pr = (ctypes.c_int32 * (len(case["prune"]) + 1))(*case["prune"], -1)
            keep.append(pr)
            p.prune_layers = ctypes.cast(pr, ctypes.POINTER(ctypes.c_int32))
        rc = L.llama_model_quantize(path.encode(), b"/nonexistent/never.gguf", ctypes.byref(p))
        log = "".join(buf)
        res = dict(case)
        if rc != 0:
            m = re.search(r"failed to quantize: (.*)", log)
            res["error"] = m.group(1).strip() if m else f"rc={rc}"
        else:
            names, types = [], []
            for name, src, dst in LINE.findall(log):
                names.append(name)
                types.append((dst or src).upper())
            res["names"], res["types"] = names, types
        results.append(res)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH of another model to record")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        path, cases_json = a.worker
        print(json.dumps(worker(path, json.loads(cases_json))))
        return
    import llama_cpp
    from make_preset_model import write_model

    out = {"llama_cpp_python": llama_cpp.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name in ("moe8", "moe16", "dense"):
            models[name] = Path(tmp) / f"{name}.gguf"
            write_model(models[name], name)
        for name, path in (("tiny", DATA / "tiny-qwen3moe-f32.gguf"), ("ref", REF_MODEL)):
            if path.is_file():
                models[name] = path
        for spec in a.model:
            name, path = spec.split("=", 1)
            models[name] = Path(path)
        for name, path in models.items():
            cases = cases_for(name)
            p = subprocess.run(
                [sys.executable, __file__, "--worker", str(path), json.dumps(cases)],
                capture_output=True,
                text=True,
            )
            if p.returncode != 0:
                raise SystemExit(f"{name}: llama.cpp worker failed ({p.returncode}): {p.stderr[-2000:]}")
            results = json.loads(p.stdout.strip().splitlines()[-1])
            # Compact: the tensor names once per model, types as one string per case.
            names = next(r["names"] for r in results if "names" in r and not r.get("prune"))
            for r in results:
                if "types" in r:
                    r["types"] = " ".join(r["types"])
                    if r["names"] == names:
                        del r["names"]
            out["models"][name] = {"names": names, "cases": results}
            n_err = sum("error" in r for r in results)
            print(f"{name}: {len(results)} cases, {n_err} llama.cpp errors", file=sys.stderr)
    dst = DATA / "llamacpp_preset_types.json"
    dst.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {dst} ({dst.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
