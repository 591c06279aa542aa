"""Read train.py's checkpoint folder into numpy (no torch, no gguf needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


def load_bf16_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file of BF16/F32 tensors as float32 numpy arrays.

    BF16 is the upper half of an IEEE float32, so the conversion is exact.
    """
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if info["dtype"] == "BF16":
            u16 = np.frombuffer(raw[base + a : base + b], dtype="<u2")
            out[name] = (u16.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
        elif info["dtype"] == "F32":
            out[name] = np.frombuffer(raw[base + a : base + b], dtype="<f4").reshape(info["shape"]).copy()
        else:
            raise ValueError(f"{name}: unexpected dtype {info['dtype']}")
    return out


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, float32 state dict with transformers names) from train.py's output."""
    cfg = json.loads((folder / "config.json").read_text())
    sd: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        sd.update(load_bf16_safetensors(shard))
    return cfg, sd
