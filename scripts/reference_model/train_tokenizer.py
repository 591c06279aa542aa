"""Step 2: train the 8192-token byte-level BPE and pre-tokenize the corpus.

Trains on the training documents only (Qwen2 pre-tokenizer regex, Qwen special
tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at ids 8189-8191),
then writes uint16 token streams in which documents are separated by
``<|endoftext|>``: ``.work/reference_model/tokens/{train,valid}.npy`` (what
the training step reads) and ``.work/reference_model/heldout_tokens.npy``.
Tokenizing a whole text file with the tokenizer (special tokens recognised)
gives exactly these streams.

Usage: python scripts/reference_model/train_tokenizer.py
"""

from __future__ import annotations

import numpy as np
from common import (
    DOC_SEPARATOR,
    HELDOUT_TOKENS,
    HELDOUT_TXT,
    TOKENIZER_JSON,
    TRAIN_TOKENS,
    TRAIN_TXT,
    VALID_TOKENS,
    VALID_TXT,
    VOCAB_SIZE,
    bpe_tokenizer,
)


def encode_file(tok, path) -> np.ndarray:
    """Token ids of a text file whose documents are separated by <|endoftext|>."""
    pieces = path.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    eot = tok.token_to_id(DOC_SEPARATOR)
    out: list[int] = []
    for i, enc in enumerate(tok.encode_batch(pieces, add_special_tokens=False)):
        if i:
            out.append(eot)
        out.extend(enc.ids)
    return np.asarray(out, dtype=np.uint16)


def main() -> None:
    docs = TRAIN_TXT.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    tok = bpe_tokenizer.train_bpe(docs, VOCAB_SIZE)
    TOKENIZER_JSON.write_text(bpe_tokenizer.tokenizer_json(tok), encoding="utf-8")
    TRAIN_TOKENS.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((TRAIN_TXT, TRAIN_TOKENS), (VALID_TXT, VALID_TOKENS), (HELDOUT_TXT, HELDOUT_TOKENS)):
        ids = encode_file(tok, src)
        np.save(dst, ids)
        text_len = len(src.read_text(encoding="utf-8"))
        print(f"{dst.name:20s} {len(ids):10d} tokens ({text_len / len(ids):.2f} chars/token)")


if __name__ == "__main__":
    main()
