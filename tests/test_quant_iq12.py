"""The 2-bit and 1-bit i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) against peers we did not write:

* the ``gguf`` package's numpy dequantizers (it has no i-quant quantizer): its values from
  pyqmoe's bytes must equal pyqmoe's own dequantization bit for bit;
* llama.cpp's output, stored by ``scripts/make_llamacpp_vectors.py`` in tests/data/llamacpp
  (bytes with an importance matrix, and without one where llama.cpp allows it, plus its values).

llama.cpp refuses IQ2_XXS, IQ2_XS and IQ1_S without an importance matrix
(``ggml_quantize_requires_imatrix``); pyqmoe raises a TensorError instead of aborting.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pyqmoe = pytest.importorskip("pyqmoe")
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}
DATA = Path(__file__).parent / "data" / "llamacpp"


def gguf_dequantize(raw: np.ndarray, t: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf/NaN scales in random bytes
        return gguf_quants.dequantize(raw, GGMLQuantizationType[t])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def vectors(t: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{t}.npz") as f:
        return {k: f[k] for k in f.files}


def random_arrays() -> dict[str, np.ndarray]:
    """Random arrays of several shapes and scales, all rows a multiple of 256 long."""
    rng = np.random.default_rng(4321)
    arrays = {f"student-t {s}": 0.02 * rng.standard_t(3, (8, 512)) for s in range(2)}
    arrays.update(
        {
            "normal 3-D": rng.standard_normal((2, 4, 256)),
            "one row": rng.standard_normal(1024),
            "scale 1e5": rng.standard_normal((4, 256)) * 1e5,
            "scale 1e-30": rng.standard_normal((4, 256)) * 1e-30,
            "small integers (ties)": rng.integers(-3, 4, (8, 256)),
            "halves (rounding ties)": rng.integers(-40, 40, (8, 256)) * 0.5,
            "non-negative": np.abs(rng.standard_normal((4, 256))),
            "non-positive": -np.abs(rng.standard_normal((4, 256))),
        }
    )
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def adversarial_rows() -> dict[str, np.ndarray]:
    """The named adversarial rows stored with the llama.cpp vectors."""
    v = vectors("IQ2_S")
    return {str(n): row[None, :] for n, row in zip(v["row_names"], v["x"]) if not str(n).startswith("heavy")}


def importance(n: int, seed: int = 7) -> np.ndarray:
    return np.exp(1.5 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("t", TYPES)
def test_gguf_dequantizes_our_bytes_to_our_values(t: str) -> None:
    arrays = {**random_arrays(), **adversarial_rows()}
    mismatched = []
    for name, x in arrays.items():
        n = x.shape[-1]
        variants = [importance(n)] if t in NEEDS_IMATRIX else [None, importance(n)]
        for w in variants:
            q = pyqmoe.quantize(x, t, imatrix=w)
            ours = pyqmoe.dequantize(q, t, x.shape)
            theirs = gguf_dequantize(q, t).reshape(x.shape)
            if not same_bits(ours, theirs):
                mismatched.append(f"{name} (imatrix: {w is not None})")
    assert not mismatched, f"{t}: gguf-py reads our bytes differently on {mismatched}"


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_any_bytes_like_gguf(t: str) -> None:
    # Random bytes reach every grid index, sign pattern and scale, NaN/inf/subnormal f16 included.
    n = 512
    row_bytes = pyqmoe.type_info()[t]["type_size"] * n // 256
    raw = np.random.default_rng(5).integers(0, 256, (16, row_bytes), dtype=np.uint8)
    ours = pyqmoe.dequantize(raw, t, (16, n))
    theirs = gguf_dequantize(raw, t).reshape(16, n)
    nan = np.isnan(ours)
    assert np.array_equal(nan, np.isnan(theirs))
    assert same_bits(ours[~nan], theirs[~nan])


@pytest.mark.parametrize("t", TYPES)
def test_matches_llamacpp_vectors(t: str) -> None:
    v = vectors(t)
    x, names = v["x"], v["row_names"]
    if t not in NEEDS_IMATRIX:
        q = pyqmoe.quantize(x, t)
        bad = [str(names[i]) for i in range(len(x)) if not np.array_equal(q[i], v["q"][i])]
        assert not bad, f"{t} without imatrix differs from llama.cpp on rows {bad}"
        assert same_bits(pyqmoe.dequantize(v["q"], t, x.shape), v["deq"])
    else:
        assert "q" not in v  # llama.cpp cannot make it without an imatrix either

    qi = pyqmoe.quantize(x, t, imatrix=v["imatrix"])
    bad = [str(names[i]) for i in range(len(x)) if not np.array_equal(qi[i], v["q_imatrix"][i])]
    assert not bad, f"{t} with imatrix differs from llama.cpp on rows {bad}"
    assert same_bits(pyqmoe.dequantize(v["q_imatrix"], t, x.shape), v["deq_imatrix"])


@pytest.mark.parametrize("t", sorted(NEEDS_IMATRIX))
def test_refuses_without_imatrix(t: str) -> None:
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    expected = rf"blk\.3\.ffn_up_exps\.weight.*{t} needs an importance matrix"
    with pytest.raises(pyqmoe.TensorError, match=expected):
        pyqmoe.quantize(x, t, name="blk.3.ffn_up_exps.weight")


@pytest.mark.parametrize("t", TYPES)
def test_imatrix_changes_bytes(t: str) -> None:
    v = vectors(t)
    x = v["x"][:8]
    a = pyqmoe.quantize(x, t, imatrix=v["imatrix"])
    b = pyqmoe.quantize(x, t, imatrix=importance(x.shape[1], seed=99))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("t", ["IQ2_XS", "IQ1_M"])
def test_per_expert_imatrix_slices(t: str) -> None:
    rng = np.random.default_rng(9)
    x = (0.02 * rng.standard_t(3, (3, 2, 256))).astype(np.float32)
    w = np.exp(rng.standard_normal((3, 256))).astype(np.float32)
    whole = pyqmoe.quantize(x, t, imatrix=w.reshape(-1))
    for e in range(3):
        assert np.array_equal(whole[e], pyqmoe.quantize(x[e], t, imatrix=w[e]))


def test_output_independent_of_thread_count(quantize_digests) -> None:
    x = (0.02 * np.random.default_rng(3).standard_t(3, (24, 512))).astype(np.float32)
    w = importance(512, seed=4)
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
