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
