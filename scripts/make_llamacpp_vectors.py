"""Store llama.cpp's quantized bytes for fixed inputs, so tests can check pyqmoe without llama.cpp.

    python scripts/make_llamacpp_vectors.py Q4_0 Q4_1 Q4_K IQ2_XXS ...

writes ``tests/data/llamacpp/<TYPE>.npz`` with:
    x           f32 [n_rows, n_per_row]  inputs: heavy-tailed random rows, then adversarial rows
    row_names   str [n_rows]             what each row is
    imatrix     f32 [n_per_row]          importance weights (log-normal, a few exact zeros)
    q           u8  [n_rows, row_bytes]  llama.cpp bytes without imatrix (absent where it needs one)
    deq         f32 [n_rows, n_per_row]  llama.cpp's dequantization of q (absent likewise)
    q_imatrix   u8  [n_rows, row_bytes]  llama.cpp bytes with the imatrix
    deq_imatrix f32 [n_rows, n_per_row]  llama.cpp's dequantization of q_imatrix
    source      str                      which libggml made them
The inputs depend only on the seed, not on the type, so every type's file holds the same x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import llamacpp_ref  # noqa: E402  (found through the sys.path entry above)

N_PER_ROW = 512
N_RANDOM = 8


def inputs(
    n: int = N_PER_ROW, n_random: int = N_RANDOM, seed: int = 20240601
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Deterministic rows (heavy-tailed random, then adversarial) and an importance matrix."""
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    names: list[str] = []
    for i in range(n_random):
        # Student-t with 3 degrees of freedom, std ~0.02 like trained weights; varying row scale.
        rows.append(0.02 * rng.standard_t(3, n) * (0.5 + i / n_random))
        names.append(f"heavy tailed {i}")
    idx = np.arange(n)
    gauss = 0.02 * rng.standard_normal(n)
    outlier = gauss.copy()
    for b in range(n // 32):
        outlier[b * 32 + b % 32] = 1000.0 if b % 2 == 0 else -1000.0
    signed_zeros = np.where(idx % 3 == 0, -0.0, 0.0)
    signed_zeros[idx % 64 == 5] = 0.25
    adversarial = {
        "zeros": np.zeros(n),
        "constant": np.full(n, 0.375),
        "negative constant": np.full(n, -1.25),
        "f16 max": np.where(idx % 2 == 0, 65504.0, -65504.0),
        "denormals": (idx % 7) * 1e-40 - 3e-40,
        "tiny": (idx % 13) * 1e-8 - 6e-8,
        "alternating": np.where(idx % 2 == 0, 1.0, -1.0),
        "lone value": np.where(idx == n // 3, -2.5, 0.0),
        "outlier per block": outlier,
        "signed zeros": signed_zeros,
        "gaussian": gauss,
        "ramp": np.linspace(-1.0, 1.0, n),
    }
    for name, row in adversarial.items():
        rows.append(np.asarray(row, dtype=np.float64))
        names.append(name)
    x = np.stack(rows).astype(np.float32)
    imatrix = np.exp(1.5 * rng.standard_normal(n)).astype(np.float32)
    imatrix[rng.choice(n, size=n // 32, replace=False)] = 0.0  # columns no token activated
    return x, names, imatrix


def make(type_name: str, out_dir: Path) -> Path:
    x, names, imatrix = inputs()
    data: dict[str, np.ndarray] = {
        "x": x,
        "row_names": np.array(names),
        "imatrix": imatrix,
        "source": np.array(str(llamacpp_ref.library_path().resolve())),
    }
    if not llamacpp_ref.requires_imatrix(type_name):
        q = llamacpp_ref.quantize(type_name, x)
        data["q"] = q
        data["deq"] = llamacpp_ref.dequantize(type_name, q, x.shape[1])
    qi = llamacpp_ref.quantize(type_name, x, imatrix=imatrix)
    data["q_imatrix"] = qi
    data["deq_imatrix"] = llamacpp_ref.dequantize(type_name, qi, x.shape[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{type_name.upper()}.npz"
    np.savez_compressed(path, **data)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="+", help="ggml type names, e.g. Q4_0 Q4_K IQ2_XXS")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tests" / "data" / "llamacpp")
    args = ap.parse_args()
    for t in args.types:
        p = make(t, args.out_dir)
        print(f"{t}: {p} ({p.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
