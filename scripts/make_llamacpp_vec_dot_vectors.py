"""Store llama.cpp's own dot products of quantized weight rows with quantized activations.

    python scripts/make_llamacpp_vec_dot_vectors.py [TYPE ...]

For every weight type, ggml's CPU backend quantizes the activations to the type's `vec_dot_type`
(Q8_0, Q8_1 or Q8_K) with its `from_float`, then calls the type's `vec_dot`. This script calls
exactly those functions from llama-cpp-python's ``libggml-cpu.so`` (through ctypes) and writes
``tests/data/llamacpp/vec_dot/<type>.gguf`` with the tensors

    w            TYPE  [n_rows][n_cols]  weights quantized by llama.cpp (imatrix where required)
    x            F32   [n_tok][n_cols]   activations
    act          I8    [n_tok][bytes]    ggml's from_float(x) for the vec_dot_type, raw blocks
    dot          F32   [n_tok][n_rows]   ggml's vec_dot (the build's SIMD kernel) of w[r] and act[t]
    dot_generic  F32   [n_tok][n_rows]   the same with ggml's portable `_generic` kernel

so the Rust tests (rust/src/model/vec_dot/) compare pyqmoe's kernels with llama.cpp's without
needing llama.cpp. Rows: random heavy-tailed, then a zero row, a constant row and an outlier row.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import gguf  # noqa: E402
import llamacpp_ref  # noqa: E402

TYPES = [
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL",
]  # fmt: skip
N_COLS = 1024
N_RANDOM_ROWS = 6
N_TOK = 5

# ggml-cpu.h: struct ggml_type_traits_cpu { from_float; vec_dot; vec_dot_type; nrows; }
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64)
# void vec_dot(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc)
_VEC_DOT = ctypes.CFUNCTYPE(
    None,
    ctypes.c_int,
    ctypes.POINTER(ctypes.c_float),
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
)


class _CpuTraits(ctypes.Structure):
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


def _cpu_lib() -> ctypes.CDLL:
    path = llamacpp_ref.library_path().parent / "libggml-cpu.so"
    lib = ctypes.CDLL(str(path))
    lib.ggml_cpu_init.restype = None
    lib.ggml_cpu_init()
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    return lib


def _llama_cpp_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llama_cpp_python")


def _generic_symbol(type_name: str, act_name: str) -> str:
    w, a = type_name.lower(), act_name.lower()
    w = w[:-1] + "K" if w.endswith("_k") else w
    a = a[:-1] + "K" if a.endswith("_k") else a
    return f"ggml_vec_dot_{w}_{a}_generic"


def rows(seed: int = 20261203) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (random heavy-tailed + zero, constant, outlier rows), activations, imatrix."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(N_RANDOM_ROWS, N_COLS)).astype(np.float32) * 0.05
    zero = np.zeros(N_COLS, np.float32)
    const = np.full(N_COLS, 0.25, np.float32)
    outlier = (rng.standard_normal(N_COLS) * 0.01).astype(np.float32)
    outlier[37] = 40.0
    w = np.vstack([w, zero, const, outlier]).astype(np.float32)
    x = rng.standard_t(3, size=(N_TOK, N_COLS)).astype(np.float32)
    x[1] *= 1e-3  # small activations
    x[2, ::7] *= 50.0  # spiky activations
    imatrix = rng.lognormal(0.0, 1.0, N_COLS).astype(np.float32)
    return w, x, imatrix


def make(type_name: str, lib: ctypes.CDLL, out_dir: Path) -> Path:
    qtype = gguf.GGMLQuantizationType[type_name]
    traits = lib.ggml_get_type_traits_cpu(int(qtype)).contents
    act_type = gguf.GGMLQuantizationType(traits.vec_dot_type)
    w, x, imatrix = rows()
    needs = llamacpp_ref.requires_imatrix(type_name)
    wq = llamacpp_ref.quantize(type_name, w, imatrix=imatrix if needs else None)
    block, act_bytes = gguf.GGML_QUANT_SIZES[act_type]
    if act_type == gguf.GGMLQuantizationType.Q8_1:
        act_bytes = 36  # ggml's block_q8_1 (static_assert); gguf-py lists 40
    act = np.zeros((N_TOK, N_COLS // block * act_bytes), np.uint8)
    # ggml quantizes activations with the vec_dot_type's own from_float
    from_float = _FROM_FLOAT(lib.ggml_get_type_traits_cpu(int(act_type)).contents.from_float)
    for t in range(N_TOK):
        xt = np.ascontiguousarray(x[t])
        from_float(xt.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), act[t].ctypes.data, N_COLS)
    kernels = {"dot": _VEC_DOT(traits.vec_dot)}
    generic = getattr(lib, _generic_symbol(type_name, act_type.name))
    kernels["dot_generic"] = _VEC_DOT(ctypes.cast(generic, ctypes.c_void_p).value)
    results = {}
    for name, fn in kernels.items():
        d = np.zeros((N_TOK, w.shape[0]), np.float32)
        s = ctypes.c_float()
        for t in range(N_TOK):
            for r in range(w.shape[0]):
                fn(N_COLS, ctypes.byref(s), 0, wq[r].ctypes.data, 0, act[t].ctypes.data, 0, 1)
                d[t, r] = s.value
        results[name] = d

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{type_name.lower()}.gguf"
    writer = gguf.GGUFWriter(str(path), arch="vec_dot")
    writer.add_string("vec_dot.weight_type", type_name)
    writer.add_string("vec_dot.act_type", act_type.name)
    writer.add_string("vec_dot.source", f"llama-cpp-python {_llama_cpp_version()}")
    writer.add_tensor("w", wq, raw_dtype=qtype)
    writer.add_tensor("x", x)
    writer.add_tensor("act", act.view(np.int8))  # raw bytes (I8), as gguf-py mis-sizes Q8_1
    writer.add_tensor("dot", results["dot"])
    writer.add_tensor("dot_generic", results["dot_generic"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*", default=TYPES)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "llamacpp" / "vec_dot")
    args = ap.parse_args()
    lib = _cpu_lib()
    for t in args.types:
        path = make(t, lib, args.out)
        print(f"{t}: {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
