"""The inference engine on the tiny Qwen3-MoE fixture: logits against transformers and llama.cpp
(stored), KV-cache consistency, tokenizer against the HF tokenizer it was trained with, generation."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest

import pyqmoe


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tokens(data_dir) -> list[int]:
    return np.load(data_dir / "tiny-qwen3moe-tokens.npy").tolist()


@pytest.fixture(scope="module")
def model(tiny_model):
    return pyqmoe.Model(tiny_model, n_ctx=64)


def test_logits_match_transformers(model, tokens, data_dir):
    ref = np.load(data_dir / "tiny-qwen3moe-logits.npy")
    model.reset()
    got = model.eval(tokens)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert rel_diff(got, ref) < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_incremental_eval_equals_batched(model, tokens):
    model.reset()
    batched = model.eval(tokens)
    model.reset()
    one_by_one = np.concatenate([model.eval([t]) for t in tokens])
    assert rel_diff(one_by_one, batched) < 1e-6
    # uneven chunks, last-token-only logits
    model.reset()
    model.eval(tokens[:5])
    model.eval(tokens[5:17])
    last = model.eval(tokens[17:], all_logits=False)
    assert last.shape == (1, batched.shape[1])
    assert rel_diff(last[0], batched[-1]) < 1e-6
    assert model.n_past == len(tokens) and model.cached_tokens == tokens


def test_truncate_and_reset(model, tokens):
    model.reset()
    full = model.eval(tokens)
    model.truncate(10)
    assert model.n_past == 10
    again = model.eval(tokens[10:])
    assert rel_diff(again, full[10:]) < 1e-6
    model.reset()
    assert model.n_past == 0
    assert rel_diff(model.eval(tokens[:3]), full[:3]) < 1e-6


def test_f16_kv_cache_is_close(tiny_model, tokens, data_dir):
    ref = np.load(data_dir / "tiny-qwen3moe-logits.npy")
    m = pyqmoe.Model(tiny_model, n_ctx=32, kv_type="f16", threads=1)
    assert rel_diff(m.eval(tokens), ref) < 2e-3


@pytest.mark.parametrize(
    "kv_type, kv_type_v, tol", [("q8_0", None, 2e-2), ("q8_0", "f16", 2e-2), ("f16", "q8_0", 2e-2)]
)
def test_q8_0_kv_cache_is_close(tiny_model, tokens, data_dir, kv_type, kv_type_v, tol):
    """A q8_0 cache (llama.cpp's -ctk/-ctv q8_0) stores every 32 values as one int8 block: close
    to transformers, and its rounding visibly differs from the f32 cache's (it is really used)."""
    ref = np.load(data_dir / "tiny-qwen3moe-logits.npy")
    m = pyqmoe.Model(tiny_model, n_ctx=32, kv_type=kv_type, kv_type_v=kv_type_v, threads=1)
    got = m.eval(tokens)
    assert rel_diff(got, ref) < tol
    assert rel_diff(got, ref) > 1e-6
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_kv_type_errors(tiny_model):
    with pytest.raises(ValueError, match="unknown KV cache type 'q4_0'"):
        pyqmoe.Model(tiny_model, kv_type="q4_0")
    with pytest.raises(ValueError, match="kv_type_v"):
        pyqmoe.Model(tiny_model, kv_type_v="bf16")


def test_q8_0_matches_llamacpp(tiny_model, tokens, data_dir, tmp_path):
    """`pyqmoe quantize` to Q8_0, then the engine against llama.cpp's stored logits for that file."""
    stored = np.load(data_dir / "tiny-qwen3moe-q8_0-llamacpp-logits.npz")
    assert stored["tokens"].tolist() == tokens
    q8 = tmp_path / "tiny-q8_0.gguf"
    p = subprocess.run(
        [sys.executable, "-m", "pyqmoe.cli", "quantize", str(tiny_model), str(q8), "Q8_0"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    assert p.returncode == 0, p.stderr
    if hashlib.sha256(q8.read_bytes()).hexdigest() != str(stored["sha256"]):
        warnings.warn("Q8_0 file differs from the one llama.cpp ran on; rerun make_llamacpp_logits.py", stacklevel=1)
    got = pyqmoe.Model(q8, n_ctx=64).eval(tokens)
    ref = stored["logits"]
    assert (got.argmax(1) == ref.argmax(1)).all()
    # Same Q8_0 activation quantization as ggml: agreement to float rounding (measured: exact).
    assert rel_diff(got, ref) < 1e-4


# Measured against llama.cpp: Q4_1/Q5_0/Q5_1 agree exactly, Q4_0/IQ4_NL to ~1e-7 (same integer
# dots on the same Q8_0/Q8_1 activations, summed in ggml's AVX2 lane order).
LEGACY_TOLERANCE = {"Q4_0": 1e-5, "Q4_1": 1e-5, "Q5_0": 1e-5, "IQ4_NL": 1e-5, "Q5_1": 1e-5}


@pytest.mark.parametrize("qtype", sorted(LEGACY_TOLERANCE))
def test_legacy_types_match_llamacpp(tiny_model, tokens, data_dir, tmp_path, qtype):
    stored = np.load(data_dir / "tiny-qwen3moe-legacy-llamacpp-logits.npz")
    assert stored["tokens"].tolist() == tokens
    out = tmp_path / f"tiny-{qtype}.gguf"
    pyqmoe._core.quantize_model(str(tiny_model), str(out), qtype, pure=True)
    if hashlib.sha256(out.read_bytes()).hexdigest() != str(stored[f"{qtype.lower()}/sha256"]):
        warnings.warn(f"{qtype} file differs from the one llama.cpp ran on", stacklevel=1)
    got = pyqmoe.Model(out, n_ctx=64).eval(tokens)
    ref = stored[f"{qtype.lower()}/logits"]
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert rel_diff(got, ref) < LEGACY_TOLERANCE[qtype]


def test_tokenizer_matches_hf(model, data_dir, tokens):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(data_dir / "tiny-qwen3moe-tokenizer.json"))
    texts = [
        "Python is an easy to learn, powerful programming language. It has efficient high-level data structures.",
        "Python is an easy to learn, powerful programming language.\nIt's 2024: 3 + 4 = 7!",
        "<|im_start|>user\nHello, wörld! ünïcödé 漢字 🤖\n\n  tabs\there<|im_end|>\n",
        "   leading and trailing spaces   ",
        "",
    ]
    for text in texts:
        ids = model.tokenize(text)
        assert ids == hf.encode(text).ids, text
        assert model.detokenize(ids) == text
    assert model.tokenize(texts[0])[: len(tokens)] == tokens
    im_start = hf.token_to_id("<|im_start|>")
    assert model.tokenize("<|im_start|>") == [im_start]
    assert im_start not in model.tokenize("<|im_start|>", special=False)


def test_chat_template_is_chatml(model):
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_generate_greedy_follows_argmax(model):
    prompt = model.tokenize("Python is")
    model.reset()
    text = model.generate(prompt, max_tokens=8, stream=False, stop_at_eos=False)
    # the same chain by hand
    model.reset()
    ids = list(prompt)
    out = []
    logits = model.eval(ids, all_logits=False)
    for _ in range(8):
        t = int(logits[0].argmax())
        out.append(t)
        logits = model.eval([t], all_logits=False)
    assert text == model.detokenize(out)
    # streaming gives the same text; the cached prompt prefix is reused
    assert "".join(model.generate(prompt, max_tokens=8, stop_at_eos=False)) == text


def test_sampling_is_seeded(model):
    kw = dict(max_tokens=12, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, stream=False, stop_at_eos=False)
    a = model.generate("Python", seed=5, **kw)
    b = model.generate("Python", seed=5, **kw)
    assert a == b
    assert len({model.generate("Python", seed=s, **kw) for s in range(6)}) > 1


def test_chat_stops_and_streams(model):
    pieces = list(model.chat([{"role": "user", "content": "What is Python?"}], max_tokens=5))
    assert all(isinstance(p, str) for p in pieces)


def test_errors(model, tiny_model):
    model.reset()
    with pytest.raises(pyqmoe.PyqmoeError, match="out of range"):
        model.eval([100000])
    small = pyqmoe.Model(tiny_model, n_ctx=4)
    with pytest.raises(pyqmoe.PyqmoeError, match="context is full"):
        small.eval([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="kv_type"):
        pyqmoe.Model(tiny_model, kv_type="q4")
    with pytest.raises(pyqmoe.GGUFFormatError, match="not a GGUF file"):
        pyqmoe.Model(tiny_model.parent / "tiny-qwen3moe-tokenizer.json")


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "pyqmoe.cli", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=tempfile.gettempdir(),
    )


def test_cli_generate_chat_bench(tiny_model):
    p = run_cli("generate", "-m", tiny_model, "-p", "Python is", "-n", "6")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Python is")
    p = run_cli("chat", "-m", tiny_model, "-n", "4", stdin="hello\nmore\n")
    assert p.returncode == 0, p.stderr
    p = run_cli("bench", "-m", tiny_model, "-p", "16", "-n", "4", "-t", "1", "--json")
    assert p.returncode == 0, p.stderr
    import json

    r = json.loads(p.stdout)
    assert r["threads"] == 1 and r["pp_tok_s"] > 0 and r["tg_tok_s"] > 0
    p = run_cli("generate", "-m", tiny_model, "-p", "Python is", "-n", "4", "-ctk", "q8_0", "-ctv", "q8_0")
    assert p.returncode == 0, p.stderr
    p = run_cli("generate", "-m", tiny_model, "-p", "x", "-ctk", "q4_0")
    assert p.returncode != 0 and "q4_0" in p.stderr


@pytest.mark.parametrize(
    "which, qtype",
    [("tiny", "F32"), ("tiny", "Q8_0"), ("ref", "BF16")] + [("ref", f"Q{b}_K") for b in range(2, 7)],
)
def test_logits_are_the_same_bits_without_simd(tiny_model, tokens, tmp_path, which, qtype):
    """The portable kernels sum in the AVX2 kernels' order: a machine without AVX2 (or
    PYQMOE_NO_SIMD=1) gives bit-identical logits. Not yet so for Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL and
    the i-quants, whose portable kernels agree only to float rounding. The k-quants need rows of
    256, so they run on the bundled model."""
    from pyqmoe import _core

    src = tiny_model if which == "tiny" else pyqmoe.default_model_path()
    path = tmp_path / f"{which}-{qtype.lower()}.gguf"
    _core.quantize_model(str(src), str(path), qtype, pure=True)
    script = (
        "import sys, numpy as np, pyqmoe; m = pyqmoe.Model(sys.argv[1], n_ctx=64, threads=1); "
        "np.save(sys.argv[2], m.eval([int(t) for t in sys.argv[3].split(',')]))"
    )
    out = tmp_path / "scalar.npy"
    env = dict(os.environ, PYQMOE_NO_SIMD="1")
    p = subprocess.run(
        [sys.executable, "-c", script, str(path), str(out), ",".join(map(str, tokens))],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    assert p.returncode == 0, p.stderr
    simd = pyqmoe.Model(path, n_ctx=64, threads=1).eval(tokens)
    scalar = np.load(out)
    assert (simd.view(np.uint32) == scalar.view(np.uint32)).all(), np.abs(simd - scalar).max()


def test_kl_divergence_api_and_cli(tiny_model, tokens, tmp_path, data_dir):
    from pyqmoe import _core

    q8 = tmp_path / "tiny-q8_0.gguf"
    _core.quantize_model(str(tiny_model), str(q8), "Q8_0", pure=True)
    base, model = pyqmoe.Model(tiny_model, n_ctx=64), pyqmoe.Model(q8, n_ctx=64)
    first = 8
    logits_b = base.eval(tokens)
    logits_q = model.eval(tokens)
    model.reset()
    kl, same, nll, nll_b = model.kl_divergence(tokens, first, logits_b[first:])

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))

    lb, lq = log_softmax(logits_b[first:]), log_softmax(logits_q[first:])
    want = (np.exp(lb) * (lb - lq)).sum(1)
    np.testing.assert_allclose(kl, np.maximum(want, 0), rtol=1e-9, atol=1e-12)
    assert (same == (logits_b[first:].argmax(1) == logits_q[first:].argmax(1))).all()
    targets = np.array(tokens[first + 1 :])
    np.testing.assert_allclose(nll, -lq[np.arange(len(targets)), targets], rtol=1e-9)
    np.testing.assert_allclose(nll_b, -lb[np.arange(len(targets)), targets], rtol=1e-9)
    assert kl.mean() > 0
    base.reset()
    kl0, same0, _, _ = base.kl_divergence(tokens, first, logits_b[first:])
    assert (kl0 == 0).all() and same0.all()
    with pytest.raises(ValueError, match="shape"):
        model.kl_divergence(tokens, first, logits_b)

    text = tmp_path / "text.txt"
    text.write_text((data_dir / "tiny-corpus.txt").read_text() * 4)
    p = run_cli("kld", "-b", tiny_model, "-m", q8, "-f", text, "-c", "32", "--chunks", "2")
    assert p.returncode == 0, p.stderr
    assert "Mean    KLD:" in p.stdout and "Same top token:" in p.stdout and "ratio =" in p.stdout
    p = run_cli("kld", "-b", tiny_model, "-m", tiny_model, "-f", text, "-c", "32", "--chunks", "2")
    assert "Mean    KLD:   0.000000" in p.stdout and "Same top token: 100.000 %" in p.stdout


def test_dump_dir_writes_named_intermediates(tiny_model, tmp_path):
    """PYQMOE_DUMP_DIR (debugging against llama.cpp's graph) writes the last token's row of each
    named intermediate."""
    script = "import sys, pyqmoe; pyqmoe.Model(sys.argv[1], n_ctx=16).eval([1, 2, 3])"
    env = dict(os.environ, PYQMOE_DUMP_DIR=str(tmp_path))
    p = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr
    m = pyqmoe.Model(tiny_model, n_ctx=16)
    n_embd = m.config["n_embd"]
    names = {f.name for f in tmp_path.iterdir()}
    assert {"attn_norm-0.f32", "kqv_out-0.f32", "l_out-0.f32", "result_norm.f32"} <= names
    assert (tmp_path / "l_out-0.f32").stat().st_size == 4 * n_embd
