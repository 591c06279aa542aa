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


@main.group()
def models():
    """The model bundled with pyqmoe."""


@models.command("path")
def models_path():
    """Print the path of the bundled default model."""
    click.echo(str(default_model_path()))


if __name__ == "__main__":
    main()
