"""The ``gte`` command line: registers the subcommands of :mod:`gte.commands` and turns a :class:`GteError` into one
line on stderr and its exit code (2 for usage and input errors; 128 + N after signal N)."""

from __future__ import annotations

import errno
import os
import sys

import typer

from gte.commands import bench, distill, explain, precompute, recipes, teachers
from gte.commands import eval as evaluate
from gte.commands.data import data_app
from gte.errors import GteError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Good Teachers Explain: explanation-enhanced knowledge distillation (e2KD).")

for name, command in (("distill", distill.distill_command), ("train", distill.train_command),
                      ("recipes", recipes.recipes_command), ("eval", evaluate.eval_command),
                      ("explain", explain.explain_command), ("precompute", precompute.precompute_command),
                      ("bench", bench.bench_command), ("fetch-teachers", teachers.fetch_teachers_command)):
    app.command(name)(command)
app.add_typer(data_app, name="data")  # shard converters, few-shot subsets, shard info, loader benchmark


def _version(value: bool) -> None:
    if value:
        from gte import __version__

        print(f"gte {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    if debug:
        os.environ["GTE_DEBUG"] = "1"


def os_error_line(e: OSError) -> str:
    """An OSError as one line: what failed, on which path, and for a full disk, that it is the disk."""
    what = e.strerror or str(e)
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
    line = f"{what}: {paths}" if paths else what
    if e.errno == errno.ENOSPC:
        line += " (the disk is full: free space, or write elsewhere with --out; finished files are kept)"
    return line


def main() -> None:
    """Entry point: user errors become one line on stderr and their exit code."""
    try:
        app()
    except GteError as e:
        if os.environ.get("GTE_DEBUG"):
            raise
        print(f"gte: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # unreadable inputs, read-only or full output directories, …
        if os.environ.get("GTE_DEBUG"):
            raise
        print(f"gte: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
