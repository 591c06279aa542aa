"""`pyqmoe generate`, `chat`, `bench` and `imatrix`: the commands that run a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

_model_option = click.option(
    "-m",
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="GGUF model (default: the bundled model).",
)
_threads_option = click.option(
    "-t", "--threads", type=click.IntRange(min=1), default=None, help="Threads (default: all cores)."
)


_KV_TYPES = click.Choice(["f32", "f16", "q8_0"], case_sensitive=False)


def _kv_options(f):
    """llama.cpp's -ctk / -ctv: the KV cache's storage type (values default to the keys' type)."""
    f = click.option("-ctv", "--cache-type-v", "kv_type_v", type=_KV_TYPES, default=None, help="V cache type.")(f)
    return click.option(
        "-ctk", "--cache-type-k", "kv_type", type=_KV_TYPES, default="f16", show_default=True, help="K cache type."
    )(f)


def _sampling_options(f):
    opts = [
        click.option("-n", "--max-tokens", type=click.IntRange(min=0), default=128, show_default=True),
        click.option("--temp", "temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True),
        click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Random seed (default: random)."),
        click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=1), default=4096, show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _load(model_path, threads, n_ctx, kv_type="f16", kv_type_v=None):
    from .model import Model

    return Model(model_path, threads=threads, n_ctx=n_ctx, kv_type=kv_type, kv_type_v=kv_type_v)


def _sampling(kw) -> dict:
    return {k: kw[k] for k in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")}


@click.command()
@_model_option
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@_threads_option
@_sampling_options
@_kv_options
def generate(model_path, prompt, threads, n_ctx, kv_type, kv_type_v, **kw):
    """Continue PROMPT with the model, streaming the text to stdout."""
    m = _load(model_path, threads, n_ctx, kv_type, kv_type_v)
    click.echo(prompt, nl=False)
    for piece in m.generate(prompt, **_sampling(kw)):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@click.command()
@_model_option
@_threads_option
@click.option("-s", "--system", default=None, help="System prompt.")
@_sampling_options
@_kv_options
def chat(model_path, threads, system, n_ctx, kv_type, kv_type_v, **kw):
    """Interactive chat: one user message per stdin line, replies streamed. Ctrl-D ends."""
    m = _load(model_path, threads, n_ctx, kv_type, kv_type_v)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in m.chat(messages, **_sampling(kw)):
            reply.append(piece)
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        messages.append({"role": "assistant", "content": "".join(reply)})


@click.command()
@_model_option
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=512, show_default=True)
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=128, show_default=True)
@_threads_option
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=1, show_default=True, help="Best of N runs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_kv_options
def bench(model_path, n_prompt, n_gen, threads, repetitions, as_json, kv_type, kv_type_v):
    """Prompt-processing and generation speed in tokens/second (like llama-bench)."""
    from .model import bench as run_bench
    from .models import default_model_path

    r = run_bench(
        model_path or default_model_path(), n_prompt, n_gen, threads, repetitions, kv_type=kv_type, kv_type_v=kv_type_v
    )
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"model: {r['model']}  threads: {r['threads']}")
    if r["pp_tok_s"] is not None:
        click.echo(f"pp{n_prompt}: {r['pp_tok_s']:10.2f} tok/s")
    if r["tg_tok_s"] is not None:
        click.echo(f"tg{n_gen}: {r['tg_tok_s']:10.2f} tok/s")


@click.command()
@_model_option
@click.option("-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False), help="Calibration text.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output: .dat (legacy) or .gguf.")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks (default: all).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@_threads_option
def imatrix(model_path, text_file, output, chunks, ctx, threads):
    """Importance matrix of the model over a text, as llama.cpp's llama-imatrix computes it.

    The text is cut into --ctx-token chunks, each evaluated from an empty KV cache; every weight
    multiply of the layers records the sum of its squared inputs per column and its token count
    (for experts: per expert, over the tokens routed to it). Written in llama.cpp's legacy format
    for a .dat OUTPUT, else in its GGUF imatrix format.
    """
    from tqdm import tqdm

    from .model import Model

    path = _text_job(model_path, text_file, chunks, ctx, 2, "--ctx")
    if not Path(output).resolve().parent.is_dir():
        raise click.ClickException(f"-o/--output: the folder of {output} does not exist")
    legacy = Path(output).suffix.lower() == ".dat"

    m = Model(path, threads=threads, n_ctx=ctx)
    with open(text_file, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    # llama.cpp's -f drops one trailing newline; it tokenizes with BOS (if the model wants it) and
    # without parsing special-token text.
    text = text[:-1] if text.endswith("\n") else text
    tokens = m.tokenize(text, special=False)
    if len(tokens) < 2 * ctx:
        raise click.ClickException(
            f"-f/--file: {text_file} has {len(tokens)} tokens; --ctx {ctx} needs at least {2 * ctx}"
        )
    n_chunk = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
    for i in tqdm(range(n_chunk), desc="imatrix", unit="chunk", dynamic_ncols=True):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            chunk[0] = bos  # llama-imatrix starts every chunk with BOS when the model uses one
        m._engine.imatrix_chunk(chunk)
    try:
        m._engine.imatrix_save(str(output), ctx, str(text_file), legacy)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"-o/--output: {e}") from None
    fmt = "legacy .dat" if legacy else "GGUF"
    click.echo(f"wrote {output} ({fmt}, {n_chunk} chunks of {ctx} tokens)", err=True)


@click.command()
@_model_option
@click.option("-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False), help="Text to score.")
@click.option("-c", "--ctx-size", "ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, default=None, help="Score at most this many chunks (default: all).")
@_threads_option
@_kv_options
def perplexity(model_path, text_file, ctx, chunks, threads, kv_type, kv_type_v):
    """Perplexity of the model over a text, as llama.cpp's llama-perplexity computes it.

    The text is cut into --ctx-size-token chunks, each evaluated from an empty KV cache (the first
    token replaced by BOS where the model adds one); the second half of each chunk is scored.
    Prints the running estimate per chunk and the final PPL with its standard error.
    """
    import math

    import numpy as np

    tokens, n_chunk, bos, first, m = _chunked_text(model_path, text_file, ctx, chunks, threads, kv_type, kv_type_v)
    nll: list[np.ndarray] = []
    click.echo(f"perplexity: {n_chunk} chunks of {ctx} tokens, scoring the last {ctx - first - 1} of each", err=True)
    for i in range(n_chunk):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        m.reset()
        nll.append(m.score(chunk, first))
        click.echo(f"[{i + 1}]{math.exp(np.concatenate(nll).mean()):.4f},", nl=False)
        sys.stdout.flush()
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    ppl = math.exp(mean)
    var = float((all_nll**2).mean()) - mean * mean
    err = ppl * math.sqrt(var / (all_nll.size - 1)) if var > 0 and all_nll.size > 1 else 0.0
    click.echo(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}")


@click.command()
@click.option("-b", "--base", "base_path", required=True, type=click.Path(dir_okay=False), help="Reference GGUF.")
@_model_option
@click.option("-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False), help="Text to score.")
@click.option("-c", "--ctx-size", "ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks (default: all).")
@_threads_option
def kld(base_path, model_path, text_file, ctx, chunks, threads):
    """KL divergence of MODEL from a BASE model (e.g. a quantization from its BF16 original) over a
    text, with llama-perplexity's chunking: the second half of every --ctx-size chunk is compared.

    Prints mean KLD (with standard error), its median / 99th percentile / maximum, how often the
    two models' most likely tokens agree, and both perplexities.
    """
    import math

    import numpy as np

    from .model import Model

    tokens, n_chunk, bos, first, m = _chunked_text(model_path, text_file, ctx, chunks, threads)
    base = Model(base_path, threads=threads, n_ctx=ctx)
    if base.config["n_vocab"] != m.config["n_vocab"]:
        raise click.ClickException(
            f"--base has {base.config['n_vocab']} tokens in its vocabulary, the model {m.config['n_vocab']}"
        )
    kls, same, nll_q, nll_b = [], [], [], []
    for i in range(n_chunk):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        base.reset()
        logits = base.eval(chunk)
        m.reset()
        kl, agree, nll, base_nll = m.kl_divergence(chunk, first, logits[first:])
        kls.append(kl)
        same.append(agree)
        nll_q.append(nll)
        nll_b.append(base_nll)
        click.echo(f"[{i + 1}]{np.concatenate(kls).mean():.6f},", nl=False)
        sys.stdout.flush()
    kl = np.concatenate(kls)
    agree = np.concatenate(same)
    err = kl.std(ddof=1) / math.sqrt(kl.size) if kl.size > 1 else 0.0
    ppl_b, ppl_q = (math.exp(np.concatenate(x).mean()) for x in (nll_b, nll_q))
    click.echo("")
    click.echo(f"Mean    KLD: {kl.mean():10.6f} +/- {err:.6f}")
    click.echo(f"Median  KLD: {np.median(kl):10.6f}")
    click.echo(f"99.0%   KLD: {np.percentile(kl, 99):10.6f}")
    click.echo(f"Maximum KLD: {kl.max():10.6f}")
    click.echo(f"Same top token: {100 * agree.mean():.3f} % of {agree.size}")
    click.echo(f"PPL(base) = {ppl_b:.4f}   PPL(model) = {ppl_q:.4f}   ratio = {ppl_q / ppl_b:.5f}")


def _chunked_text(model_path, text_file, ctx, chunks, threads, kv_type="f32", kv_type_v=None):
    """The model and the text's tokens for llama-perplexity-style chunks: (tokens, number of
    chunks, BOS id or None, first scored position, model)."""
    from .model import Model

    path = _text_job(model_path, text_file, chunks, ctx, 4, "--ctx-size")
    m = Model(path, threads=threads, n_ctx=ctx, kv_type=kv_type, kv_type_v=kv_type_v)
    with open(text_file, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    tokens = m.tokenize(text, special=False)
    if len(tokens) < 2 * ctx:
        raise click.ClickException(f"-f/--file: {text_file} has {len(tokens)} tokens; --ctx-size {ctx} needs {2 * ctx}")
    n_chunk = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
    return tokens, n_chunk, bos, ctx // 2, m


def _text_job(model_path, text_file, chunks, ctx, min_ctx, ctx_option):
    """Checks the options every command over a text shares; returns the model's path."""
    from .gguf_file import GGUFFile
    from .models import default_model_path

    path = Path(model_path) if model_path else default_model_path()
    if chunks is not None and chunks < 1:
        raise click.ClickException(f"--chunks must be at least 1, not {chunks}")
    if not Path(text_file).is_file():
        raise click.ClickException(f"-f/--file: {text_file} is not a readable file")
    meta = GGUFFile(path).metadata
    n_train = meta.get(f"{meta.get('general.architecture')}.context_length")
    if ctx < min_ctx or (n_train and ctx > n_train):
        raise click.ClickException(
            f"{ctx_option} must be between {min_ctx} and the model's context {n_train}, not {ctx}"
        )
    return path
