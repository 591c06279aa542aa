"""pyqmoe vs the gguf package's numpy code on the same arrays (pytest-benchmark).

    pytest benches/test_bench_vs_gguf.py            # speed-up table at the end of the run

Times quantize and dequantize of each legacy type and BF16/F16 on a 1024x512 heavy-tailed matrix,
checks both sides give the same bytes/values, and prints gguf time / pyqmoe time per type.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pyqmoe = pytest.importorskip("pyqmoe")
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"]
SHAPE = (1024, 512)


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.02 * rng.standard_t(3, SHAPE)).astype(np.float32)


def gguf_quantize(x: np.ndarray, t: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf_quants.quantize(x, GGMLQuantizationType[t])


def gguf_dequantize(raw: np.ndarray, t: str) -> np.ndarray:
    return gguf_quants.dequantize(raw, GGMLQuantizationType[t])


def run(benchmark, fn):
    result = benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    return result, benchmark.stats.stats.min


@pytest.mark.parametrize("impl", ["pyqmoe", "gguf"])
@pytest.mark.parametrize("t", TYPES)
def test_quantize(benchmark, record_time, matrix: np.ndarray, t: str, impl: str) -> None:
    benchmark.group = f"quantize {t}"
    fn = (lambda: pyqmoe.quantize(matrix, t)) if impl == "pyqmoe" else (lambda: gguf_quantize(matrix, t))
    raw, best = run(benchmark, fn)
    record_time("quantize", t, impl, best)
    other = gguf_quantize(matrix, t) if impl == "pyqmoe" else pyqmoe.quantize(matrix, t)
    assert np.array_equal(np.asarray(raw).view(np.uint8), np.asarray(other).view(np.uint8))


@pytest.mark.parametrize("impl", ["pyqmoe", "gguf"])
@pytest.mark.parametrize("t", TYPES)
def test_dequantize(benchmark, record_time, matrix: np.ndarray, t: str, impl: str) -> None:
    benchmark.group = f"dequantize {t}"
    raw = pyqmoe.quantize(matrix, t)
    if impl == "pyqmoe":
        fn = lambda: pyqmoe.dequantize(raw, t, SHAPE)  # noqa: E731
    else:
        typed = raw.view(np.float16) if t == "F16" else raw  # gguf-py reads F16 as a float16 view
        fn = lambda: gguf_dequantize(typed, t)  # noqa: E731
    values, best = run(benchmark, fn)
    record_time("dequantize", t, impl, best)
    expected = pyqmoe.dequantize(raw, t, SHAPE)
    assert np.array_equal(np.asarray(values, dtype=np.float32).reshape(SHAPE), expected)
