"""The engine on the bundled reference model against references no one here wrote: transformers'
float32 logits, and llama.cpp's next-token choices and greedy generations on the same quantized
files (stored by tests/data/make_reference_model_vectors.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import pyqmoe
from pyqmoe import _core


@pytest.fixture(scope="module")
def vectors(data_dir):
    with np.load(data_dir / "reference-model-vectors.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, data_dir):
    """pyqmoe's quantization of the bundled model to `preset`, made once per preset."""
    made: dict[str, str] = {}
    d = tmp_path_factory.mktemp("reference")

    def get(preset: str) -> str:
        if preset not in made:
            out = d / f"ref-{preset.lower()}.gguf"
            imatrix = str(data_dir / "reference-imatrix.dat") if preset == "IQ2_XS" else None
            _core.quantize_model(str(pyqmoe.default_model_path()), str(out), preset, imatrix=imatrix)
            made[preset] = str(out)
        return made[preset]

    return get


@pytest.mark.parametrize("preset", ["F32", "F16"])
def test_reference_model_logits_match_transformers(vectors, quantized, preset):
    m = pyqmoe.Model(quantized(preset), n_ctx=64)
    got = m.eval(vectors["hf/tokens"].tolist())
    ref = vectors["hf/logits"]
    assert got.shape == ref.shape
    worst = float(np.abs(got - ref).max())
    assert worst <= 1e-2, f"{preset}: max |logit - transformers| = {worst}"
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M", "IQ4_XS", "IQ2_XS"])
def test_next_token_agrees_with_llamacpp_on_heldout_text(vectors, quantized, preset):
    path = quantized(preset)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == str(vectors[f"{preset}/sha256"]), f"{preset}: not the file llama.cpp ran on"
    m = pyqmoe.Model(path, n_ctx=512)
    windows, want = vectors["heldout/tokens"], vectors[f"{preset}/top1"]
    agree = []
    for w, ref in zip(windows, want):
        m.reset()
        agree.append(m.eval(w.tolist()).argmax(1) == ref)
    rate = float(np.mean(agree))
    assert rate >= 0.99, f"{preset}: top-1 agreement with llama.cpp {rate:.4f} over {windows.size} positions"


def test_greedy_generation_equals_llamacpp_at_q8_0(vectors, quantized):
    m = pyqmoe.Model(quantized("Q8_0"), n_ctx=128)
    for prompt, want in zip(vectors["greedy/prompts"], vectors["greedy/Q8_0"]):
        m.reset()
        logits = m.eval(prompt.tolist(), all_logits=False)
        got = []
        for _ in range(len(want)):
            t = int(logits[-1].argmax())
            got.append(t)
            logits = m.eval([t], all_logits=False)
        assert got == want.tolist()
