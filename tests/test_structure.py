"""The shape of the code: no import cycles among gte's modules, every module importable on its own, the library
never importing the command layer, files and the loop's functions of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gte"
MAX_FILE_LINES = 420  # "no file much over 400 lines"
MAX_FUNCTION_LINES = 80  # in the loop and the loader
LOOP_AND_LOADER = ("gte/train.py", "gte/engine.py", "gte/data/loader.py", "gte/data/stream.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def gte_imports(path: Path) -> set[str]:
    """gte modules imported anywhere in ``path`` (module level and inside functions), resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from gte import dist` imports the module gte.dist; `from gte.x import f` imports gte.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t.startswith("gte") and t != name:
                out.add(t)
    return out


GRAPH = {name: gte_imports(path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    # the check can fail: a two-module cycle through a function-level import is found
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle_among_gte_modules():
    # gte/__init__ is the version only; a package __init__ importing its children is not a cycle
    graph = {k: {w for w in v if not k.startswith(w + ".")} for k, v in GRAPH.items()}
    assert cycles(graph) == []


def test_the_library_never_imports_the_command_layer():
    offenders = {k: sorted(w for w in v if w.startswith("gte.commands") or w == "gte.cli")
                 for k, v in GRAPH.items() if not (k.startswith("gte.commands") or k in ("gte.cli", "gte.__main__"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of gte modules (torch stays loaded: one process, a few seconds)."""
    code = (
        "import importlib, sys, torch\n"
        f"names = {sorted(set(MODULES) - {'gte.__main__'})!r}\n"  # __main__ runs the CLI
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m == 'gte' or m.startswith('gte.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ""


def test_files_and_loop_functions_stay_readable():
    long_files = {str(p.relative_to(ROOT)): n for p in MODULES.values()
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert long_files == {}
    long_functions = []
    for rel in LOOP_AND_LOADER:
        path = ROOT / rel
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.name} ({n} lines)")
    assert long_functions == []


def test_every_package_is_installed():
    """pyproject lists packages by hand: a new sub-package missing there imports here (editable) but not when built."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set()
