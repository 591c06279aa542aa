"""Tokenizer and chat template from a GGUF file's ``tokenizer.*`` metadata.

The BPE itself is HF ``tokenizers``: for ``tokenizer.ggml.model == "gpt2"`` the vocabulary and
merges become a byte-level BPE with the pre-tokenizer regex named by ``tokenizer.ggml.pre``;
tokens of type 3 (control) become special tokens, type 4 (user-defined) plain added tokens.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from typing import Any

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre` (the same regexes llama.cpp uses).
_PRE_TOKENIZER_REGEX = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "default": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Used when a model has no `tokenizer.chat_template`: plain ChatML, what Qwen models speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _text(v: Any) -> str:
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


class GGUFTokenizer:
    """Text <-> token ids for a GGUF model, plus its chat template."""

    def __init__(self, metadata: dict[str, Any]):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {kind!r}; pyqmoe supports byte-level BPE ('gpt2') only")
        pre = _text(metadata.get("tokenizer.ggml.pre", "default"))
        if pre not in _PRE_TOKENIZER_REGEX:
            raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported (known: {', '.join(_PRE_TOKENIZER_REGEX)})")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in metadata:
                raise ValueError(f"metadata key {key!r} is missing")
        self.tokens: list[str] = [_text(t) for t in metadata["tokenizer.ggml.tokens"]]
        types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(self.tokens)
        self.token_types: list[int] = [int(t) for t in types]
        merges = [tuple(_text(m).split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]

        vocab = {t: i for i, t in enumerate(self.tokens)}
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
        tok = Tokenizer(bpe)
        # Qwen's HF tokenizers normalise to NFC before splitting.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_TOKENIZER_REGEX[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(self.token_types) if t == TOKEN_TYPE_CONTROL]
        user = [i for i, t in enumerate(self.token_types) if t == TOKEN_TYPE_USER_DEFINED]
        tok.add_special_tokens([AddedToken(self.tokens[i], special=True, normalized=False) for i in special])
        if user:
            tok.add_tokens([AddedToken(self.tokens[i], special=False, normalized=False) for i in user])
        self.hf = tok
        self.special_ids = frozenset(special)
        self._byte_decoder = _byte_decoder()

        def opt_id(key):
            v = metadata.get(key)
            return int(v) if v is not None else None

        self.bos_id = opt_id("tokenizer.ggml.bos_token_id")
        self.eos_id = opt_id("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and self.bos_id is not None
        self.chat_template = _text(metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE)
        # Tokens that end a turn: EOS plus ChatML's <|im_end|> / <|endoftext|> when present.
        ends = {self.eos_id} if self.eos_id is not None else set()
        for name in ("<|im_end|>", "<|endoftext|>"):
            i = vocab.get(name)
            if i is not None:
                ends.add(i)
        self.stop_ids = frozenset(ends)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``special``: recognise special-token text like ``<|im_start|>``."""
        if special:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_plain(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        # Special-token text is ordinary text here: split around it so BPE sees it as characters.
        pieces, rest = [], text
        specials = sorted((self.tokens[i] for i in self.special_ids), key=len, reverse=True)
        while rest:
            hits = [(rest.find(s), s) for s in specials if s in rest]
            if not hits:
                pieces.append(rest)
                break
            at, s = min(hits)
            pieces += [rest[:at], s[:1], s[1:]]
            rest = rest[at + len(s) :]
        ids: list[int] = []
        for p in pieces:
            if p:
                ids += self.hf.encode(p, add_special_tokens=False).ids
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (special tokens: their text)."""
        t = self.tokens[token_id]
        if token_id in self.special_ids or self.token_types[token_id] == TOKEN_TYPE_USER_DEFINED:
            return t.encode("utf-8")
        try:
            return bytes(self._byte_decoder[c] for c in t)
        except KeyError:
            return t.encode("utf-8")

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def streamer(self, *, skip_special: bool = False) -> TokenStreamer:
        return TokenStreamer(self, skip_special)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
        """Renders ``messages`` ([{"role": ..., "content": ...}]) with the model's Jinja template."""
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals["raise_exception"] = raise_exception
        tmpl = env.from_string(self.chat_template)
        return tmpl.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokens[self.bos_id] if self.bos_id is not None else "",
            eos_token=self.tokens[self.eos_id] if self.eos_id is not None else "",
            **kwargs,
        )


class TokenStreamer:
    """Turns generated token ids into text pieces as soon as they form whole UTF-8 characters."""

    def __init__(self, tok: GGUFTokenizer, skip_special: bool):
        self._tok = tok
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self._skip and token_id in self._tok.special_ids:
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
