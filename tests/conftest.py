from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Qwen3-MoE fixture (F32) made by tests/data/make_tiny_qwen3moe.py."""
    p = DATA / "tiny-qwen3moe-f32.gguf"
    assert p.is_file(), f"missing fixture {p}; run tests/data/make_tiny_qwen3moe.py"
    return p


_DIGEST_SCRIPT = """
import sys, hashlib, numpy as np, pyqmoe
from pyqmoe import _core
x = np.load(sys.argv[1]); w = np.load(sys.argv[2]); h = hashlib.sha256()
for t in sys.argv[3:]:
    h.update(pyqmoe.quantize(x, t, imatrix=w).tobytes())
    if not _core.requires_imatrix(t):
        h.update(pyqmoe.quantize(x, t).tobytes())
print(h.hexdigest())
"""


@pytest.fixture
def quantize_digests(tmp_path):
    """digests(x, w, types, envs) -> set of sha256 of every type's bytes (with and, where allowed,
    without the imatrix), one per environment (e.g. RAYON_NUM_THREADS, PYQMOE_NO_SIMD): a fresh
    process each, since rayon's pool and the SIMD choice are fixed per process."""
    import os
    import subprocess
    import sys

    import numpy as np

    def digests(x, w, types, envs):
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "w.npy", w)
        out = set()
        for extra in envs:
            p = subprocess.run(
                [sys.executable, "-c", _DIGEST_SCRIPT, str(tmp_path / "x.npy"), str(tmp_path / "w.npy"), *types],
                cwd=tmp_path,  # keep the source tree's pyqmoe/ (no compiled _core) off sys.path
                env={**os.environ, **extra},
                capture_output=True,
                text=True,
                check=True,
            )
            out.add(p.stdout.strip())
        return out

    return digests
