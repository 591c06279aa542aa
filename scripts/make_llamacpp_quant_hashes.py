"""Record llama.cpp's whole-model quantization output as per-tensor SHA-256 digests (dev-only).

Input: the synthetic ``moe16`` model (BF16; ffn_down rows of 96 exercise the fall-backs) from
``tests/data/make_preset_model.py`` and the random legacy importance matrix made for it by the same
script. llama.cpp (llama-cpp-python's ``llama_model_quantize``, through the worker in
``benches/bench_quantize_vs_llamacpp.py``) quantizes it with several presets; the digests of its
tensors (name -> type, sha256 of the bytes) go to ``tests/data/llamacpp_quant_hashes.json``, with the
digests of the input model and imatrix so that the test can tell when it regenerated different
inputs (e.g. another numpy) and skip instead of failing.

Usage: python scripts/make_llamacpp_quant_hashes.py
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "data"))

PRESETS = ["Q4_K_M", "IQ4_XS", "Q2_K_S", "Q5_K_M", "Q4_0", "Q8_0"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_digests(path: Path) -> dict[str, list[str]]:
    import numpy as np
    from gguf import GGUFReader

    return {
        t.name: [t.tensor_type.name, hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).tobytes()).hexdigest()]
        for t in GGUFReader(path).tensors
    }


def main():
    import llama_cpp
    from make_preset_model import imatrix_entries, write_legacy_imatrix, write_model

    bench = ROOT / "benches" / "bench_quantize_vs_llamacpp.py"
    out = {"llama_cpp_python": llama_cpp.__version__, "model": "moe16 bf16", "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model, imatrix = Path(tmp) / "moe16-bf16.gguf", Path(tmp) / "moe16.imatrix.dat"
        write_model(model, "moe16", "bf16")
        write_legacy_imatrix(imatrix, imatrix_entries(model), 10, "synthetic")
        out["model_sha256"], out["imatrix_sha256"] = sha(model), sha(imatrix)
        for preset in PRESETS:
            dst = Path(tmp) / f"{preset}.gguf"
            cmd = [
                sys.executable,
                str(bench),
                "--llamacpp-worker",
                str(model),
                str(dst),
                preset,
                str(imatrix),
                "2",
                "{}",
            ]
            subprocess.run(cmd, check=True, capture_output=True)
            out["presets"][preset] = tensor_digests(dst)
            print(f"{preset}: {len(out['presets'][preset])} tensors", file=sys.stderr)
    dst = ROOT / "tests" / "data" / "llamacpp_quant_hashes.json"
    dst.write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
    print(f"wrote {dst} ({dst.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
