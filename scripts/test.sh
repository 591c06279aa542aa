#!/usr/bin/env bash
# The README's test command: Rust core tests (no Python needed), then the package with its test
# extras (gguf is the reference oracle), then pytest, then the core tests built for aarch64 and
# run under qemu (the NEON kernels; one "NOT RUN" line where the cross toolchain can't be had).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --quiet
python3 -m pip install -q ".[test]"
python3 -P -m pytest -q
bash scripts/test_aarch64.sh
