"""Check `pyqmoe quantize --prune-layers` against llama.cpp (dev-only, needs llama-cpp-python).

1. The tiny fixture pruned to one block by pyqmoe loads in llama.cpp and evaluates to finite logits.
2. On the synthetic moe16 model, pyqmoe's pruned Q4_K_M output equals llama.cpp's own pruned
   output (`llama_model_quantize` with prune_layers) tensor for tensor, block count included.

Usage: python scripts/check_pruned_with_llamacpp.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "data"))
sys.path.insert(0, str(ROOT / "benches"))

LLAMA_PRUNE = """
import ctypes, sys, llama_cpp as L
@L.llama_log_callback
def quiet(level, text, user_data):
    pass
L.llama_log_set(quiet, None)
L.llama_backend_init()
p = L.llama_model_quantize_default_params()
p.ftype, p.nthread = 15, 2
prune = (ctypes.c_int32 * 4)(3, 7, 11, -1)
p.prune_layers = ctypes.cast(prune, ctypes.POINTER(ctypes.c_int32))
sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def pyqmoe_cli(*args):
    subprocess.run([sys.executable, "-m", "pyqmoe.cli", "quantize", *map(str, args)], check=True, capture_output=True)


def main():
    import llama_cpp
    from bench_quantize_vs_llamacpp import compare
    from gguf import GGUFReader
    from make_preset_model import write_model

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        pruned = t / "tiny-pruned.gguf"
        pyqmoe_cli("--prune-layers", "0", ROOT / "tests" / "data" / "tiny-qwen3moe-f32.gguf", pruned, "Q8_0")
        m = llama_cpp.Llama(model_path=str(pruned), verbose=False, n_ctx=64, logits_all=True)
        toks = m.tokenize(b"Python is an easy to learn", add_bos=False)
        m.eval(toks)
        logits = np.array(m.scores[: len(toks)])
        assert m.metadata.get("qwen3moe.block_count") == "1", m.metadata.get("qwen3moe.block_count")
        assert np.isfinite(logits).all()
        print(f"tiny pruned to 1 block: loads, {len(toks)} tokens evaluated, logits finite")
        del m

        src = t / "moe16-f32.gguf"
        write_model(src, "moe16", "f32")
        ours, theirs = t / "ours.gguf", t / "theirs.gguf"
        pyqmoe_cli("--prune-layers", "3,7,11", src, ours, "Q4_K_M")
        subprocess.run([sys.executable, "-c", LLAMA_PRUNE, str(src), str(theirs)], check=True, capture_output=True)
        same, n, diff = compare(str(ours), str(theirs))
        counts = [int(GGUFReader(p).fields["qwen3moe.block_count"].parts[-1][0]) for p in (ours, theirs)]
        print(f"moe16 Q4_K_M --prune-layers 3,7,11: {same}/{n} tensors identical, block_count {counts}")
        assert not diff and counts == [9, 9]


if __name__ == "__main__":
    main()
