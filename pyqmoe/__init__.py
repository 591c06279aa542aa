"""pyqmoe: quantize, repack, evaluate and run Mixture-of-Experts GGUF models on the CPU.

The numerics live in the Rust extension ``pyqmoe._core``; this package is a thin layer that
parses options, shows progress and hands numpy arrays to Rust.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._core import GGUFFormatError, PyqmoeError, TensorError, UnknownTypeError
from .gguf_file import GGUFFile, TensorInfo
from .model import Model
from .models import default_model_path

__version__ = _core.__version__

__all__ = [
    "GGUFFile",
    "GGUFFormatError",
    "Model",
    "PyqmoeError",
    "TensorError",
    "TensorInfo",
    "UnknownTypeError",
    "default_model_path",
    "dequantize",
    "quantize",
    "rewrite",
    "type_info",
]


def type_info() -> dict[str, dict]:
    """Every ggml type: id, block size, bytes per block, and whether pyqmoe can convert it."""
    return {
        name: {"id": tid, "block_size": bs, "type_size": ts, "supported": ok} for name, tid, bs, ts, ok in _core.types()
    }


def quantize(array, qtype: str, imatrix=None, *, name: str = "array") -> np.ndarray:
    """Quantize a float array (last axis = rows) to ``qtype``; returns uint8 of shape (..., row bytes).

    ``imatrix``: optional per-column importance weights (length = row length, or row length
    times the number of experts for a 3-D expert tensor).
    """
    arr = np.ascontiguousarray(array, dtype=np.float32)
    if arr.ndim == 0:
        raise ValueError("quantize needs at least a 1-D array")
    w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    raw = _core.quantize(arr, qtype, w, name)
    rows = arr.shape[:-1]
    return raw.reshape(*rows, -1) if rows else raw


def dequantize(raw, qtype: str, shape, *, name: str = "array") -> np.ndarray:
    """Dequantize packed ``qtype`` bytes to float32 of ``shape`` (last axis = row length)."""
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    return _core.dequantize(data, qtype, shape[-1], name).reshape(shape)


def rewrite(src, dst, *, split_max_bytes: int | None = None, split_max_tensors: int | None = None):
    """Copy a model (any part of a split model opens all parts) to ``dst``, unchanged, optionally
    re-split llama.cpp style. Returns the written paths. Output is atomic."""
    return _core.rewrite(str(src), str(dst), split_max_bytes, split_max_tensors)
