"""Running a model: ``pyqmoe.Model`` (eval, generate, chat) over the Rust engine ``_core.Engine``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from . import _core
from .gguf_file import GGUFFile
from .models import default_model_path
from .tokenizer import GGUFTokenizer


class Model:
    """A GGUF Qwen3-MoE / Qwen3 model on the CPU, with a KV cache of ``n_ctx`` positions.

    ``threads``: worker threads (None = one per core). ``kv_type``: the KV cache's storage, "f32",
    "f16" or "q8_0" (llama.cpp's ``-ctk``); ``kv_type_v``: a different type for the values (``-ctv``).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        threads: int | None = None,
        n_ctx: int = 512,
        kv_type: str = "f32",
        kv_type_v: str | None = None,
    ):
        self.path = Path(path) if path is not None else default_model_path()
        self._engine = _core.Engine(str(self.path), threads, int(n_ctx), kv_type, kv_type_v)
        self.metadata = GGUFFile(self.path).metadata
        self.tokenizer = GGUFTokenizer(self.metadata)
        self.config: dict = self._engine.config()
        self._tokens: list[int] = []  # what the KV cache holds, position by position

    def __repr__(self) -> str:
        c = self.config
        return f"Model({str(self.path)!r}, {c['arch']}, {c['n_layer']} layers, n_ctx={self.n_ctx})"

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    @property
    def n_past(self) -> int:
        return self._engine.n_past

    @property
    def n_threads(self) -> int:
        return self._engine.n_threads

    @property
    def cached_tokens(self) -> list[int]:
        return list(self._tokens)

    # --- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    # --- evaluation -----------------------------------------------------------------------
    def eval(self, tokens: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Runs ``tokens`` after the cached ones (appending them to the KV cache); returns float32
        logits [n_tokens, vocab], or [1, vocab] for the last token when ``all_logits`` is False."""
        toks = [int(t) for t in tokens]
        out = self._engine.eval(toks, all_logits)
        self._tokens += toks
        return out

    def score(self, tokens: Sequence[int], first: int = 0) -> np.ndarray:
        """Runs ``tokens`` after the cached ones (appending them) and returns float64 negative
        log-likelihoods of ``tokens[first + 1:]``, each given everything before it."""
        toks = [int(t) for t in tokens]
        out = self._engine.score(toks, int(first))
        self._tokens += toks
        return out

    def kl_divergence(self, tokens: Sequence[int], first: int, base_logits: np.ndarray):
        """Runs ``tokens`` after the cached ones and compares this model's logits at positions
        ``first..`` with ``base_logits`` (another model's, same tokens and positions). Returns
        (KL(base ‖ this) per position in nats, arg-max agreement per position, negative
        log-likelihoods of ``tokens[first + 1:]`` under this model, and under the base logits)."""
        toks = [int(t) for t in tokens]
        base = np.ascontiguousarray(base_logits, dtype=np.float32)
        out = self._engine.kl_divergence(toks, int(first), base)
        self._tokens += toks
        return out

    def reset(self) -> None:
        """Empties the KV cache."""
        self._engine.reset()
        self._tokens = []

    def truncate(self, n: int) -> None:
        """Keeps the first ``n`` cached positions."""
        self._engine.truncate(int(n))
        self._tokens = self._tokens[: int(n)]

    # --- generation -----------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stream: bool = True,
        stop_at_eos: bool = True,
    ) -> Iterator[str] | str:
        """Continues ``prompt`` (text or token ids). ``stream=True`` yields text pieces as they are
        made, else returns the whole text. Temperature 0 is greedy. The KV cache is reused for the
        longest common prefix with what it already holds (so chats do not recompute history)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        sampler = _core.Sampler(
            float(temperature),
            int(top_k),
            float(top_p),
            float(min_p),
            float(repeat_penalty),
            int(repeat_last_n),
            int(seed) & (2**64 - 1),
        )
        it = self._generate(ids, int(max_tokens), sampler, stop_at_eos)
        return it if stream else "".join(it)

    def _generate(self, ids: list[int], max_tokens: int, sampler, stop_at_eos: bool) -> Iterator[str]:
        # Reuse the cached prefix; at least one token must be evaluated to get fresh logits.
        common = 0
        for a, b in zip(self._tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        self.truncate(common)
        pending = ids[common:]
        if len(self._tokens) + len(pending) > self.n_ctx:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit in n_ctx={self.n_ctx}")
        history = list(ids)
        streamer = self.tokenizer.streamer(skip_special=True)
        for _ in range(max_tokens):
            if len(self._tokens) + len(pending) > self.n_ctx:
                break  # context full
            tok = self._engine.eval_and_sample(pending, sampler, history[-256:])
            self._tokens += pending
            if stop_at_eos and tok in self.tokenizer.stop_ids:
                break
            history.append(tok)
            pending = [tok]
            piece = streamer.push(tok)
            if piece:
                yield piece
        tail = streamer.flush()
        if tail:
            yield tail

    def chat(self, messages: Sequence[dict], **kwargs) -> Iterator[str] | str:
        """Replies to ``messages`` ([{"role": "user", "content": ...}, ...]) using the model's chat
        template; keyword arguments as for ``generate``."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenize(prompt, special=True), **kwargs)


def bench(
    path: str | Path,
    n_prompt: int = 512,
    n_gen: int = 128,
    threads: int | None = None,
    repeat: int = 1,
    kv_type: str = "f16",
    kv_type_v: str | None = None,
) -> dict:
    """llama-bench style speeds: prompt processing of ``n_prompt`` tokens in one batch, and
    generation of ``n_gen`` tokens one at a time from an empty cache, with an f16 KV cache by
    default as llama-bench. Returns tokens/second (best of ``repeat`` runs) and the settings."""
    m = Model(path, threads=threads, n_ctx=max(n_prompt, n_gen) + 1, kv_type=kv_type, kv_type_v=kv_type_v)
    rng = np.random.default_rng(0)
    vocab = m.config["n_vocab"]
    prompt = rng.integers(0, vocab, n_prompt).tolist()
    m.eval(prompt[: min(8, n_prompt)] or [0], all_logits=False)  # warm up: page in weights, start threads
    pp, tg = [], []
    for _ in range(max(1, repeat)):
        if n_prompt:
            m.reset()
            t0 = time.perf_counter()
            m.eval(prompt, all_logits=False)
            pp.append(n_prompt / (time.perf_counter() - t0))
        if n_gen:
            m.reset()
            tok = int(prompt[0]) if prompt else 0
            t0 = time.perf_counter()
            for _ in range(n_gen):
                logits = m.eval([tok], all_logits=False)
                tok = int(logits[0].argmax())
            tg.append(n_gen / (time.perf_counter() - t0))
    return {
        "model": str(m.path),
        "threads": m.n_threads,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "pp_tok_s": max(pp) if pp else None,
        "tg_tok_s": max(tg) if tg else None,
    }
