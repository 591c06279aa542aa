"""`pyqmoe quantize` on the tiny fixture: types chosen, bytes against gguf, atomic output, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter

import pyqmoe
from pyqmoe import _core


def run(*args, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "pyqmoe.cli", *map(str, args)], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


def _one_error_line(p, *needles):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("pyqmoe: error:"), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def test_q8_0_output_matches_gguf_quantizer_and_keeps_norms(tiny_model, tmp_path):
    out = tmp_path / "q8.gguf"
    p = run("quantize", tiny_model, out, "q8_0", 2)
    assert "q8_0: 16 tensors" in p.stdout and "f32: 11 tensors" in p.stdout
    src = GGUFReader(tiny_model)
    dst = GGUFReader(out)
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for s, d in zip(src.tensors, dst.tensors):
        if s.name.endswith("norm.weight") or "ffn_gate_inp" in s.name:
            assert d.tensor_type == Q.F32 and np.array_equal(d.data, s.data), s.name
            continue
        assert d.tensor_type == Q.Q8_0, s.name
        rows = np.asarray(s.data, dtype=np.float32).reshape(-1, int(s.shape[0]))
        want = gguf.quants.quantize(rows, Q.Q8_0)
        assert np.array_equal(np.asarray(d.data).reshape(want.shape), want), s.name
    assert dst.fields["general.file_type"].parts[-1][0] == 7  # LlamaFileType.MOSTLY_Q8_0


def test_dry_run_plan_equals_what_a_real_run_writes(tiny_model, tmp_path):
    args = ["--tensor-type", r"\.1\.attn_v=f16", "--token-embedding-type", "bf16", "--output-tensor-type", "f16"]
    plan = run("quantize", "--dry-run", *args, tiny_model, tmp_path / "never.gguf", "Q8_0").stdout
    assert not (tmp_path / "never.gguf").exists()
    out = tmp_path / "real.gguf"
    run("quantize", *args, tiny_model, out, "Q8_0")
    f = pyqmoe.GGUFFile(out)
    for t in f.tensors:
        line = next(ln for ln in plan.splitlines() if ln.startswith(t.name + " "))
        assert f"-> {t.type}" in line or ("(copy)" in line and t.type in line), (t.name, line)
    assert f.tensor_info("token_embd.weight").type == "BF16"
    assert f.tensor_info("output.weight").type == "F16"
    assert f.tensor_info("blk.1.attn_v.weight").type == "F16"
    assert f.tensor_info("blk.0.attn_v.weight").type == "Q8_0"
    total_mib = sum(t.nbytes for t in f.tensors) / 2**20
    assert f"({total_mib:.2f} MiB" in plan


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--tensor-type", "attn(=q8_0"], ["--tensor-type", "bad regex"]),
        (["--tensor-type", "attn=q9_z"], ["unknown tensor type 'q9_z'"]),
        (["--custom-q", "attn=q8_0,ffn"], ["--custom-q 'ffn'", "REGEX=TYPE"]),
        (["--output-tensor-type", "nope"], ["unknown tensor type 'nope'"]),
    ],
)
def test_bad_options_fail_cleanly_and_write_nothing(tiny_model, tmp_path, args, needles):
    out = tmp_path / "out.gguf"
    _one_error_line(run("quantize", *args, tiny_model, out, "q8_0", check=False), *needles)
    assert os.listdir(tmp_path) == []


def test_unknown_default_type(tiny_model, tmp_path):
    _one_error_line(run("quantize", tiny_model, tmp_path / "o.gguf", "Q4_K_XXL", check=False), "Q4_K_XXL")


def test_requantize_needs_the_flag(tiny_model, tmp_path):
    q8 = tmp_path / "q8.gguf"
    run("quantize", tiny_model, q8, "q8_0")
    _one_error_line(
        run("quantize", q8, tmp_path / "f16.gguf", "f16", check=False), "already quantized", "--allow-requantize"
    )
    assert not (tmp_path / "f16.gguf").exists()
    run("quantize", "--allow-requantize", q8, tmp_path / "f16.gguf", "f16")
    a = pyqmoe.GGUFFile(q8).dequantize("blk.0.attn_q.weight")
    b = pyqmoe.GGUFFile(tmp_path / "f16.gguf").dequantize("blk.0.attn_q.weight")
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def _model_with_nan(path):
    w = GGUFWriter(str(path), "qwen3moe")
    rng = np.random.default_rng(1)
    for i in range(4):
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((32, 64), dtype=np.float32))
    bad = rng.standard_normal((32, 64), dtype=np.float32)
    bad[3, 7] = np.nan
    w.add_tensor("blk.4.attn_q.weight", bad)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_nan_weights_fail_naming_the_tensor_and_leave_no_output(tmp_path):
    src = tmp_path / "in" / "nan.gguf"
    src.parent.mkdir()
    _model_with_nan(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = run("quantize", src, out_dir / "q.gguf", "q8_0", check=False)
    _one_error_line(p, "blk.4.attn_q.weight", "row 3, column 7", "not finite")
    assert os.listdir(out_dir) == []  # no output, no temp file


def test_interrupt_mid_run_leaves_no_output(tiny_model, tmp_path):
    def progress(event, *args):
        if event == "tensor" and args[0] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _core.quantize_model(str(tiny_model), str(tmp_path / "q.gguf"), "q8_0", progress=progress)
    assert os.listdir(tmp_path) == []


def test_split_output_loads_as_one_model(tiny_model, tmp_path):
    out = tmp_path / "q.gguf"
    p = run("quantize", "--split-max-tensors", "10", tiny_model, out, "q8_0")
    parts = sorted(tmp_path.iterdir())
    assert [x.name for x in parts] == [f"q-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert str(parts[0]) in p.stdout
    f = pyqmoe.GGUFFile(parts[2])
    assert len(f.tensors) == 27 and f.metadata["general.architecture"] == "qwen3moe"
    whole = tmp_path / "whole.gguf"
    run("quantize", tiny_model, whole, "q8_0")
    g = pyqmoe.GGUFFile(whole)
    for t in g.tensors:
        assert np.array_equal(f.tensor_bytes(t.name), g.tensor_bytes(t.name))


def test_thread_count_does_not_change_output(tiny_model, tmp_path):
    run("quantize", tiny_model, tmp_path / "a.gguf", "q8_0", 1)
    run("quantize", tiny_model, tmp_path / "b.gguf", "q8_0", 2)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
