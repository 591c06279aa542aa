"""llama.cpp's own quantizers, through ctypes, as the reference pyqmoe is compared against.

Wraps ``llama_cpp/lib/libggml-base.so`` from the installed llama-cpp-python wheel:
``ggml_quantize_chunk`` (with or without an importance matrix) and the type traits' ``to_float``.
Only the benches and ``scripts/make_llamacpp_vectors.py`` import this; tests read the stored
vectors instead, so they never need llama.cpp.

    from llamacpp_ref import quantize, dequantize, requires_imatrix
    raw = quantize("Q4_K", rows, imatrix=w, nthreads=4)     # np.uint8 [n_rows, row_bytes]
    back = dequantize("Q4_K", raw, rows.shape[1])           # np.float32 [n_rows, n_per_row]
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = [
    "ImatrixRequired",
    "dequantize",
    "library_path",
    "quantize",
    "requires_imatrix",
    "row_size",
    "type_id",
]


# Types ggml_quantize_chunk does not handle (it aborts) but whose reference row functions
# libggml-base exports: Q8_K, the k-quant dot products' activation format, takes no imatrix.
_ROW_REF_ONLY = {"Q8_K"}


def _row_symbol(prefix: str, type_name: str) -> str:
    """ggml's exported row-function name, e.g. ("quantize_row_", "Q8_K") -> "quantize_row_q8_K"."""
    name = type_name.lower()
    if name.endswith("_k"):
        name = name[:-1] + "K"
    return prefix + name


class ImatrixRequired(ValueError):
    """llama.cpp would abort the process: this type cannot be made without an importance matrix."""


# ggml.h: typedef void (*ggml_to_float_t)(const void * x, float * y, int64_t k);
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` from ggml.h (the base-library part; CPU traits live elsewhere)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def library_path() -> Path:
    """Where libggml-base.so is: $PYQMOE_LIBGGML_BASE, else inside the llama_cpp package."""
    env = os.environ.get("PYQMOE_LIBGGML_BASE")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ImportError("llama-cpp-python is not installed (needed for llama.cpp reference outputs)")
    return Path(spec.origin).parent / "lib" / "libggml-base.so"


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


@functools.cache
def type_id(type_name: str) -> int:
    """ggml's numeric id of a type name such as "Q4_0" (case-insensitive), checked against ggml."""
    name = type_name.upper()
    try:
        from gguf import GGMLQuantizationType

        tid = int(GGMLQuantizationType[name])
    except (ImportError, KeyError):
        tid = None
    lib = _lib()
    if tid is None:
        # Types newer than the gguf package: search ggml's own names.
        for i in range(64):
            n = lib.ggml_type_name(i)
            if n is not None and n.decode().upper() == name:
                tid = i
                break
        else:
            raise ValueError(f"llama.cpp has no type named {type_name!r}")
    got = lib.ggml_type_name(tid)
    if got is None or got.decode().upper() != name:
        raise ValueError(f"type id {tid} is {got!r} in this libggml, not {type_name!r}")
    return tid


def row_size(type_name: str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements."""
    return int(_lib().ggml_row_size(type_id(type_name), n_per_row))


def requires_imatrix(type_name: str) -> bool:
    """True where llama.cpp refuses (aborts) to quantize without an importance matrix."""
    return bool(_lib().ggml_quantize_requires_imatrix(type_id(type_name)))


def _traits(type_name: str) -> _TypeTraits:
    t = _lib().ggml_get_type_traits(type_id(type_name)).contents
    if t.type_name is None or t.type_name.decode().upper() != type_name.upper():
        raise RuntimeError(f"ggml_type_traits layout mismatch for {type_name}: got {t.type_name!r}")
    return t


@functools.lru_cache(maxsize=4)
def _pool(nthreads: int) -> ThreadPoolExecutor:
    """A kept thread pool, so timing many small calls does not time thread start-up."""
    return ThreadPoolExecutor(nthreads, thread_name_prefix="llamacpp_ref")


def quantize(
    type_name: str,
    rows: np.ndarray,
    imatrix: np.ndarray | None = None,
    nthreads: int = 1,
) -> np.ndarray:
    """Quantize f32 ``rows`` [n_rows, n_per_row] with ggml_quantize_chunk; returns uint8 [n_rows, row_bytes].

    ``imatrix`` holds one weight per column (n_per_row). With ``nthreads > 1`` the rows are split
    into contiguous chunks quantized on Python threads (ctypes releases the GIL during the call).
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D [n_rows, n_per_row], got shape {rows.shape}")
    n_rows, n_per_row = rows.shape
    tid = type_id(type_name)
    lib = _lib()
    blck = int(lib.ggml_blck_size(tid))
    if n_per_row % blck:
        raise ValueError(f"{type_name}: row length {n_per_row} is not a multiple of the block size {blck}")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.size != n_per_row:
            raise ValueError(f"imatrix has {imatrix.size} entries, expected {n_per_row}")
    elif lib.ggml_quantize_requires_imatrix(tid):
        # ggml_quantize_chunk would GGML_ASSERT and abort the whole interpreter.
        raise ImatrixRequired(f"llama.cpp requires an importance matrix for {type_name}")
    rsize = int(lib.ggml_row_size(tid, n_per_row))
    out = np.zeros((n_rows, rsize), dtype=np.uint8)
    if type_name.upper() in _ROW_REF_ONLY:
        # The imatrix, if any, is ignored: ggml's reference row quantizer takes none.
        fn = getattr(lib, _row_symbol("quantize_row_", type_name) + "_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        fn(rows.ctypes.data, out.ctypes.data, n_rows * n_per_row)
        return out
    lib.ggml_quantize_init(tid)  # builds the i-quant grids once, before any threads start

    src_p = rows.ctypes.data
    dst_p = out.ctypes.data
    w_p = None if imatrix is None else imatrix.ctypes.data

    def run(first: int, count: int) -> None:
        # `start` is an element index; ggml offsets both src and dst from it.
        got = lib.ggml_quantize_chunk(tid, src_p, dst_p, first * n_per_row, count, n_per_row, w_p)
        if got != count * rsize:
            raise RuntimeError(f"ggml_quantize_chunk wrote {got} bytes, expected {count * rsize}")

    nthreads = max(1, min(int(nthreads), n_rows))
    if nthreads == 1:
        run(0, n_rows)
    else:
        bounds = np.linspace(0, n_rows, nthreads + 1).astype(int)
        pool = _pool(nthreads)
        futures = [pool.submit(run, int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for f in futures:
            f.result()
    return out


def dequantize(type_name: str, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """Dequantize packed rows with the type traits' ``to_float``; returns f32 [n_rows, n_per_row]."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    rsize = row_size(type_name, n_per_row)
    if raw.size % rsize:
        raise ValueError(f"{raw.size} bytes are not whole {type_name} rows of {rsize} bytes")
    n_rows = raw.size // rsize
    t = _traits(type_name)
    if t.to_float:
        to_float = _TO_FLOAT(t.to_float)
    elif type_name.upper() in _ROW_REF_ONLY:
        to_float = _TO_FLOAT((_row_symbol("dequantize_row_", type_name), _lib()))
    else:
        raise NotImplementedError(f"llama.cpp has no to_float for {type_name}")
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    to_float(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_rows * n_per_row)
    return out


if __name__ == "__main__":
    import sys

    print(f"libggml-base: {library_path()}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256)).astype(np.float32) * 0.02
    for name in sys.argv[1:] or ["Q4_0", "Q8_0", "Q4_K", "IQ2_XXS"]:
        w = rng.random(256).astype(np.float32) + 0.1 if requires_imatrix(name) else None
        q = quantize(name, x, imatrix=w)
        y = dequantize(name, q, 256)
        rmse = float(np.sqrt(np.mean((x - y) ** 2)))
        print(f"{name}: {q.shape[1]} bytes/row, rmse {rmse:.3e}, requires imatrix: {requires_imatrix(name)}")
