"""pyqmoe's preset mixtures pick the same type as llama.cpp for every tensor of every preset.

The expected types were recorded from llama.cpp itself by scripts/make_llamacpp_preset_types.py
(tests/data/llamacpp_preset_types.json) on the synthetic models of tests/data/make_preset_model.py
and the tiny fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import pyqmoe
from pyqmoe import _core

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_preset_model import write_legacy_imatrix, write_model  # noqa: E402

REF = json.loads((DATA / "llamacpp_preset_types.json").read_text())


@pytest.fixture(scope="session")
def preset_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("preset-models")
    paths = {}
    for name in REF["models"]:
        if name == "tiny":
            paths[name] = DATA / "tiny-qwen3moe-f32.gguf"
        elif name == "ref":
            paths[name] = DATA.parent.parent / "pyqmoe" / "models" / "qwen3moe-ref-bf16.gguf"
        else:
            paths[name] = d / f"{name}.gguf"
            write_model(paths[name], name)
    imatrix = d / "dummy-imatrix.dat"
    # An entry for no tensor: only makes llama.cpp's "has an imatrix" true, as in the recording.
    write_legacy_imatrix(imatrix, {"dummy": (1, np.ones(4, np.float32))})
    return paths, imatrix


CASES = [(m, c) for m, v in REF["models"].items() for c in v["cases"]]


@pytest.mark.parametrize("model, case", CASES, ids=[f"{m}-{c['id']}" for m, c in CASES])
def test_plan_types_equal_llama_cpp(preset_models, model, case):
    paths, imatrix = preset_models
    if not paths[model].is_file():
        pytest.skip(f"{paths[model]} is not here")
    rules = [(f"{pat}={ty}", "--tensor-type") for pat, ty in case.get("tensor_types", [])]
    assert "error" not in case, case
    rows, _meta = _core.quantize_plan(
        str(paths[model]),
        case["preset"],
        rules,
        case.get("token_embedding_type"),
        case.get("output_tensor_type"),
        False,
        pure=case.get("pure", False),
        leave_output_tensor=case.get("leave_output", False),
        imatrix=str(imatrix) if case["imatrix"] else None,
        prune_layers=case.get("prune", []),
    )
    got = {r[0]: r[3] for r in rows}
    names = case.get("names", REF["models"][model]["names"])
    want = dict(zip(names, case["types"].split()))
    assert sorted(got) == sorted(want)
    diff = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not diff, f"pyqmoe vs llama.cpp: {diff}"


def test_file_type_and_block_count_metadata(preset_models):
    paths, _ = preset_models
    _rows, meta = _core.quantize_plan(str(paths["moe16"]), "q4_k", prune_layers=[3, 7, 11])
    m = {k: v for k, _t, v in meta}
    assert m["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert m["qwen3moe.block_count"] == 9


HASHES = DATA / "llamacpp_quant_hashes.json"


@pytest.fixture(scope="module")
def moe16_bf16(tmp_path_factory):
    """The input llama.cpp quantized for llamacpp_quant_hashes.json, regenerated, with its imatrix."""
    import hashlib

    from make_preset_model import imatrix_entries

    ref = json.loads(HASHES.read_text())
    d = tmp_path_factory.mktemp("moe16-bf16")
    model, imatrix = d / "moe16-bf16.gguf", d / "moe16.imatrix.dat"
    write_model(model, "moe16", "bf16")
    write_legacy_imatrix(imatrix, imatrix_entries(model), 10, "synthetic")
    for p, key in ((model, "model_sha256"), (imatrix, "imatrix_sha256")):
        if hashlib.sha256(p.read_bytes()).hexdigest() != ref[key]:
            pytest.skip(f"regenerated {p.name} differs from the recorded one (another numpy?)")
    return model, imatrix, ref


@pytest.mark.parametrize("preset", sorted(json.loads(HASHES.read_text())["presets"]))
def test_whole_model_bytes_equal_llama_cpp(moe16_bf16, tmp_path, preset):
    """pyqmoe's output equals llama.cpp's llama_model_quantize output tensor by tensor (same input,
    preset and imatrix; digests recorded by scripts/make_llamacpp_quant_hashes.py)."""
    import hashlib

    model, imatrix, ref = moe16_bf16
    out = tmp_path / "q.gguf"
    _core.quantize_model(str(model), str(out), preset, imatrix=str(imatrix))
    f = pyqmoe.GGUFFile(out)
    want = ref["presets"][preset]
    assert sorted(t.name for t in f.tensors) == sorted(want)
    bad = []
    for t in f.tensors:
        digest = hashlib.sha256(np.ascontiguousarray(f.tensor_bytes(t.name)).tobytes()).hexdigest()
        if [t.type, digest] != want[t.name]:
            bad.append((t.name, t.type, want[t.name][0]))
    assert not bad, f"{len(bad)} tensors differ from llama.cpp: {bad[:5]}"
