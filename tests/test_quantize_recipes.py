"""Recipes (built-in and TOML files), --prune-layers, --keep-split and the seed command lines."""

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
from pyqmoe import _core, recipes

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_preset_model import imatrix_entries, write_legacy_imatrix, write_model  # noqa: E402


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


@pytest.fixture(scope="module")
def moe16(tmp_path_factory):
    """The synthetic moe16 model (BF16, 12 layers, 16 experts) and a random imatrix for it."""
    d = tmp_path_factory.mktemp("moe16")
    path = d / "in-BF16.gguf"
    write_model(path, "moe16", "bf16")
    imatrix = d / "imatrix.dat"
    write_legacy_imatrix(imatrix, imatrix_entries(path), 10, "synthetic")
    return path, imatrix


def _types(path) -> dict[str, str]:
    return {t.name: t.type for t in pyqmoe.GGUFFile(path).tensors}


# ---- recipes ---------------------------------------------------------------------------------


def test_recipes_list_and_show():
    out = run("recipes", "list").stdout
    assert "moe-2bit-experts" in out and "Q4_K_L " in out and "Q3_K_XL" in out
    assert "F16_L" not in out
    show = run("recipes", "show", "moe-2bit-experts").stdout
    assert 'pattern = "ffn_(gate|up)_exps"' in show and show.lstrip().startswith("#")
    r = recipes.parse(show, "moe-2bit-experts")
    assert r.rules[0] == ("ffn_(gate|up)_exps", "IQ2_S") and r.output_tensor_type == "Q6_K"
    l_variant = recipes.load("q4_k_l")
    assert (l_variant.default, l_variant.token_embedding_type, l_variant.output_tensor_type) == (
        "Q4_K_M",
        "Q8_0",
        "Q8_0",
    )
    assert recipes.load("Q3_K_XL").default == "Q3_K_L"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("rules = [", "not valid TOML"),
        ('defualt = "Q4_K_M"', "unknown key(s) defualt"),
        ('default = "Q4_K_XXL"', "default 'Q4_K_XXL' is not a preset or tensor type"),
        ('output_tensor_type = "Q4_K_M"', "output_tensor_type 'Q4_K_M' is not a tensor type"),
        ('[[rules]]\npattern = "attn"', "rules[0] must have exactly the keys pattern and type"),
        ('[[rules]]\npattern = ""\ntype = "Q4_K"', "rules[0].pattern must be a non-empty string"),
        ('[[rules]]\npattern = "attn"\ntype = "Q9_K"', "rules[0].type 'Q9_K' is not a tensor type"),
        ("rules = 3", "rules must be an array of tables"),
    ],
)
def test_recipe_toml_errors_name_the_key(text, needle):
    with pytest.raises(recipes.RecipeError) as e:
        recipes.parse(text, "r.toml")
    assert needle in str(e.value) and "recipe r.toml" in str(e.value)


def test_recipe_file_with_comments_applies_and_command_line_rules_win(moe16, tmp_path):
    path, _ = moe16
    toml = tmp_path / "mine.toml"
    toml.write_text(
        "# my recipe\n"
        'default = "Q4_K_S"  # for everything else\n'
        'output_tensor_type = "Q8_0"\n'
        "[[rules]]\n"
        'pattern = "ffn_(gate|up)_exps"  # experts\n'
        'type = "Q3_K"\n'
        "[[rules]]\n"
        'pattern = "blk\\\\.0\\\\."\n'
        'type = "Q6_K"\n'
    )
    plan = run(
        "quantize", "--dry-run", "--recipe", toml, "--tensor-type", r"blk\.1\.ffn_gate=q5_k", path, tmp_path / "x.gguf"
    )
    lines = {ln.split()[0]: ln for ln in plan.stdout.splitlines() if ln.startswith(("blk.", "output", "token"))}
    assert "-> Q3_K" in lines["blk.2.ffn_up_exps.weight"]
    assert "-> Q5_K" in lines["blk.1.ffn_gate_exps.weight"]  # command line before the recipe
    assert "-> Q6_K" in lines["blk.0.attn_v.weight"]
    assert "-> Q8_0" in lines["token_embd.weight"]  # tied embeddings: the embedding is typed as the output
    # A recipe's default is only a default: TYPE on the command line wins.
    plan = run("quantize", "--dry-run", "--recipe", toml, path, tmp_path / "x.gguf", "Q8_0")
    assert "-> Q8_0" in next(ln for ln in plan.stdout.splitlines() if ln.startswith("blk.3.attn_q.weight"))


def test_bad_recipe_regex_and_unknown_recipe_fail_cleanly(moe16, tmp_path):
    path, _ = moe16
    toml = tmp_path / "bad.toml"
    toml.write_text('[[rules]]\npattern = "attn("\ntype = "Q4_K"\n')
    _one_error_line(
        run("quantize", "--recipe", toml, path, tmp_path / "o.gguf", "Q4_K_M", check=False), "rules[0]", "bad regex"
    )
    _one_error_line(
        run("quantize", "--recipe", "nope", path, tmp_path / "o.gguf", check=False), "no recipe named 'nope'"
    )
    p = run("quantize", path, tmp_path / "o.gguf", check=False)
    assert p.returncode == 2 and "missing TYPE" in p.stderr
    assert os.listdir(tmp_path) == ["bad.toml"]


def test_builtin_2bit_experts_recipe(moe16, tmp_path):
    path, imatrix = moe16
    out = tmp_path / "o.gguf"
    run("quantize", "--recipe", "moe-2bit-experts", "--imatrix", imatrix, path, out)
    t = _types(out)
    assert t["blk.5.ffn_gate_exps.weight"] == "IQ2_S" and t["blk.5.ffn_up_exps.weight"] == "IQ2_S"
    # ffn_down_exps rows of 96 are not whole 256-blocks: IQ3_S falls back to IQ4_NL, as in llama.cpp.
    assert t["blk.5.ffn_down_exps.weight"] == "IQ4_NL"
    assert t["blk.5.attn_q.weight"] == "Q4_K" and t["blk.5.attn_output.weight"] == "Q4_K"
    assert t["token_embd.weight"] == "Q6_K"
    assert pyqmoe.GGUFFile(out).metadata["general.file_type"] == 26  # the recipe's default: IQ3_S


# ---- --prune-layers --------------------------------------------------------------------------


def _layered_model(path, n_layer=6):
    rng = np.random.default_rng(9)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(n_layer)
    w.add_head_count(4)
    w.add_expert_count(2)
    w.add_array("qwen3moe.per_layer_test", list(range(100, 100 + n_layer)))
    w.add_array("qwen3moe.other_array", [1, 2, 3])
    data = {}
    for i in range(n_layer):
        data[f"blk.{i}.attn_norm.weight"] = rng.standard_normal(256, dtype=np.float32)
        data[f"blk.{i}.attn_q.weight"] = rng.standard_normal((256, 256), dtype=np.float32)
        data[f"blk.{i}.ffn_down_exps.weight"] = rng.standard_normal((2, 256, 256), dtype=np.float32)
    data["output.weight"] = rng.standard_normal((64, 256), dtype=np.float32)
    for k, v in data.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return data


def test_prune_renumbers_blocks_metadata_and_imatrix(tmp_path):
    src = tmp_path / "m.gguf"
    data = _layered_model(src)
    rng = np.random.default_rng(10)
    entries = {}
    for k, v in data.items():
        if v.ndim >= 2:
            n = v.shape[-1] * (v.shape[0] if v.ndim == 3 else 1)
            entries[k] = (1, rng.random(n, dtype=np.float32) + 0.1)
    dat = tmp_path / "m.dat"
    write_legacy_imatrix(dat, entries)
    out = tmp_path / "pruned.gguf"
    run("quantize", "--pure", "--prune-layers", "1,4", "--imatrix", dat, src, out, "Q4_K")
    f = pyqmoe.GGUFFile(out)
    assert f.metadata["qwen3moe.block_count"] == 4
    assert f.metadata["qwen3moe.per_layer_test"] == [100, 102, 103, 105]
    assert f.metadata["qwen3moe.other_array"] == [1, 2, 3]
    assert sorted({t.name.split(".")[1] for t in f.tensors if t.name.startswith("blk.")}) == ["0", "1", "2", "3"]
    for new, old in [(0, 0), (1, 2), (2, 3), (3, 5)]:
        assert np.array_equal(f.tensor(f"blk.{new}.attn_norm.weight"), data[f"blk.{old}.attn_norm.weight"])
        # The imatrix entry used is the one of the block's old name.
        for kind in ("attn_q", "ffn_down_exps"):
            a = data[f"blk.{old}.{kind}.weight"]
            want = pyqmoe.quantize(a, "Q4_K", imatrix=entries[f"blk.{old}.{kind}.weight"][1])
            got = np.asarray(f.tensor_bytes(f"blk.{new}.{kind}.weight")).reshape(-1)
            assert np.array_equal(got, want.reshape(-1)), (new, old, kind)
    rows, _ = _core.quantize_plan(str(src), "Q4_K", prune_layers=[1, 4])
    assert ("blk.3.attn_q.weight", "blk.5.attn_q.weight") in {(r[0], r[10]) for r in rows}
    p = run("quantize", "--prune-layers", "1,x", src, out, "Q4_K", check=False)
    assert p.returncode == 2 and "--prune-layers" in p.stderr


# ---- --keep-split ----------------------------------------------------------------------------


def test_keep_split_writes_parts_like_the_input(tiny_model, tmp_path):
    parts = pyqmoe.rewrite(tiny_model, tmp_path / "in.gguf", split_max_tensors=10)
    assert len(parts) == 3
    out = tmp_path / "out" / "q.gguf"
    out.parent.mkdir()
    run("quantize", "--keep-split", parts[1], out, "Q8_0")
    got = sorted(out.parent.iterdir())
    assert [p.name for p in got] == [f"q-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for src_part, dst_part in zip(parts, got):
        assert [t.name for t in gguf.GGUFReader(src_part).tensors] == [
            t.name for t in gguf.GGUFReader(dst_part).tensors
        ]
    whole = tmp_path / "whole.gguf"
    run("quantize", tiny_model, whole, "Q8_0")
    a, b = pyqmoe.GGUFFile(got[0]), pyqmoe.GGUFFile(whole)
    for t in b.tensors:
        assert np.array_equal(a.tensor_bytes(t.name), b.tensor_bytes(t.name))
    p = run("quantize", "--keep-split", "--split-max-tensors", "5", parts[0], tmp_path / "x.gguf", "Q8_0", check=False)
    _one_error_line(p, "--keep-split cannot be combined")


# ---- the seed command lines ------------------------------------------------------------------


def test_seed_custom_q_imatrix_iq4_xs_with_threads(moe16, tmp_path):
    path, imatrix = moe16
    custom = r"ffn_down_exps=iq4_nl,blk\.[0-3]\.attn_(q|k)=q6_k"
    run("quantize", "--custom-q", custom, "--imatrix", imatrix, path, tmp_path / "out.gguf", "IQ4_XS", 24)
    t = _types(tmp_path / "out.gguf")
    assert t["blk.7.ffn_down_exps.weight"] == "IQ4_NL" and t["blk.2.attn_k.weight"] == "Q6_K"
    assert t["blk.7.ffn_gate_exps.weight"] == "IQ4_XS" and t["blk.7.attn_q.weight"] == "IQ4_XS"


def test_seed_requantize_q8_0_to_iq3_s_with_rules(moe16, tmp_path):
    path, imatrix = moe16
    src = tmp_path / "src-Q8_0.gguf"
    run("quantize", path, src, "Q8_0")
    run(
        "quantize", "--allow-requantize", "--imatrix", imatrix,
        "--tensor-type", "ffn_gate_exps=IQ2_S", "--tensor-type", "ffn_down_exps=IQ3_S", "--tensor-type", "attn_q=Q4_K",
        "--token-embedding-type", "Q6_K", "--output-tensor-type", "Q6_K",
        src, tmp_path / "out.gguf", "IQ3_S",
    )  # fmt: skip
    t = _types(tmp_path / "out.gguf")
    assert t["blk.4.ffn_gate_exps.weight"] == "IQ2_S" and t["blk.4.attn_q.weight"] == "Q4_K"
    assert t["blk.4.ffn_down_exps.weight"] == "IQ4_NL"  # IQ3_S on rows of 96 falls back
    assert t["blk.4.ffn_up_exps.weight"] == "IQ3_S" and t["token_embd.weight"] == "Q6_K"


def test_seed_prune_with_attn_rule_and_layer_wise_rule(moe16, tmp_path):
    path, imatrix = moe16
    f32 = tmp_path / "model-f32.gguf"
    run("quantize", path, f32, "F32")
    out = tmp_path / "model-q4_k_m.gguf"
    run("quantize", "--tensor-type", "attn=q6_k", "--prune-layers", "3,7,11", "--imatrix", imatrix, f32, out, "q4_k_m")
    f = pyqmoe.GGUFFile(out)
    assert f.metadata["qwen3moe.block_count"] == 9 and f.metadata["general.file_type"] == 15
    t = _types(out)
    assert not any(n.startswith("blk.9.") for n in t)
    assert t["blk.8.attn_v.weight"] == "Q6_K" and t["blk.8.ffn_up_exps.weight"] == "Q4_K"
    rule = r"\.([0-9]|1[01257]|31)\.attn_k=q4_k"
    dense = tmp_path / "dense.gguf"
    write_model(dense, "dense")  # 16 layers: 13 and 14 are the only ones the rule leaves alone
    plan = run("quantize", "--dry-run", "--tensor-type", rule, dense, tmp_path / "x.gguf", "Q6_K").stdout
    k = {ln.split()[0]: ln.split("->")[1].split()[0] for ln in plan.splitlines() if ".attn_k.weight" in ln}
    assert {n for n, ty in k.items() if ty != "Q4_K"} == {"blk.13.attn_k.weight", "blk.14.attn_k.weight"}
    assert k["blk.13.attn_k.weight"] == "Q6_K"
