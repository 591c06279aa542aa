"""Byte-level BPE tokenizers in the style of Qwen2/Qwen3, and their GGUF form.

Two jobs, shared by the test-fixture generator and the reference-model build:

* :func:`train_bpe` trains a byte-level BPE with HF ``tokenizers`` that is set
  up like Qwen2/Qwen3's ``tokenizer.json``: NFC normaliser, the Qwen2
  pre-tokenizer regex followed by a GPT-2 byte-level mapping, a byte-level
  decoder, and Qwen's special tokens appended after the learned vocabulary.
* :func:`gguf_tokenizer_fields` turns such a tokenizer into the values of
  llama.cpp's ``tokenizer.ggml.*`` keys exactly as llama.cpp's
  ``convert_hf_to_gguf.py`` (``_set_vocab_gpt2`` / ``get_vocab_base`` and
  ``gguf.SpecialVocab``) writes them for a Qwen model: ``model=gpt2``,
  ``pre=qwen2``, token list, token types, merges, special-token ids,
  ``add_bos_token=false`` and the ChatML chat template;
  :func:`add_tokenizer_to_gguf` writes them with a ``gguf.GGUFWriter``.

Only ``tokenizers`` and ``gguf`` are needed (no torch).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

# The pre-tokenizer pattern of Qwen2/Qwen2.5/Qwen3 (their tokenizer.json); it is
# the pattern llama.cpp uses for ``tokenizer.ggml.pre = "qwen2"``.
QWEN2_PRETOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen's special tokens, in Qwen's order (ids follow the learned vocabulary).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# The plain ChatML template (Qwen2-style, without a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llama.cpp's token types (gguf.TokenType), repeated here to document intent.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a Qwen2-style byte-level BPE tokenizer.

    ``vocab_size`` counts everything: the 256 byte symbols, the learned merges
    and the three special tokens, which get the last three ids.  Training is
    deterministic for a given input (the trainer breaks count ties by pair).
    Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Special tokens are appended after the learned vocabulary, as in Qwen.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"corpus too small: got {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def tokenizer_json(tok) -> str:
    """The tokenizer as a canonical JSON string (stable bytes across runs)."""
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=1, sort_keys=False) + "\n"


@dataclass
class GGUFTokenizerFields:
    """Values for llama.cpp's ``tokenizer.ggml.*`` keys."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int
    eos_token_id: int
    padding_token_id: int
    chat_template: str
    model: str = "gpt2"
    pre: str = "qwen2"
    add_bos_token: bool = False


def gguf_tokenizer_fields(
    tok_json: str,
    vocab_size: int | None = None,
    eos_token: str = ENDOFTEXT,
    chat_template: str = CHATML_TEMPLATE,
) -> GGUFTokenizerFields:
    """Convert a HF ``tokenizer.json`` string into llama.cpp's vocabulary keys.

    Mirrors ``get_vocab_base`` of llama.cpp's converter: ids missing from the
    vocabulary become ``[PAD{i}]`` (UNUSED), added special tokens are CONTROL,
    other added tokens USER_DEFINED, the rest NORMAL.  ``vocab_size`` is the
    model's embedding row count (defaults to the tokenizer's size).  Like
    Qwen's own GGUFs: bos = padding = ``<|endoftext|>``, eos = ``eos_token``,
    ``add_bos_token = false``.
    """
    data = json.loads(tok_json)
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError("expected a BPE tokenizer")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1 if vocab_size is None else vocab_size
    if max(vocab.values()) >= n:
        raise ValueError("tokenizer has ids beyond the model's vocabulary size")
    reverse = {i: s for s, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPE_UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(TOKEN_TYPE_CONTROL if added[reverse[i]].get("special") else TOKEN_TYPE_USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(TOKEN_TYPE_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eot = vocab[ENDOFTEXT]
    return GGUFTokenizerFields(
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_token_id=eot,
        eos_token_id=vocab[eos_token],
        padding_token_id=eot,
        chat_template=chat_template,
    )


def add_tokenizer_to_gguf(writer, fields: GGUFTokenizerFields) -> None:
    """Write the ``tokenizer.ggml.*`` keys (and the chat template) to a GGUFWriter."""
    writer.add_tokenizer_model(fields.model)
    writer.add_tokenizer_pre(fields.pre)
    writer.add_token_list(fields.tokens)
    writer.add_token_types(fields.token_types)
    writer.add_token_merges(fields.merges)
    writer.add_bos_token_id(fields.bos_token_id)
    writer.add_eos_token_id(fields.eos_token_id)
    writer.add_pad_token_id(fields.padding_token_id)
    writer.add_add_bos_token(fields.add_bos_token)
    writer.add_chat_template(fields.chat_template)
