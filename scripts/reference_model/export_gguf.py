"""Step 4: write the trained checkpoint as llama.cpp GGUF files.

Reads the safetensors shards of ``train.py`` and the tokenizer, and writes

* ``pyqmoe/models/qwen3moe-ref-bf16.gguf`` - BF16 matrices, F32 norms and
  router (as ``convert_hf_to_gguf.py --outtype bf16``); the shipped model;
* ``.work/reference_model/qwen3moe-ref-f32.gguf`` - all F32 (with ``--f32``;
  not shipped).

The weights were saved in BF16, so both files hold exactly the same values.
Usage: python scripts/reference_model/export_gguf.py [--checkpoint DIR] [--f32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from checkpoint import load_checkpoint
from common import CHECKPOINT, GGUF_BF16, GGUF_F32, MODEL_NAME, TOKENIZER_JSON, exporter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--f32", action="store_true", help="also write the all-F32 copy under .work/")
    args = ap.parse_args()
    qwen3moe_export = exporter()
    cfg, sd = load_checkpoint(args.checkpoint)
    tok_json = TOKENIZER_JSON.read_text(encoding="utf-8")
    GGUF_BF16.parent.mkdir(parents=True, exist_ok=True)
    qwen3moe_export.write_qwen3moe_gguf(str(GGUF_BF16), cfg, sd, tok_json, name=MODEL_NAME, outtype="bf16")
    print(f"{GGUF_BF16}: {GGUF_BF16.stat().st_size} bytes")
    if args.f32:
        qwen3moe_export.write_qwen3moe_gguf(str(GGUF_F32), cfg, sd, tok_json, name=MODEL_NAME, outtype="f32")
        print(f"{GGUF_F32}: {GGUF_F32.stat().st_size} bytes")
    types: dict[str, int] = {}
    for _, (_, t) in qwen3moe_export.describe_gguf(str(GGUF_BF16)).items():
        types[t] = types.get(t, 0) + 1
    print("tensor types:", types)


if __name__ == "__main__":
    main()
