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
    f = pyqmoe.GGUFFile(path)
    digest = hashlib.sha256()
    for t in f.tensors:  # the tensors, not the metadata (which records the imatrix's path)
        digest.update(bytes(f.tensor_bytes(t.name)))
    assert digest.hexdigest() == str(vectors[f"{preset}/sha256"]), f"{preset}: not the tensors llama.cpp ran on"
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


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M"])
def test_perplexity_scores_equal_llamacpp(vectors, quantized, preset):
    """llama-perplexity's scoring (the second half of each 512-token window) against llama.cpp's
    own log-likelihoods of the same windows on the same file."""
    m = pyqmoe.Model(quantized(preset), n_ctx=512)
    windows = vectors["heldout/tokens"]
    got = []
    for w in windows:
        m.reset()
        got.append(m.score(w.tolist(), first=len(w) // 2).sum())
    want = vectors[f"{preset}/nll"]
    np.testing.assert_allclose(got, want, rtol=2e-3)
    n_scored = windows.shape[0] * (windows.shape[1] // 2 - 1)
    ppl, ppl_llama = np.exp(np.sum(got) / n_scored), np.exp(np.sum(want) / n_scored)
    assert abs(ppl / ppl_llama - 1) < 1e-3, (ppl, ppl_llama)


def test_perplexity_cli(tmp_path, data_dir):
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text((data_dir / "tiny-corpus.txt").read_text() * 4)
    tiny = str(data_dir / "tiny-qwen3moe-f32.gguf")
    run = [sys.executable, "-m", "pyqmoe.cli", "perplexity", "-m", tiny, "-f", str(text), "-c", "32", "--chunks", "3"]
    p = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("[1]") and "[3]" in p.stdout and "Final estimate: PPL = " in p.stdout
    ppl = float(p.stdout.split("PPL = ")[1].split()[0])
    m = pyqmoe.Model(tiny, n_ctx=32)
    ids = m.tokenize(text.read_text(), special=False)
    nll = []
    for i in range(3):
        m.reset()
        nll.append(m.score(ids[i * 32 : (i + 1) * 32], first=16))
    assert abs(ppl - float(np.exp(np.concatenate(nll).mean()))) < 1e-3 * ppl
    short = tmp_path / "short.txt"
    short.write_text("a b c")
    p = subprocess.run(run[:7] + [str(short), "-c", "32"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and "needs 64" in p.stderr
