"""The ``gte`` command line: registers the subcommands of :mod:`gte.commands` and turns a :class:`GteError` into one
line on stderr and its exit code (2 for usage and input errors; 128 + N after signal N)."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
import warnings
from typing import NoReturn

import typer

from gte.commands import bcosify, bench, compare, convert, distill, explain, precompute, recipes, teachers
from gte.commands import eval as evaluate
from gte.commands.data import data_app
from gte.errors import GteError, Interrupted
from gte.text import error_line

def _flags_without_type() -> None:
    """Typer's rich help prints ``<bool>`` after every flag (``--dry-run <bool>``) although a flag takes no value;
    its plain help already leaves the type out for flags (typer/core.py: ``if not self.is_flag``): do the same."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)  # older typer: no such hook, and no type printed
    if shown is None or getattr(shown, "gte_flags_without_type", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.gte_flags_without_type = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_type()
app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Good Teachers Explain: explanation-enhanced knowledge distillation (e2KD).")

# name, command, examples shown at the end of its --help
COMMANDS = (
    ("distill", distill.distill_command, "gte distill  ·  gte distill --recipe imagenet-fewshot --dry-run  ·  "
     "gte distill --recipe waterbirds --set distill.lambda_exp=5 --out runs/wb"),
    ("train", distill.train_command, "gte train --recipe waterbirds --set student.arch=resnet50 --out runs/teacher"),
    ("recipes", recipes.recipes_command, "gte recipes"),
    ("eval", evaluate.eval_command, "gte eval runs/x/model.safetensors --data 'data/imagenet/*val*.tar' --teacher "
     "bcos_densenet169 --json m.json --report runs/x/report"),
    ("compare", compare.compare_command, "gte compare runs/demo/seed-*/* --data 'data/test-*.tar' --teacher "
     "teacher.safetensors --report runs/compare"),
    ("explain", explain.explain_command, "gte explain photo.jpg --model runs/x/model.safetensors --teacher "
     "bcos_densenet169 --out explain.png"),
    ("precompute", precompute.precompute_command, "gte precompute --recipe imagenet-fewshot --out data/frozen "
     "--map-scale 2"),
    ("bench", bench.bench_command, "gte bench --recipe imagenet-fewshot --batch-size 16 --steps 5"),
    ("convert", convert.convert_command, "gte convert efficientnet-lite0.pth --arch timm/tf_efficientnet_lite0 "
     "--from lukemelas-efficientnet --classes imagenet --out teacher.safetensors"),
    ("bcosify", bcosify.bcosify_command, "gte bcosify teachers/lite0.safetensors --out teachers/lite0-bcos.safetensors "
     "--recipe own-teacher --set distill.method=kd"),
    ("fetch-teachers", teachers.fetch_teachers_command, "gte fetch-teachers --list  ·  gte fetch-teachers "
     "bcos_densenet169 --mirror /shared/release-files"),
)
for name, command, example in COMMANDS:
    extra = distill.EXTRA_ARGS if command in (distill.distill_command, distill.train_command) else None
    app.command(name, epilog=f"Example: {example}", context_settings=extra)(command)
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


def accelerate_launcher() -> int | None:
    """The pid of the ``accelerate launch`` that started this process as its only one (its "simple launcher",
    which waits for one child), or None."""
    if "WORLD_SIZE" in os.environ:  # started by torchrun, or by accelerate's multi-process launcher (torchrun's)
        return None
    from gte.dist import parent_args  # here, not at the top: gte.dist loads torch, which `gte --help` must not

    args = parent_args()
    for i, a in enumerate(args[:-1]):
        if a == "accelerate.commands.launch" or (os.path.basename(a) == "accelerate" and args[i + 1] == "launch"):
            return os.getppid()
    return None


def _exit(line: str, code: int) -> NoReturn:
    """Print ``gte: error: line`` and exit with ``code`` (the line bounded and its control characters made visible:
    messages echo file names and file content). Under ``accelerate launch``'s single-process launcher, end
    the launcher: for any non-zero exit of its child it raises CalledProcessError and prints a traceback of its own
    around gte's one line. SIGTERM ends it quietly (Python's default action; shells do not report it); the
    launch's exit status is then 143 (128 + SIGTERM) instead of 1."""
    launcher = accelerate_launcher()
    if launcher is not None:
        # Accelerate's launcher tees this process's stderr: on SIGTERM it drains the pipe in a thread, then ends this
        # process with SIGTERM. Ignore that while the line is written, and write it only once the launcher has had
        # time to switch to draining (a line its main loop has just read would be dropped by the SystemExit).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.kill(launcher, signal.SIGTERM)
        time.sleep(0.25)
    print(f"gte: error: {error_line(line)}", file=sys.stderr, flush=True)
    sys.exit(code)


_python_formatwarning = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None) -> str:
    """Python's warning text, its message as an :func:`~gte.text.error_line` (data warnings name shard files, sample
    keys and what a tar said)."""
    return _python_formatwarning(error_line(str(message)), category, filename, lineno, line)


def main() -> None:
    """Entry point: user errors become one line on stderr and their exit code."""
    warnings.formatwarning = _formatwarning
    try:
        app()
    except GteError as e:
        if os.environ.get("GTE_DEBUG"):
            raise
        if isinstance(e, Interrupted):
            from gte.dist import is_main  # here, not at the top: gte.dist loads torch, which `gte --help` must not

            if not is_main():  # rank 0 says where the checkpoint is, once
                sys.exit(e.exit_code)
        _exit(str(e), e.exit_code)
    except OSError as e:  # unreadable inputs, read-only or full output directories, …
        if os.environ.get("GTE_DEBUG"):
            raise
        _exit(os_error_line(e), 2)
    except KeyboardInterrupt:  # Ctrl-C before training installed its handler (which checkpoints): nothing to save
        if os.environ.get("GTE_DEBUG"):
            raise
        _exit("interrupted", 128 + signal.SIGINT)
