"""The `pyqmoe` command line, run as a user runs it (a subprocess), exit codes included."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest


def run(*args, check=True):
    # Run from a neutral directory so the source tree's pyqmoe/ (no compiled _core) cannot shadow
    # the installed package.
    p = subprocess.run(
        [sys.executable, "-m", "pyqmoe.cli", *map(str, args)], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


def test_inspect_prints_metadata_tensors_and_summary(tiny_model):
    out = run("inspect", tiny_model).stdout
    assert "general.architecture" in out and '"qwen3moe"' in out
    assert "blk.1.ffn_down_exps.weight" in out and "8x64x32" in out
    assert "(384 items)" in out  # the vocabulary is abbreviated, not dumped
    assert "f32: 27 tensors" in out
    assert "32.00 BPW" in out


def test_inspect_json(tiny_model):
    d = json.loads(run("inspect", "--json", tiny_model).stdout)
    assert d["summary"]["architecture"] == "qwen3moe"
    assert d["summary"]["tensors_per_type"] == {"f32": 27}
    assert d["metadata"]["tokenizer.ggml.tokens"]["value"]["length"] == 384
    assert d["tensors"][0]["name"] == "token_embd.weight"


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00", b"not a model at all, just text"])
def test_bad_files_give_one_line_and_nonzero_exit(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    p = run("inspect", bad, check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyqmoe: error:") and "bad.gguf" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_missing_file(tmp_path):
    p = run("inspect", tmp_path / "missing.gguf", check=False)
    assert p.returncode == 1 and "missing.gguf" in p.stderr and "Traceback" not in p.stderr


def test_models_path_points_at_a_readable_model():
    path = run("models", "path").stdout.strip()
    assert path.endswith(".gguf")
    assert "qwen3moe" in run("inspect", path).stdout
