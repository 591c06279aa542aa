"""Next-token agreement of pyqmoe's engine with llama.cpp on the bundled model, as the stored test
checks it (tests/test_engine_reference.py asserts >= 99%), but printing the rates.

    python scripts/engine_agreement.py

Quantizes the bundled model to each preset of tests/data/reference-model-vectors.npz (IQ2_XS with
tests/data/reference-imatrix.dat), evaluates the stored held-out windows and prints, per preset, the
share of positions whose arg-max equals llama.cpp's and llama.cpp's own top-1/top-2 logit margin at
the positions that differ.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import pyqmoe
from pyqmoe import _core

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> int:
    z = np.load(DATA / "reference-model-vectors.npz")
    windows = z["heldout/tokens"]
    with tempfile.TemporaryDirectory() as d:
        for preset in ("Q8_0", "Q4_K_M", "IQ4_XS", "IQ2_XS"):
            out = Path(d) / f"{preset}.gguf"
            imatrix = str(DATA / "reference-imatrix.dat") if preset == "IQ2_XS" else None
            _core.quantize_model(str(pyqmoe.default_model_path()), str(out), preset, imatrix=imatrix)
            m = pyqmoe.Model(out, n_ctx=windows.shape[1])
            same, margins = [], []
            for w, ref, margin in zip(windows, z[f"{preset}/top1"], z[f"{preset}/margin"]):
                m.reset()
                agree = m.eval(w.tolist()).argmax(1) == ref
                same.append(agree)
                margins.append(margin[~agree])
            same_all, differ = np.concatenate(same), np.concatenate(margins)
            median = float(np.median(differ)) if differ.size else 0.0
            print(
                f"{preset:7s} top-1 agreement {same_all.mean():.4f}: {differ.size} of {same_all.size} positions "
                f"differ; llama.cpp's margin there: median {median:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
