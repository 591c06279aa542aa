#!/usr/bin/env bash
# The README's test command: Rust core tests (no Python needed), then the package with its test
# extras (gguf is the reference oracle), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --quiet
python3 -m pip install -q ".[test]"
python3 -P -m pytest -q
