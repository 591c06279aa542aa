"""`pyqmoe generate`, `pyqmoe chat` and `pyqmoe bench`: the commands that run a model."""

from __future__ import annotations

import json
import sys

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


def _load(model_path, threads, n_ctx):
    from .model import Model

    return Model(model_path, threads=threads, n_ctx=n_ctx)


def _sampling(kw) -> dict:
    return {k: kw[k] for k in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")}


@click.command()
@_model_option
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@_threads_option
@_sampling_options
def generate(model_path, prompt, threads, n_ctx, **kw):
    """Continue PROMPT with the model, streaming the text to stdout."""
    m = _load(model_path, threads, n_ctx)
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
def chat(model_path, threads, system, n_ctx, **kw):
    """Interactive chat: one user message per stdin line, replies streamed. Ctrl-D ends."""
    m = _load(model_path, threads, n_ctx)
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
def bench(model_path, n_prompt, n_gen, threads, repetitions, as_json):
    """Prompt-processing and generation speed in tokens/second (like llama-bench)."""
    from .model import bench as run_bench
    from .models import default_model_path

    r = run_bench(model_path or default_model_path(), n_prompt, n_gen, threads, repetitions)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"model: {r['model']}  threads: {r['threads']}")
    if r["pp_tok_s"] is not None:
        click.echo(f"pp{n_prompt}: {r['pp_tok_s']:10.2f} tok/s")
    if r["tg_tok_s"] is not None:
        click.echo(f"tg{n_gen}: {r['tg_tok_s']:10.2f} tok/s")
