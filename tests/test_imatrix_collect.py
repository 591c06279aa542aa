"""`pyqmoe imatrix`: llama-imatrix's statistics collected by the engine, written in llama.cpp's
legacy .dat and GGUF formats, checked against an independent numpy computation, read back by the
quantizer, and bad options failing in one line."""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyqmoe import _core
from pyqmoe.gguf_file import GGUFFile
from pyqmoe.tokenizer import GGUFTokenizer

DATA = Path(__file__).parent / "data"
MODEL = DATA / "tiny-qwen3moe-f32.gguf"
CORPUS = DATA / "tiny-corpus.txt"
CTX, CHUNKS = 64, 3
N_LAYER, N_EMBD, N_EXPERT, N_USED, FF_EXP, Q_OUT = 2, 64, 8, 2, 32, 64
PER_LAYER = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate_inp",
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
]
EXPERTS = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}


def run(*args, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "pyqmoe.cli", *map(str, args)], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


def n_cols(kind: str) -> int:
    # attn_output reads the attention heads, ffn_down_exps the expert's hidden layer
    return {"attn_output": Q_OUT, "ffn_down_exps": FF_EXP}.get(kind, N_EMBD)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix-collect")
    paths = {}
    for ext in ("dat", "gguf"):
        paths[ext] = d / f"imatrix.{ext}"
        run("imatrix", "-m", MODEL, "-f", CORPUS, "--ctx", CTX, "--chunks", CHUNKS, "-t", 2, "-o", paths[ext])
    return paths


def parse_dat(path: Path):
    """An independent reader of llama.cpp's legacy layout (save_imatrix_legacy)."""
    b = path.read_bytes()
    pos = 0

    def i32():
        nonlocal pos
        (v,) = struct.unpack_from("<i", b, pos)
        pos += 4
        return v

    entries = {}
    for _ in range(i32()):
        n = i32()
        name = b[pos : pos + n].decode()
        pos += n
        ncall, nval = i32(), i32()
        entries[name] = (ncall, np.frombuffer(b, "<f4", nval, pos).copy())
        pos += 4 * nval
    last_chunk = i32()
    n = i32()
    dataset = b[pos : pos + n].decode()
    assert pos + n == len(b)
    return entries, last_chunk, dataset


def corpus_tokens() -> list[int]:
    tok = GGUFTokenizer(GGUFFile(MODEL).metadata)
    text = CORPUS.read_text(encoding="utf-8")
    text = text[:-1] if text.endswith("\n") else text
    return tok.encode(text, special=False)[: CTX * CHUNKS]


def test_gguf_layout_matches_llama_imatrix(outputs):
    r = gguf.GGUFReader(str(outputs["gguf"]))
    fields = {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.datasets"] == [str(CORPUS)]
    assert (fields["imatrix.chunk_count"], fields["imatrix.chunk_size"]) == (CHUNKS, CTX)
    want = {}
    for il in range(N_LAYER):
        for kind in PER_LAYER:
            base, n_mat = f"blk.{il}.{kind}.weight", N_EXPERT if kind in EXPERTS else 1
            want[f"{base}.in_sum2"] = [n_cols(kind), n_mat]
            want[f"{base}.counts"] = [1, n_mat]
            want[f"{base}.in_sum"] = [n_cols(kind), n_mat]
    got = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert got == want  # output.weight and token_embd are not collected, as in llama.cpp
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    # weights in name order, each as in_sum2, counts, in_sum (save_imatrix's order)
    order = [f"{b}.{s}" for b in sorted({n.rsplit(".", 1)[0] for n in got}) for s in ("in_sum2", "counts", "in_sum")]
    assert [t.name for t in r.tensors] == order


def test_values_match_numpy_and_counts_follow_routing(outputs):
    r = gguf.GGUFReader(str(outputs["gguf"]))
    t = {x.name: np.asarray(x.data, np.float64).reshape(-1) for x in r.tensors}
    m = gguf.GGUFReader(str(MODEL))
    w = {x.name: np.asarray(x.data) for x in m.tensors}
    eps = float(m.fields["qwen3moe.attention.layer_norm_rms_epsilon"].contents())
    tokens = corpus_tokens()
    # layer 0's residual stream is the token embeddings: attn_q/k/v see RMSNorm(x) * attn_norm
    x = w["token_embd.weight"].reshape(-1, N_EMBD)[tokens].astype(np.float64)
    h = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * w["blk.0.attn_norm.weight"]
    expected = (h * h).sum(axis=0)
    for kind in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(t[f"blk.0.{kind}.weight.in_sum2"], expected, rtol=1e-4)
        np.testing.assert_allclose(t[f"blk.0.{kind}.weight.in_sum"], h.sum(axis=0), rtol=1e-3, atol=1e-3)
        assert t[f"blk.0.{kind}.weight.counts"].tolist() == [len(tokens)]
    for il in range(N_LAYER):
        for kind in EXPERTS:
            counts = t[f"blk.{il}.{kind}.weight.counts"]
            assert counts.sum() == len(tokens) * N_USED, (il, kind)
        # the three expert tensors of a layer see the same routing
        assert (
            t[f"blk.{il}.ffn_gate_exps.weight.counts"].tolist() == t[f"blk.{il}.ffn_down_exps.weight.counts"].tolist()
        )


def test_dat_layout_and_values_agree_with_gguf(outputs):
    entries, last_chunk, dataset = parse_dat(outputs["dat"])
    assert (last_chunk, dataset) == (CHUNKS, str(CORPUS))
    assert list(entries) == sorted(entries)
    r = gguf.GGUFReader(str(outputs["gguf"]))
    t = {x.name: np.asarray(x.data, np.float64).reshape(-1) for x in r.tensors}
    assert {f"{n}.in_sum2" for n in entries} == {n for n in t if n.endswith(".in_sum2")}
    for name, (ncall, vals) in entries.items():
        counts = t[f"{name}.counts"]
        assert ncall == -(-int(counts.max()) // CTX)
        per = np.repeat(counts, vals.size // counts.size)
        means = np.where(per > 0, t[f"{name}.in_sum2"] / np.maximum(per, 1), 1.0)
        np.testing.assert_allclose(vals, means * ncall, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("ext", ["dat", "gguf"])
def test_pyqmoe_reader_and_quantizer_take_the_files(outputs, ext, tmp_path):
    fmt, entries, datasets, chunk_count = _core.load_imatrix(str(outputs[ext]))
    assert (fmt, datasets, chunk_count) == ({"dat": "legacy"}.get(ext, ext), [str(CORPUS)], CHUNKS)
    assert len(entries) == N_LAYER * len(PER_LAYER)
    for name, v in entries:
        kind = name.split(".")[2]
        assert v.size == n_cols(kind) * (N_EXPERT if kind in EXPERTS else 1), name
    out, plain = tmp_path / "q.gguf", tmp_path / "plain.gguf"
    run("quantize", "--pure", "--imatrix", outputs[ext], MODEL, out, "IQ4_NL", 2)
    run("quantize", "--pure", MODEL, plain, "IQ4_NL", 2)
    assert out.read_bytes() != plain.read_bytes()  # the importance weights changed the rounding


def test_bad_options_fail_in_one_line(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    cases = [
        (["--ctx", 1, "-f", CORPUS], "--ctx"),
        (["--ctx", 4096, "-f", CORPUS], "--ctx"),
        (["--ctx", 64, "-f", short], "--ctx"),
        (["--chunks", 0, "-f", CORPUS], "--chunks"),
        (["-f", tmp_path / "missing.txt"], "--file"),
    ]
    for args, opt in cases:
        p = run("imatrix", "-m", MODEL, *args, "-o", tmp_path / "x.gguf", check=False)
        assert p.returncode != 0
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and opt in lines[0], p.stderr
    assert not (tmp_path / "x.gguf").exists()
    p = run(
        "imatrix", "-m", MODEL, "-f", CORPUS, "--ctx", 64, "--chunks", 1, "-o", tmp_path / "no" / "x.dat", check=False
    )
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "--output" in p.stderr, p.stderr
