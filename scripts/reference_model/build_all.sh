#!/usr/bin/env bash
# Rebuild the reference model from scratch, with fixed seeds:
#   1. corpus from Debian packages -> .work/reference_model/{train,valid}.txt,
#      data/heldout.txt.xz, data/calibration.txt
#   2. 8192-token byte-level BPE + uint16 token streams
#   3. training (wants a CUDA GPU; falls back to the CPU, which takes many hours
#      for the full run: pass e.g. STEPS=200 to get a weak model quickly)
#   4. GGUF export -> pyqmoe/models/qwen3moe-ref-bf16.gguf (+ F32 copy in .work/)
#   5. held-out perplexity: unigram, transformers, llama.cpp
#
# Needs: apt-get + dpkg (Debian 12 package archive), python3 with numpy, gguf,
# tokenizers, torch, transformers, safetensors, llama-cpp-python.
#
# The recorded model (docs/reference_model.md) was trained on one H200 with the
# defaults below (1100 steps of 64 x 512 tokens, about 2.5 minutes).  With
# TIME_BUDGET=S (seconds) the step count is cut to what fits, once the first
# steps have been timed; train_log.json records the count used.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=scripts/reference_model
STEPS="${STEPS:-1100}"
TIME_BUDGET="${TIME_BUDGET:-0}"
WINDOWS="${WINDOWS:-200}"

python3 "$R/prepare_corpus.py"
python3 "$R/train_tokenizer.py"
python3 "$R/train.py" --out .work/reference_model/checkpoint --steps "$STEPS" \
    --eval-every 100 --time-budget "$TIME_BUDGET"
python3 "$R/export_gguf.py" --f32
python3 "$R/evaluate.py" --windows "$WINDOWS"
