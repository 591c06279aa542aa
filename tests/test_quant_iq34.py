"""IQ4_NL, IQ4_XS, IQ3_XXS and IQ3_S against two peers we did not write:

* the ``gguf`` package's numpy dequantizers: pyqmoe's bytes must dequantize to the same values
  bit for bit (gguf-py has no quantizers for these types);
* llama.cpp's own output, stored by ``scripts/make_llamacpp_vectors.py`` in tests/data/llamacpp:
  pyqmoe's bytes must equal llama.cpp's, with and without an importance matrix, and pyqmoe must
  dequantize llama.cpp's bytes to llama.cpp's values.

llama.cpp quirk kept on purpose (IQ3_S): after an all-zero 32-weight sub-block ggml does not advance
its grid-index and sign cursors, so later sub-blocks of that super-block are stored one slot early.
pyqmoe writes the same bytes; see ``test_iq3_s_zero_sub_block_shifts_like_llamacpp``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pyqmoe = pytest.importorskip("pyqmoe")
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

TYPES = ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S"]
DATA = Path(__file__).parent / "data" / "llamacpp"


def gguf_dequantize(raw: np.ndarray, t: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf/NaN scales from random bytes
        return gguf_quants.dequantize(raw, GGMLQuantizationType[t])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def vectors(t: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{t}.npz") as f:
        return {k: f[k] for k in f.files}


def random_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4321)
    arrays = {f"student-t {s}": 0.02 * rng.standard_t(3, (8, 512)) for s in range(3)}
    arrays.update(
        {
            "normal 3-D": rng.standard_normal((2, 4, 256)),
            "scale 1e4": rng.standard_normal((4, 256)) * 1e4,
            "scale 1e-30": rng.standard_normal((4, 256)) * 1e-30,
            "small integers": rng.integers(-3, 4, (4, 256)),
            "non-negative": np.abs(rng.standard_normal((4, 256))),
            "sparse": rng.standard_normal((4, 256)) * (rng.random((4, 256)) < 0.05),
        }
    )
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def stored_rows() -> dict[str, np.ndarray]:
    v = vectors("IQ4_NL")
    return {str(n): row[None, :] for n, row in zip(v["row_names"], v["x"])}


@pytest.mark.parametrize("t", TYPES)
def test_values_match_gguf_numpy(t: str) -> None:
    arrays = {**random_arrays(), **stored_rows()}
    w = np.exp(np.random.default_rng(6).standard_normal(512)).astype(np.float32)
    mismatched = []
    for name, x in arrays.items():
        for imatrix in (None, w[: x.shape[-1]]):
            q = pyqmoe.quantize(x, t, imatrix=imatrix)
            ours = pyqmoe.dequantize(q, t, x.shape)
            theirs = gguf_dequantize(q, t).reshape(x.shape)
            if not same_bits(ours, theirs):
                mismatched.append(f"{name} (imatrix: {imatrix is not None})")
    assert not mismatched, f"{t}: dequantized values differ from gguf-py on {mismatched}"


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_any_bytes_like_gguf(t: str) -> None:
    # Random bytes reach every bit pattern: NaN, inf and subnormal f16 scales included.
    info = pyqmoe.type_info()[t]
    n = 512
    row_bytes = info["type_size"] * n // info["block_size"]
    raw = np.random.default_rng(5).integers(0, 256, (16, row_bytes), dtype=np.uint8)
    ours = pyqmoe.dequantize(raw, t, (16, n))
    theirs = gguf_dequantize(raw, t)
    nan = np.isnan(ours)
    assert np.array_equal(nan, np.isnan(theirs))
    assert same_bits(ours[~nan], theirs[~nan])


@pytest.mark.parametrize("t", TYPES)
def test_matches_llamacpp_vectors(t: str) -> None:
    v = vectors(t)
    x, names = v["x"], v["row_names"]
    for key, imatrix in (("q", None), ("q_imatrix", v["imatrix"])):
        q = pyqmoe.quantize(x, t, imatrix=imatrix)
        bad = [str(names[i]) for i in range(len(x)) if not np.array_equal(q[i], v[key][i])]
        assert not bad, f"{t} ({key}) differs from llama.cpp on rows {bad}"
    assert same_bits(pyqmoe.dequantize(v["q"], t, x.shape), v["deq"])
    assert same_bits(pyqmoe.dequantize(v["q_imatrix"], t, x.shape), v["deq_imatrix"])


@pytest.mark.parametrize("t", TYPES)
def test_imatrix_changes_bytes(t: str) -> None:
    v = vectors(t)
    x = v["x"][:8]
    assert not np.array_equal(pyqmoe.quantize(x, t), pyqmoe.quantize(x, t, imatrix=v["imatrix"]))


def test_errors_ordered_by_bits_and_imatrix_helps() -> None:
    # Heavy-tailed rows: relative RMSE falls with bits per weight, and quantizing with an imatrix
    # lowers the imatrix-weighted error (what llama.cpp's search minimises).
    v = vectors("IQ4_NL")
    x, w = v["x"][:8], v["imatrix"]

    def rel_err(t: str, imatrix: np.ndarray | None, weights: np.ndarray) -> float:
        y = pyqmoe.dequantize(pyqmoe.quantize(x, t, imatrix=imatrix), t, x.shape)
        return float(np.sqrt(np.sum(weights * (x - y) ** 2) / np.sum(weights * x**2)))

    ones = np.ones_like(w)
    plain = {t: rel_err(t, None, ones) for t in TYPES}
    assert max(plain["IQ4_NL"], plain["IQ4_XS"]) < plain["IQ3_S"] < plain["IQ3_XXS"] < 0.3, plain
    for t in TYPES:
        assert rel_err(t, w, w) < rel_err(t, None, w), t


def test_iq3_s_zero_sub_block_shifts_like_llamacpp() -> None:
    # Sub-block 0 all zero: llama.cpp stores sub-block 1's 8 grid indices at slot 0 (qs[0:8]) and
    # leaves the last slot empty; pyqmoe reproduces its bytes exactly (see the module docstring).
    x = (0.02 * np.random.default_rng(8).standard_normal((1, 256))).astype(np.float32)
    x[0, :32] = 0.0
    q = pyqmoe.quantize(x, "IQ3_S")[0]
    qs = q[2:66]
    assert np.array_equal(qs[56:64], np.zeros(8, np.uint8))
    # The signs land one slot early too.
    signs = q[74:106]
    assert np.array_equal(signs[28:32], np.zeros(4, np.uint8))
    assert np.array_equal(signs[0:4], (np.packbits(x[0, 32:64] < 0, bitorder="little")))


@pytest.mark.parametrize("t", TYPES)
def test_nan_refused_naming_the_tensor(t: str) -> None:
    x = np.zeros((2, 256), dtype=np.float32)
    x[1, 100] = np.nan
    with pytest.raises(pyqmoe.TensorError, match=r"blk\.3\.ffn_up_exps\.weight.*row 1, column 100"):
        pyqmoe.quantize(x, t, name="blk.3.ffn_up_exps.weight")


def test_output_independent_of_thread_count(quantize_digests) -> None:
    x = (0.02 * np.random.default_rng(3).standard_t(3, (24, 512))).astype(np.float32)
    w = np.exp(np.random.default_rng(4).standard_normal(512)).astype(np.float32)
    digests = quantize_digests(
        x,
        w,
        TYPES,
        [
            {"RAYON_NUM_THREADS": "1", "PYQMOE_NO_SIMD": "0"},
            {"RAYON_NUM_THREADS": "3", "PYQMOE_NO_SIMD": "0"},
            {"RAYON_NUM_THREADS": "2", "PYQMOE_NO_SIMD": "1"},  # scalar reference kernels: same bytes
        ],
    )
    assert len(digests) == 1
