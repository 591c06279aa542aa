"""The `pyqmoe` command line. Thin: parse options, show progress, call Rust."""

from __future__ import annotations

import json
import sys

import click

from . import _core
from .gguf_file import GGUFFile
from .models import default_model_path


class _Group(click.Group):
    """Turns pyqmoe's errors into one clear line and a non-zero exit code, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (_core.PyqmoeError, OSError, KeyError) as e:
            msg = e.args[1] if isinstance(e, OSError) and len(e.args) > 1 else str(e)
            click.echo(f"pyqmoe: error: {msg}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("pyqmoe: interrupted; no output was left behind", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_core.__version__, prog_name="pyqmoe")
def main():
    """Quantize, inspect and run Mixture-of-Experts GGUF models on the CPU."""


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(file, as_json):
    """Show a GGUF file's metadata, tensors and size summary."""
    from .inspect_cmd import inspect_data, render_text

    f = GGUFFile(file)
    if as_json:
        click.echo(json.dumps(inspect_data(f), ensure_ascii=False, indent=1))
    else:
        click.echo(render_text(f))


_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _parse_size(ctx, param, value):
    """llama.cpp's gguf-split sizes: a number with an optional K/M/G/T suffix (powers of 1000)."""
    if value is None:
        return None
    v = value.strip().upper().removesuffix("B")
    unit = v[-1] if v and v[-1] in "KMGT" else ""
    try:
        n = float(v[: len(v) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size like 500M or 50G") from None
    if n <= 0:
        raise click.BadParameter(f"{value!r} must be more than 0")
    return int(n)


def _rules(custom_q: tuple[str, ...], tensor_type: tuple[str, ...]) -> list[tuple[str, str]]:
    """(REGEX=TYPE, option name) in priority order: --custom-q lists first, then --tensor-type."""
    rules = []
    for group in custom_q:
        rules += [(r.strip(), "--custom-q") for r in group.split(",") if r.strip()]
    rules += [(r, "--tensor-type") for r in tensor_type]
    return rules


def _print_summary(paths, n_tensors, n_elements, n_bytes, per_type):
    bpw = 8.0 * n_bytes / n_elements if n_elements else 0.0
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")
    click.echo(f"model size: {n_bytes / 2**30:.3f} GiB ({n_bytes / 2**20:.2f} MiB, {bpw:.2f} BPW), {n_tensors} tensors")
    for ty, n in sorted(per_type.items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  {ty}: {n} tensors")


def _parse_layers(ctx, param, value):
    """--prune-layers 3,7,11 -> [3, 7, 11]."""
    if not value:
        return []
    try:
        layers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer numbers") from None
    if not layers or any(x < 0 for x in layers):
        raise click.BadParameter(f"{value!r}: layer numbers must be >= 0")
    return sorted(set(layers))


def _print_plan(plan):
    nw = max(len(r[0]) for r in plan)
    total_out = n_elem = 0
    per_type: dict[str, int] = {}
    missing = []
    for name, dims, src_t, dst_t, convert, _in_b, out_b, note, needs_im, has_im, src_name in plan:
        shape = "x".join(str(d) for d in reversed(dims))
        action = f"{src_t:>7} -> {dst_t:<7}" if convert else f"{src_t:>7}    (copy)"
        tags = [note] if note else []
        if has_im:
            tags.append("imatrix")
        elif convert and needs_im:
            tags.append("NEEDS IMATRIX")
            missing.append(f"{src_name} ({dst_t})")
        if src_name != name:
            tags.append(f"from {src_name}")
        click.echo(
            f"{name:<{nw}}  {shape:<18} {action} {out_b / 2**20:10.3f} MiB" + (f"  [{'; '.join(tags)}]" if tags else "")
        )
        total_out += out_b
        n = 1
        for d in dims:
            n *= d
        n_elem += n
        per_type[dst_t.lower()] = per_type.get(dst_t.lower(), 0) + 1
    bpw = 8.0 * total_out / n_elem if n_elem else 0.0
    click.echo(f"total: {total_out / 2**30:.3f} GiB ({total_out / 2**20:.2f} MiB, {bpw:.2f} BPW), {len(plan)} tensors")
    for ty, n in sorted(per_type.items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  {ty}: {n} tensors")
    if missing:
        click.echo(
            f"warning: a real run needs importance data (--imatrix) for {len(missing)} tensor(s): "
            + ", ".join(missing),
            err=True,
        )


@main.command(context_settings={"show_default": True})
@click.argument("input", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.argument("type", required=False)
@click.argument("threads", type=click.IntRange(min=0), required=False)
@click.option(
    "--tensor-type",
    multiple=True,
    metavar="REGEX=TYPE",
    help="Type for tensors whose name matches REGEX (repeatable; first match wins).",
)
@click.option(
    "--custom-q",
    multiple=True,
    metavar="REGEX=TYPE,...",
    help="ik_llama.cpp-style comma-separated rules, checked before --tensor-type.",
)
@click.option("--token-embedding-type", metavar="TYPE", help="Type of token_embd.weight.")
@click.option("--output-tensor-type", metavar="TYPE", help="Type of output.weight.")
@click.option("--recipe", metavar="NAME|FILE.toml", help="A named recipe (pyqmoe recipes list) or a TOML recipe file.")
@click.option("--imatrix", type=click.Path(dir_okay=False, exists=True), help="Importance matrix (.dat or GGUF).")
@click.option("--include-weights", multiple=True, metavar="NAME", help="Use importance data only for these tensors.")
@click.option("--exclude-weights", multiple=True, metavar="NAME", help="Do not use importance data for these tensors.")
@click.option("--pure", is_flag=True, help="No preset mixture: every quantized tensor gets the preset's default type.")
@click.option("--leave-output-tensor", is_flag=True, help="Copy output.weight as it is.")
@click.option(
    "--prune-layers", callback=_parse_layers, metavar="L0,L1,...", help="Drop these blocks, renumber the rest."
)
@click.option("--allow-requantize", is_flag=True, help="Accept already-quantized inputs.")
@click.option("--keep-split", is_flag=True, help="Split the output like the (split) input.")
@click.option(
    "--split-max-size",
    callback=_parse_size,
    metavar="SIZE",
    help="Split the output into files of at most SIZE of tensor data (e.g. 50G).",
)
@click.option("--split-max-tensors", type=click.IntRange(min=1), help="At most N tensors per split file.")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensor, shape, from -> to, MiB) and totals only.")
def quantize(
    input,
    output,
    type,
    threads,
    tensor_type,
    custom_q,
    token_embedding_type,
    output_tensor_type,
    recipe,
    imatrix,
    include_weights,
    exclude_weights,
    pure,
    leave_output_tensor,
    prune_layers,
    allow_requantize,
    keep_split,
    split_max_size,
    split_max_tensors,
    dry_run,
):
    """Quantize INPUT to OUTPUT with preset TYPE (Q4_K_M, IQ4_XS, Q8_0, ...) using THREADS threads.

    TYPE is a llama.cpp preset: its mixture picks each tensor's type as llama-quantize does
    (--pure disables it). Norms and the MoE router stay as they are; a tensor whose rows are not
    whole blocks of its type falls back as llama.cpp does. The output appears only when complete.
    """
    from tqdm import tqdm

    rules = _rules(custom_q, tensor_type)
    if recipe:
        from . import recipes

        r = recipes.load(recipe)
        rules += r.rule_specs()  # command-line rules win over the recipe's
        token_embedding_type = token_embedding_type or r.token_embedding_type
        output_tensor_type = output_tensor_type or r.output_tensor_type
        type = type or r.default
    if not type:
        raise click.UsageError("missing TYPE (a preset such as Q4_K_M, or --recipe with a default)")
    options = dict(
        pure=pure,
        leave_output_tensor=leave_output_tensor,
        imatrix=imatrix,
        include_weights=list(include_weights),
        exclude_weights=list(exclude_weights),
        prune_layers=prune_layers,
        keep_split=keep_split,
    )
    if dry_run:
        plan, _meta = _core.quantize_plan(
            input, type, rules, token_embedding_type, output_tensor_type, allow_requantize, **options
        )
        _print_plan(plan)
        return

    bar = None

    def progress(event, *args):
        nonlocal bar
        if event == "start":
            total_bytes, n_tensors = args
            bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"quantize {n_tensors} tensors",
                dynamic_ncols=True,
            )
        else:
            _index, row = args
            bar.set_postfix_str(f"{row[0]} {row[2]}->{row[3]}", refresh=False)
            bar.update(row[5])

    try:
        summary = _core.quantize_model(
            input,
            output,
            type,
            rules,
            token_embedding_type,
            output_tensor_type,
            allow_requantize,
            split_max_size,
            split_max_tensors,
            threads,
            progress,
            **options,
        )
    finally:
        if bar is not None:
            bar.close()
    _print_summary(*summary)


@main.group()
def recipes():
    """Named quantization recipes (--recipe NAME)."""


@recipes.command("list")
def recipes_list():
    """List the built-in recipes."""
    from . import recipes as rc

    for name in rc.builtin_names():
        click.echo(f"{name:<20} {rc.load(name).description}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe's TOML (a built-in name or a file)."""
    from . import recipes as rc

    click.echo(rc.load(name).text.rstrip("\n"))


@main.group()
def models():
    """The model bundled with pyqmoe."""


@models.command("path")
def models_path():
    """Print the path of the bundled default model."""
    click.echo(str(default_model_path()))


# Running a model (generate / chat / bench / imatrix / perplexity / kld) lives in run_cli.py.
from .run_cli import bench, chat, generate, imatrix, kld, perplexity  # noqa: E402

main.add_command(generate)
main.add_command(chat)
main.add_command(bench)
main.add_command(imatrix)
main.add_command(perplexity)
main.add_command(kld)


if __name__ == "__main__":
    main()
