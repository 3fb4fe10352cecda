"""Atomic writes: a reader (or a run killed half-way) sees the old file or the new one, never half of one.

Every file gte writes that another process or a later run reads goes through here: the temporary file sits in the
same directory (so ``os.replace`` is a rename, atomic on POSIX) and carries the pid, so two processes writing the
same path never share a temporary file; a failed write removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from gte.errors import GteError


def temporary_path(path: str | os.PathLike) -> Path:
    """A hidden sibling of ``path`` that is this process's own."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # a read-only file system refuses even this: there is nothing to remove
                pass
        if isinstance(e, OSError) and e.errno and (e.filename is None or str(e.filename) == str(tmp)):
            # a full disk or a read-only directory is reported on the file the user asked for, not its temporary
            raise type(e)(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp)`` and move ``tmp`` over ``path`` atomically (for writers that take a file name)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (newline-terminated) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """``path`` parsed as JSON, or ``default`` when it is missing or unreadable (caches, side indexes)."""
    try:
        return checked_nesting(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
    except (OSError, ValueError, RecursionError, GteError):
        return default


MAX_NESTING = 32  # no file gte reads nests deeper; Python's json and tomllib recurse, and fail near 1000 levels


def _too_deep(where: str) -> GteError:
    return GteError(f"{where}: nested more than {MAX_NESTING} levels deep (a corrupt or crafted file?)")


def checked_nesting(value: Any, where: str) -> Any:
    """``value`` (parsed JSON/TOML) as it is, or a one-line error when lists/tables nest deeper than
    :data:`MAX_NESTING` (walked without recursion: printing or copying such a value would recurse too deeply)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if depth > MAX_NESTING:
                raise _too_deep(where)
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def loads_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` whose too-deep nesting is a one-line error naming ``where`` (not a RecursionError); a syntax
    error stays a ``json.JSONDecodeError`` for the caller to word."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep(where) from None
    return checked_nesting(value, where)


def loads_toml(text: str, where: str) -> dict[str, Any]:
    """``tomllib.loads`` whose too-deep nesting is a one-line error naming ``where``; a syntax error stays a
    ``tomllib.TOMLDecodeError`` for the caller to word."""
    import tomllib

    try:
        value = tomllib.loads(text)
    except RecursionError:
        raise _too_deep(where) from None
    return checked_nesting(value, where)


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """One line before any work when files cannot be made in ``directory`` (or, where it does not exist yet, in the
    nearest folder above it, where it would be created): a read-only file system, no permission, or a file."""
    d = Path(directory).absolute()
    while not d.exists() and d.parent != d:
        d = d.parent
    if not d.is_dir():
        raise GteError(f"{what} {directory}: {d} is a file, not a directory")
    if not os.access(d, os.W_OK | os.X_OK):  # EROFS answers here for root too; file modes only for other users
        why = "read-only file system" if os.statvfs(d).f_flag & os.ST_RDONLY else "permission denied"
        raise GteError(f"{what} {directory}: cannot write there ({why}); nothing was written")


def is_file(path: str | os.PathLike) -> bool:
    """True for a readable regular file, False when there is none; a one-line error when the path may not be read
    (``Path.is_file()`` answers False there, and the user is told "no such file" for a permission problem)."""
    try:
        found = stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise GteError(f"{path}: permission denied") from None
    if found:
        try:  # opening, not os.access: it also answers for root, ACLs and kernel files that refuse every reader
            os.close(os.open(path, os.O_RDONLY))
        except PermissionError:
            raise GteError(f"{path}: permission denied") from None
    return found
