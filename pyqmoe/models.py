"""The model that ships inside the package, used by default by the CLI."""

from __future__ import annotations

from pathlib import Path

_MODELS_DIR = Path(__file__).parent / "models"
# Preferred first: the trained reference model; the tiny random fixture is the fall-back.
_CANDIDATES = ("qwen3moe-ref-bf16.gguf", "tiny-qwen3moe-f32.gguf")


def default_model_path() -> Path:
    """Path of the bundled default model."""
    for name in _CANDIDATES:
        p = _MODELS_DIR / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"no bundled model found in {_MODELS_DIR} (looked for {', '.join(_CANDIDATES)})")
