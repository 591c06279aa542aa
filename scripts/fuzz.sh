#!/usr/bin/env bash
# Fuzz the GGUF reader for a bounded time (default 60 s) and report how many inputs ran.
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The toolchain here is stable, so
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags; no sanitizer build is needed for a
# safe-Rust parser (bounds checks are on), so we use --sanitizer none.
set -euo pipefail
cd "$(dirname "$0")/../rust"
secs=${1:-60}
mkdir -p fuzz/corpus/gguf_reader
# Seed the corpus with real files so the fuzzer starts from valid structure.
for f in ../tests/data/*.gguf; do cp -f "$f" fuzz/corpus/gguf_reader/ 2>/dev/null || true; done
RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --release gguf_reader fuzz/corpus/gguf_reader -- \
    -max_total_time="$secs" -max_len=1048576 -print_final_stats=1 2>&1 | tee /tmp/pyqmoe-fuzz.log | grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units|==|SUMMARY|panicked)" || true
runs=$(grep -oE "stat::number_of_executed_units: [0-9]+" /tmp/pyqmoe-fuzz.log | awk '{print $2}')
if grep -qE "panicked|SUMMARY: libFuzzer|deadly signal" /tmp/pyqmoe-fuzz.log; then
    echo "fuzz: CRASH found after ${runs:-?} inputs; see rust/fuzz/artifacts/" >&2
    exit 1
fi
echo "fuzz: ${runs:-?} inputs in ${secs}s, no crash"
