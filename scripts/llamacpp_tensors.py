"""Dump llama.cpp's intermediate tensors (its graph callback), to find where pyqmoe's numerics part.

    python scripts/llamacpp_tensors.py MODEL.gguf TOKEN,TOKEN,... OUT.npz

Evaluates the tokens one at a time (llama.cpp's generation path, F32 KV cache, 1 thread) and saves
every F32 tensor of the last step under its graph name (``attn_norm-0``, ``Qcur-0``, ``kqv_out-0``,
``ffn_moe_probs-0``, ``l_out-5``, ``result_output`` ...). Dev-only: needs llama-cpp-python.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    import llama_cpp
    import llama_cpp.llama as llama_mod
    from llama_cpp import llama_cpp as low

    path, toks, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    tensors: dict[str, np.ndarray] = {}
    state = {"last": False}

    def callback(t, ask, _user):
        if ask:
            return True
        if not state["last"]:
            return True
        name = base.ggml_get_name(t).decode()
        head = ctypes.cast(t, ctypes.POINTER(ctypes.c_int64))
        ty = ctypes.cast(t, ctypes.POINTER(ctypes.c_int32))[0]
        ne = [head[2 + i] for i in range(4)]
        nb = [head[6 + i] for i in range(4)]
        data = ctypes.cast(t, ctypes.POINTER(ctypes.c_void_p))[
            31
        ]  # offsetof(ggml_tensor, data) = 248, just before name
        if ty != 0 or not data:
            return True
        n = ne[0] * ne[1] * ne[2] * ne[3]
        contiguous = nb[0] == 4 and nb[1] == 4 * ne[0] and nb[2] == nb[1] * ne[1] and nb[3] == nb[2] * ne[2]
        if contiguous:
            buf = (ctypes.c_float * n).from_address(data)
            tensors[name] = np.frombuffer(buf, np.float32).reshape(ne[::-1]).copy()
        return True

    cb = low.ggml_backend_sched_eval_callback(callback)
    orig = low.llama_context_default_params

    def params():
        p = orig()
        p.cb_eval = cb
        return p

    llama_mod.llama_cpp.llama_context_default_params = params
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=256, n_batch=256, n_threads=1, type_k=0, type_v=0, logits_all=True, verbose=False
    )
    for i, t in enumerate(toks):
        state["last"] = i == len(toks) - 1
        llm.eval([t])
    np.savez(out, **tensors)
    print(f"{len(tensors)} tensors -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
