"""k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K) against two peers we did not write:

* the ``gguf`` package's numpy dequantizers: pyqmoe's bytes must dequantize to bit-identical
  values there and in pyqmoe (gguf-py has no k-quant quantizer, and no Q8_K at all);
* llama.cpp's own output, stored by ``scripts/make_llamacpp_vectors.py`` in tests/data/llamacpp
  (bytes with and without an importance matrix, and its dequantized values).

Agreement with llama.cpp is exact, byte for byte, with and without an imatrix: the installed
libggml-base (llama-cpp-python 0.3.36, ggml commit 0c1e570) produced no FMA-contracted
differences in these paths, so the tests assert equality rather than a fraction of blocks.
(A one-off run over 7200 blocks per type of varied scales and distributions also agreed fully.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pyqmoe = pytest.importorskip("pyqmoe")
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"]
GGUF_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # what gguf-py can dequantize
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_K": 292}
DATA = Path(__file__).parent / "data" / "llamacpp"


def gguf_dequantize(raw: np.ndarray, t: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns on inf/NaN scales from random bytes
        return gguf_quants.dequantize(raw, GGMLQuantizationType[t])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32).reshape(a.shape)
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


def vectors(t: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{t}.npz") as f:
        return {k: f[k] for k in f.files}


def arrays() -> dict[str, np.ndarray]:
    """Random arrays of several shapes, scales and signs, plus the stored adversarial rows."""
    rng = np.random.default_rng(4321)
    out = {f"student-t {s}": 0.02 * rng.standard_t(3, (8, 1024)) for s in range(3)}
    out.update(
        {
            "normal 3-D": rng.standard_normal((2, 4, 512)),
            "scale 1e4": rng.standard_normal((4, 256)) * 1e4,
            "scale 1e-30": rng.standard_normal((4, 256)) * 1e-30,
            "small integers": rng.integers(-4, 5, (4, 512)),
            "non-negative": np.abs(rng.standard_normal((4, 512))),
            "non-positive": -np.abs(rng.standard_normal((4, 512))),
            "sparse": rng.standard_normal((4, 512)) * (rng.random((4, 512)) < 0.05),
        }
    )
    v = vectors("Q4_K")
    out.update({f"stored: {n}": row[None, :] for n, row in zip(v["row_names"], v["x"])})
    return {k: np.asarray(x, dtype=np.float32) for k, x in out.items()}


@pytest.mark.parametrize("t", TYPES)
def test_matches_llamacpp_vectors(t: str) -> None:
    v = vectors(t)
    x, names = v["x"], v["row_names"]
    for key, w in (("q", None), ("q_imatrix", v["imatrix"])):
        q = pyqmoe.quantize(x, t, imatrix=w)
        bad = [str(names[i]) for i in range(len(x)) if not np.array_equal(q[i], v[key][i])]
        assert not bad, f"{t} ({key}) differs from llama.cpp on rows {bad}"
        deq = v["deq" if w is None else "deq_imatrix"]
        assert same_bits(pyqmoe.dequantize(v[key], t, x.shape), deq), f"{t} ({key}) values"


@pytest.mark.parametrize("t", GGUF_TYPES)
def test_values_match_gguf_dequantize(t: str) -> None:
    w = np.exp(np.random.default_rng(8).standard_normal(4096)).astype(np.float32)
    mismatched = []
    for name, x in arrays().items():
        for imatrix in (None, w[: x.shape[-1]]):
            q = pyqmoe.quantize(x, t, imatrix=imatrix)
            if not same_bits(pyqmoe.dequantize(q, t, x.shape), gguf_dequantize(q, t)):
                mismatched.append(f"{name} (imatrix: {imatrix is not None})")
    assert not mismatched, f"{t}: gguf-py dequantizes pyqmoe's bytes differently: {mismatched}"


@pytest.mark.parametrize("t", GGUF_TYPES)
def test_dequantize_any_bytes_like_gguf(t: str) -> None:
    # Random bytes reach every bit pattern, NaN/inf/subnormal f16 scales included.
    raw = np.random.default_rng(5).integers(0, 256, (32, 2 * BLOCK_BYTES[t]), dtype=np.uint8)
    ours = pyqmoe.dequantize(raw, t, (32, 512))
    theirs = gguf_dequantize(raw, t).reshape(ours.shape)
    nan = np.isnan(ours)
    assert np.array_equal(nan, np.isnan(theirs))
    assert same_bits(ours[~nan], theirs[~nan])


@pytest.mark.parametrize("t", TYPES)
def test_round_trip_error_bounds(t: str) -> None:
    x = (0.02 * np.random.default_rng(11).standard_normal((64, 1024))).astype(np.float32)
    y = pyqmoe.dequantize(pyqmoe.quantize(x, t), t, x.shape)
    rel = float(np.sqrt(np.mean((x - y) ** 2))) / 0.02
    bound = {"Q2_K": 0.45, "Q3_K": 0.27, "Q4_K": 0.14, "Q5_K": 0.07, "Q6_K": 0.035, "Q8_K": 0.01}[t]
    assert rel < bound, f"{t}: relative rmse {rel:.4f}"


@pytest.mark.parametrize("t", TYPES)
def test_imatrix_lowers_weighted_error(t: str) -> None:
    rng = np.random.default_rng(12)
    x = (0.02 * rng.standard_t(3, (64, 512))).astype(np.float32)
    w = np.exp(2.0 * rng.standard_normal(512)).astype(np.float32)

    def weighted(q: np.ndarray) -> float:
        return float(np.sum(w * (x - pyqmoe.dequantize(q, t, x.shape)) ** 2))

    plain = pyqmoe.quantize(x, t)
    weighted_q = pyqmoe.quantize(x, t, imatrix=w)
    if t == "Q8_K":
        assert np.array_equal(plain, weighted_q)  # ggml's Q8_K ignores importance weights
    else:
        assert weighted(weighted_q) < weighted(plain)


@pytest.mark.parametrize("t", ["Q2_K", "Q4_K", "Q6_K"])
def test_per_expert_imatrix_slices(t: str) -> None:
    rng = np.random.default_rng(9)
    x = (0.02 * rng.standard_t(3, (3, 4, 512))).astype(np.float32)
    w = np.exp(rng.standard_normal((3, 512))).astype(np.float32)
    whole = pyqmoe.quantize(x, t, imatrix=w.reshape(-1))
    for e in range(3):
        assert np.array_equal(whole[e], pyqmoe.quantize(x[e], t, imatrix=w[e]))


def test_nan_refused_naming_the_tensor() -> None:
    x = np.zeros((4, 256), dtype=np.float32)
    x[1, 200] = np.inf
    for t in TYPES:
        with pytest.raises(pyqmoe.TensorError, match=r"blk\.3\.ffn_up_exps\.weight.*row 1, column 200"):
            pyqmoe.quantize(x, t, name="blk.3.ffn_up_exps.weight")


def test_output_independent_of_thread_count_and_simd(quantize_digests) -> None:
    x = (0.02 * np.random.default_rng(3).standard_t(3, (48, 1024))).astype(np.float32)
    w = np.exp(np.random.default_rng(4).standard_normal(1024)).astype(np.float32)
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
