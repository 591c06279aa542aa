"""Collects the benchmark pairs of test_bench_vs_gguf.py and prints pyqmoe/gguf-py speed ratios."""

from __future__ import annotations

import pytest

RESULTS: dict[tuple[str, str, str], float] = {}


def record(op: str, qtype: str, impl: str, seconds: float) -> None:
    RESULTS[(op, qtype, impl)] = seconds


@pytest.fixture
def record_time():
    """record_time(op, qtype, impl, seconds): keep a best time for the closing ratio table."""
    return record


def pytest_terminal_summary(terminalreporter) -> None:
    pairs = sorted({(op, t) for op, t, _ in RESULTS})
    rows = [
        (op, t, RESULTS[(op, t, "gguf")] / RESULTS[(op, t, "pyqmoe")])
        for op, t in pairs
        if (op, t, "gguf") in RESULTS and (op, t, "pyqmoe") in RESULTS
    ]
    if not rows:
        return
    tr = terminalreporter
    tr.section("pyqmoe vs gguf-py (numpy): speed-up = gguf time / pyqmoe time (best round)")
    tr.write_line(f"{'op':<11} {'type':<6} {'speed-up':>9}")
    for op, t, r in rows:
        tr.write_line(f"{op:<11} {t:<6} {r:>8.1f}x")
