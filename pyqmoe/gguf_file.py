"""Read-only GGUF access: validated by Rust, tensor data as zero-copy numpy views of the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core

# numpy dtypes for the float/int storage types that have a direct numpy view.
_VIEW_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # numpy has no bfloat16: raw bit patterns (use .dequantize() for floats)
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    type: str
    file_index: int
    offset: int  # absolute byte offset in its file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass(frozen=True)
class Field:
    key: str
    type: str  # gguf-py's value type name, e.g. "UINT32" or "ARRAY[STRING]"
    value: Any


class GGUFFile:
    """A GGUF model (one file, or every part of a split model when given any part).

    Parsing and validation happen in Rust; a malformed file raises ``GGUFFormatError`` naming the
    file, field and byte offset.
    """

    def __init__(self, path: str | Path):
        self._model = _core.GGUFModel(str(path))
        self.paths = [Path(p) for p in self._model.paths]
        self.version: int = self._model.version
        self.alignment: int = self._model.alignment
        self.fields = [Field(k, t, v) for k, t, v in self._model.fields()]
        self.metadata: dict[str, Any] = {f.key: f.value for f in self.fields}
        self.tensors = [TensorInfo(n, tuple(d), t, fi, off, nb) for n, d, t, fi, off, nb in self._model.tensor_infos()]
        self._by_name = {t.name: t for t in self.tensors}
        self._maps: list[np.memmap | None] = [None] * len(self.paths)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.paths[0])!r}, {len(self.tensors)} tensors, {len(self.fields)} keys)"

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.paths[0]}: no tensor named {name!r}") from None

    def _map(self, i: int) -> np.memmap:
        m = self._maps[i]
        if m is None:
            m = self._maps[i] = np.memmap(self.paths[i], dtype=np.uint8, mode="r")
        return m

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes: a read-only, zero-copy view of the file."""
        t = self.tensor_info(name)
        return self._map(t.file_index)[t.offset : t.offset + t.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """Typed zero-copy view (numpy shape) for F32/F16/BF16(as uint16)/F64/I*; raw bytes
        shaped (..., row bytes) for quantized types."""
        t = self.tensor_info(name)
        raw = self.tensor_bytes(name)
        dt = _VIEW_DTYPES.get(t.type)
        if dt is not None:
            return raw.view(dt).reshape(t.shape)
        return raw.reshape(*t.shape[:-1], -1)

    def dequantize(self, name: str) -> np.ndarray:
        """float32 copy of any tensor type pyqmoe can decode, in numpy shape."""
        t = self.tensor_info(name)
        return self._model.dequantize(name).reshape(t.shape)

    def file_fields(self, index: int) -> list[Field]:
        """Metadata of one split part."""
        return [Field(k, t, v) for k, t, v in self._model.file_fields(index)]

    def summary(self) -> dict[str, Any]:
        """What model cards print: size, bits per weight, tensors per type."""
        n_bytes = sum(t.nbytes for t in self.tensors)
        n_elems = sum(t.n_elements for t in self.tensors)
        per_type: dict[str, int] = {}
        for t in self.tensors:
            per_type[t.type.lower()] = per_type.get(t.type.lower(), 0) + 1
        return {
            "architecture": self.metadata.get("general.architecture"),
            "name": self.metadata.get("general.name"),
            "n_tensors": len(self.tensors),
            "n_params": n_elems,
            "tensor_bytes": n_bytes,
            "size_gib": n_bytes / 2**30,
            "bpw": 8.0 * n_bytes / n_elems if n_elems else 0.0,
            "tensors_per_type": dict(sorted(per_type.items(), key=lambda kv: (-kv[1], kv[0]))),
            "files": [str(p) for p in self.paths],
        }
