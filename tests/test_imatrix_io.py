"""Importance matrices: llama.cpp's legacy .dat and GGUF formats read back exactly (after
llama-quantize's normalisation), reach the quantizer per tensor and per expert, and missing or
mismatched data fails clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest

import pyqmoe
from pyqmoe import _core

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_preset_model import write_gguf_imatrix, write_legacy_imatrix  # noqa: E402

N_EXPERT, H, FF = 4, 256, 512


def run(*args, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "pyqmoe.cli", *map(str, args)], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


@pytest.fixture(scope="module")
def small_moe(tmp_path_factory):
    """One qwen3moe block with 256-wide rows: attn_q, and 4 experts' gate and down."""
    path = tmp_path_factory.mktemp("imatrix") / "small-moe.gguf"
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(1)
    w.add_expert_count(N_EXPERT)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    tensors = {
        "blk.0.attn_q.weight": rng.standard_normal((H, H), dtype=np.float32),
        "blk.0.ffn_gate_exps.weight": rng.standard_normal((N_EXPERT, FF, H), dtype=np.float32),
        "blk.0.ffn_down_exps.weight": rng.standard_normal((N_EXPERT, H, FF), dtype=np.float32),
        "blk.0.attn_norm.weight": np.ones(H, np.float32),
    }
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def _normalised(rng, tensors, count):
    """Per tensor: importance values that are exact after dividing sums by `count` (a power of 2)."""
    out = {}
    for name, a in tensors.items():
        if a.ndim < 2:
            continue
        n_mat = a.shape[0] if a.ndim == 3 else 1
        out[name] = (rng.integers(1, 1000, size=n_mat * a.shape[-1]) / 64.0).astype(np.float32)
    return out


def test_legacy_dat_reads_back_divided_by_ncall(tmp_path):
    rng = np.random.default_rng(1)
    sums = {f"blk.{i}.ffn_up.weight": rng.random(64, dtype=np.float32) * 100 for i in range(3)}
    ncalls = {"blk.0.ffn_up.weight": 7, "blk.1.ffn_up.weight": 0, "blk.2.ffn_up.weight": 1}
    p = tmp_path / "m.dat"
    write_legacy_imatrix(p, {k: (ncalls[k], v) for k, v in sums.items()}, last_call=42, dataset="wiki.train.raw")
    fmt, entries, datasets, chunks = _core.load_imatrix(str(p))
    assert (fmt, datasets, chunks) == ("legacy", ["wiki.train.raw"], 42)
    got = dict(entries)
    assert sorted(got) == sorted(sums)
    for k, v in sums.items():
        want = v / np.float32(ncalls[k]) if ncalls[k] > 0 else v
        assert np.array_equal(got[k], want.astype(np.float32)), k


def test_legacy_dat_without_the_dataset_tail(tmp_path):
    p = tmp_path / "old.dat"
    write_legacy_imatrix(p, {"a.weight": (2, np.array([2.0, 4.0], np.float32))})
    fmt, entries, datasets, chunks = _core.load_imatrix(str(p))
    assert (fmt, datasets, chunks) == ("legacy", [], 0)
    assert np.array_equal(dict(entries)["a.weight"], [1.0, 2.0])


def test_gguf_imatrix_reads_back_per_expert_with_zero_counts_as_ones(tmp_path):
    rng = np.random.default_rng(2)
    sums = rng.random((4, 32), dtype=np.float32) * 50
    counts = np.array([3, 0, 5, 1], np.float32)
    dense = rng.random((1, 16), dtype=np.float32)
    p = tmp_path / "imatrix.gguf"
    write_gguf_imatrix(p, {"blk.0.ffn_up_exps.weight": (sums, counts), "blk.0.attn_q.weight": (dense, [2.0])}, 7)
    fmt, entries, datasets, chunks = _core.load_imatrix(str(p))
    assert (fmt, datasets, chunks) == ("gguf", ["synthetic"], 7)
    got = dict(entries)
    want = sums / np.where(counts > 0, counts, 1)[:, None]
    want[1] = 1.0  # an expert that never saw a token
    assert np.array_equal(got["blk.0.ffn_up_exps.weight"], want.reshape(-1))
    assert np.array_equal(got["blk.0.attn_q.weight"], (dense / np.float32(2.0)).reshape(-1))


def test_format_is_chosen_by_content_not_extension(tmp_path):
    gguf_named_dat = tmp_path / "really-gguf.dat"
    write_gguf_imatrix(gguf_named_dat, {"x.weight": (np.ones((1, 8), np.float32), [1.0])})
    dat_named_gguf = tmp_path / "really-legacy.gguf"
    write_legacy_imatrix(dat_named_gguf, {"x.weight": (1, np.ones(8, np.float32))})
    assert _core.load_imatrix(str(gguf_named_dat))[0] == "gguf"
    assert _core.load_imatrix(str(dat_named_gguf))[0] == "legacy"


def test_bad_imatrix_files_fail_naming_the_problem(tmp_path):
    p = tmp_path / "cut.dat"
    write_legacy_imatrix(p, {"blk.0.attn_q.weight": (1, np.ones(64, np.float32))})
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(pyqmoe.GGUFFormatError, match=r"blk\.0\.attn_q\.weight.*values"):
        _core.load_imatrix(str(p))
    model_not_imatrix = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model_not_imatrix), "qwen3moe")
    w.add_tensor("a.weight", np.ones((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(pyqmoe.GGUFFormatError, match="imatrix.datasets"):
        _core.load_imatrix(str(model_not_imatrix))


def test_both_formats_reach_the_quantizer_per_expert(small_moe, tmp_path):
    """The model quantized with an imatrix file holds exactly pyqmoe.quantize(tensor, imatrix=...)
    of every tensor, for the legacy and the GGUF form of the same values."""
    path, tensors = small_moe
    values = _normalised(np.random.default_rng(3), tensors, 64)
    dat, gg = tmp_path / "m.dat", tmp_path / "m.gguf"
    write_legacy_imatrix(dat, {k: (64, v * 64) for k, v in values.items()})
    write_gguf_imatrix(
        gg,
        {
            k: (v.reshape(-1, tensors[k].shape[-1]) * 32, np.full(v.size // tensors[k].shape[-1], 32.0))
            for k, v in values.items()
        },
    )
    outs = {}
    for im in (dat, gg):
        out = tmp_path / f"q-{im.suffix[1:]}.gguf"
        run("quantize", "--pure", "--imatrix", im, path, out, "Q4_K")
        outs[im.suffix] = pyqmoe.GGUFFile(out)
    f = outs[".dat"]
    for name, a in tensors.items():
        got = f.tensor_bytes(name)
        assert np.array_equal(got, outs[".gguf"].tensor_bytes(name)), name
        if a.ndim < 2:
            continue
        assert f.tensor_info(name).type == "Q4_K"
        want = pyqmoe.quantize(a, "Q4_K", imatrix=values[name])
        assert np.array_equal(np.asarray(got).reshape(-1), want.reshape(-1)), name
        plain = pyqmoe.quantize(a, "Q4_K")
        assert not np.array_equal(want, plain), f"{name}: the imatrix changed nothing"
    meta = f.metadata
    assert meta["quantize.imatrix.entries_count"] == 3 and meta["quantize.imatrix.file"].endswith("m.dat")


def test_exclude_weights_quantizes_those_tensors_without_importance(small_moe, tmp_path):
    path, tensors = small_moe
    values = _normalised(np.random.default_rng(4), tensors, 1)
    dat = tmp_path / "m.dat"
    write_legacy_imatrix(dat, {k: (1, v) for k, v in values.items()})
    out = tmp_path / "q.gguf"
    run("quantize", "--pure", "--imatrix", dat, "--exclude-weights", "attn_q", path, out, "Q4_K")
    f = pyqmoe.GGUFFile(out)
    a = tensors["blk.0.attn_q.weight"]
    assert np.array_equal(
        np.asarray(f.tensor_bytes("blk.0.attn_q.weight")).reshape(-1), pyqmoe.quantize(a, "Q4_K").reshape(-1)
    )
    g = tensors["blk.0.ffn_gate_exps.weight"]
    want = pyqmoe.quantize(g, "Q4_K", imatrix=values["blk.0.ffn_gate_exps.weight"])
    assert np.array_equal(np.asarray(f.tensor_bytes("blk.0.ffn_gate_exps.weight")).reshape(-1), want.reshape(-1))
    rows, _ = _core.quantize_plan(str(path), "Q4_K", pure=True, imatrix=str(dat), include_weights=["ffn_down"])
    assert {r[0]: r[9] for r in rows if r[4]} == {
        "blk.0.attn_q.weight": False,
        "blk.0.ffn_gate_exps.weight": False,
        "blk.0.ffn_down_exps.weight": True,
    }
    p = run(
        "quantize", "--imatrix", dat, "--include-weights", "a", "--exclude-weights", "b", path, out, "Q4_K", check=False
    )
    assert p.returncode != 0 and "cannot be used together" in p.stderr


def test_missing_importance_data_names_every_tensor_and_writes_nothing(small_moe, tmp_path):
    path, tensors = small_moe
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = run("quantize", "--pure", path, out_dir / "q.gguf", "IQ2_XXS", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    msg = p.stderr.strip().splitlines()[-1]
    assert "3 tensor(s) need importance data" in msg and "--imatrix" in msg
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight"):
        assert f"{name} (IQ2_XXS)" in msg
    # With an imatrix that lacks one tensor, only that one is named.
    values = _normalised(np.random.default_rng(6), tensors, 1)
    del values["blk.0.ffn_down_exps.weight"]
    dat = tmp_path / "partial.dat"
    write_legacy_imatrix(dat, {k: (1, v) for k, v in values.items()})
    p = run("quantize", "--pure", "--imatrix", dat, path, out_dir / "q.gguf", "IQ2_XXS", check=False)
    msg = p.stderr.strip().splitlines()[-1]
    assert "1 tensor(s)" in msg and "blk.0.ffn_down_exps.weight (IQ2_XXS)" in msg and "attn_q" not in msg
    assert os.listdir(out_dir) == []
    # A dry run only warns.
    p = run("quantize", "--dry-run", "--pure", path, out_dir / "q.gguf", "IQ2_XXS")
    assert "NEEDS IMATRIX" in p.stdout and "warning: a real run needs importance data" in p.stderr


def test_imatrix_of_the_wrong_size_is_refused(small_moe, tmp_path):
    path, _ = small_moe
    dat = tmp_path / "wrong.dat"
    write_legacy_imatrix(dat, {"blk.0.ffn_gate_exps.weight": (1, np.ones(H, np.float32))})  # one expert's worth
    p = run("quantize", "--imatrix", dat, path, tmp_path / "q.gguf", "Q4_K_M", check=False)
    assert p.returncode == 1
    assert "blk.0.ffn_gate_exps.weight" in p.stderr and f"expected {H * N_EXPERT}" in p.stderr
