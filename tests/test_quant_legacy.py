"""Legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against two peers we did not write:

* the ``gguf`` package's numpy quantizers/dequantizers (bytes and values, no imatrix);
* llama.cpp's own output, stored by ``scripts/make_llamacpp_vectors.py`` in tests/data/llamacpp
  (bytes with and without an importance matrix, and its dequantized values).

Known, documented divergence: in an all-zero block that starts with -0.0, numpy's argmax/min/max
and ggml's scalar loops keep different zeros, so gguf-py and llama.cpp store scales/mins whose
sign bits differ. pyqmoe follows llama.cpp; see ``test_signed_zeros_follow_llamacpp``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pyqmoe = pytest.importorskip("pyqmoe")
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
DATA = Path(__file__).parent / "data" / "llamacpp"


def gguf_quantize(x: np.ndarray, t: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns on the 1/d overflow of subnormal scales
        return gguf_quants.quantize(x, GGMLQuantizationType[t])


def gguf_dequantize(raw: np.ndarray, t: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf_quants.dequantize(raw, GGMLQuantizationType[t])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def vectors(t: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{t}.npz") as f:
        return {k: f[k] for k in f.files}


def random_arrays() -> dict[str, np.ndarray]:
    """Random arrays of several shapes and scales, including ones past the f16 range and tiny ones."""
    rng = np.random.default_rng(1234)
    arrays = {f"student-t {s}": 0.02 * rng.standard_t(3, (16, 512)) for s in range(4)}
    arrays.update(
        {
            "normal 3-D": rng.standard_normal((2, 8, 256)),
            "one row": rng.standard_normal(1024),
            "scale 1e5 (d overflows f16)": rng.standard_normal((8, 256)) * 1e5,
            "scale 1e30": rng.standard_normal((4, 256)) * 1e30,
            "scale 1e-38 (subnormal scales)": rng.standard_normal((4, 256)) * 1e-38,
            "small integers": rng.integers(-3, 4, (8, 256)),
            "halves (rounding ties)": rng.integers(-40, 40, (8, 256)) * 0.5,
            "non-negative": np.abs(rng.standard_normal((8, 256))),
            "non-positive": -np.abs(rng.standard_normal((8, 256))),
        }
    )
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def adversarial_rows() -> dict[str, np.ndarray]:
    """The named adversarial rows stored with the llama.cpp vectors, minus the signed-zero row."""
    v = vectors("Q8_0")
    return {
        str(n): row[None, :]
        for n, row in zip(v["row_names"], v["x"])
        if not str(n).startswith("heavy tailed") and str(n) != "signed zeros"
    }


@pytest.mark.parametrize("t", TYPES)
def test_bytes_and_values_match_gguf_numpy(t: str) -> None:
    arrays = {**random_arrays(), **adversarial_rows()}
    mismatched = []
    for name, x in arrays.items():
        q = pyqmoe.quantize(x, t)
        g = gguf_quantize(x, t)
        if q.shape != g.shape or not np.array_equal(q, g):
            mismatched.append(f"bytes: {name}")
            continue
        if not same_bits(pyqmoe.dequantize(q, t, x.shape), gguf_dequantize(g, t)):
            mismatched.append(f"values: {name}")
    assert not mismatched, f"{t}: {len(mismatched)}/{len(arrays)} arrays differ from gguf-py: {mismatched}"


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_any_bytes_like_gguf(t: str) -> None:
    # Random bytes reach every bit pattern: f16 scales that are NaN, inf or subnormal included.
    n = 256
    row_bytes = pyqmoe.type_info()[t]["type_size"] * n // 32
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
    q = pyqmoe.quantize(x, t)
    bad = [str(names[i]) for i in range(len(x)) if not np.array_equal(q[i], v["q"][i])]
    assert not bad, f"{t} without imatrix differs from llama.cpp on rows {bad}"
    assert same_bits(pyqmoe.dequantize(v["q"], t, x.shape), v["deq"])

    qi = pyqmoe.quantize(x, t, imatrix=v["imatrix"])
    bad = [str(names[i]) for i in range(len(x)) if not np.array_equal(qi[i], v["q_imatrix"][i])]
    assert not bad, f"{t} with imatrix differs from llama.cpp on rows {bad}"
    assert same_bits(pyqmoe.dequantize(v["q_imatrix"], t, x.shape), v["deq_imatrix"])


@pytest.mark.parametrize("t", TYPES)
def test_signed_zeros_follow_llamacpp(t: str) -> None:
    v = vectors(t)
    i = list(v["row_names"]).index("signed zeros")
    x = v["x"][i : i + 1]
    q = pyqmoe.quantize(x, t)
    assert np.array_equal(q, v["q"][i : i + 1])
    # gguf-py may differ here, but only in the sign of a zero scale/min: the values are equal.
    g = gguf_quantize(x, t)
    np.testing.assert_array_equal(pyqmoe.dequantize(q, t, x.shape), gguf_dequantize(g, t).reshape(x.shape))


@pytest.mark.parametrize("t", TYPES)
def test_imatrix_changes_bytes_except_q8_0(t: str) -> None:
    v = vectors(t)
    x = v["x"][:8]
    plain = pyqmoe.quantize(x, t)
    weighted = pyqmoe.quantize(x, t, imatrix=v["imatrix"])
    assert np.array_equal(plain, weighted) == (t == "Q8_0")


@pytest.mark.parametrize("t", ["Q4_0", "Q5_1"])
def test_per_expert_imatrix_slices(t: str) -> None:
    # A 3-D expert tensor with one imatrix slice per expert equals quantizing each expert alone.
    rng = np.random.default_rng(9)
    x = (0.02 * rng.standard_t(3, (3, 4, 256))).astype(np.float32)
    w = np.exp(rng.standard_normal((3, 256))).astype(np.float32)
    whole = pyqmoe.quantize(x, t, imatrix=w.reshape(-1))
    for e in range(3):
        assert np.array_equal(whole[e], pyqmoe.quantize(x[e], t, imatrix=w[e]))


def test_nan_refused_naming_the_tensor() -> None:
    x = np.zeros((4, 64), dtype=np.float32)
    x[2, 33] = np.nan
    for t in TYPES:
        with pytest.raises(pyqmoe.TensorError, match=r"blk\.7\.ffn_down_exps\.weight.*row 2, column 33"):
            pyqmoe.quantize(x, t, name="blk.7.ffn_down_exps.weight")


def test_output_independent_of_thread_count(quantize_digests) -> None:
    x = (0.02 * np.random.default_rng(3).standard_t(3, (96, 512))).astype(np.float32)
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
