"""WebDataset tar reading: the sample key rule, ranged sample reading, one-pass header walks.

A *sample* is a run of consecutive tar members sharing a key (WebDataset's rule: the member name up to the first dot
of its last path component; ``a/b.c.jpg`` has key ``a/b`` and extension ``c.jpg``). Samples are numbered 0, 1, … in
tar order; that index is what the loader's split plans refer to.

A truncated or corrupt tar never raises while reading: it ends the shard with a :class:`ReadProblem` item
(:func:`iter_samples`) or quietly before the possibly incomplete last sample (:func:`iter_index`).

Nothing here unpickles anything: member bytes are returned as bytes.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

from gte.data.spec import is_local, local_path

# webdataset's own .pth decoder unpickles unless this is set; gte never decodes .pth, but keep any wds use safe.
os.environ.setdefault("WDS_PYTORCH_WEIGHTS_ONLY", "1")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_META = re.compile(r"__[^/]*__($|/)")
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)  # what a truncated or corrupt tar raises


def split_name(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` of a tar member name, WebDataset's rule; ``(None, None)`` for names without one."""
    if _META.match(name):
        return None, None
    m = _NAME.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def is_compressed(path: str) -> bool:
    """True for a gzip, bzip2 or xz file (read as a stream: no seeking possible)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00"


@dataclass
class ReadProblem:
    """A shard stopped early: the rest of it is skipped. ``index`` is the sample index where reading stopped."""

    url: str
    index: int
    error: str


def _in_piece(i: int, start: int, stop: int | None, stride: int, offset: int) -> bool:
    return i >= start and (stop is None or i < stop) and i % stride == offset


def iter_samples(url: str, start: int = 0, stop: int | None = None, stride: int = 1,
                 offset: int = 0) -> Iterator[dict | ReadProblem]:
    """Samples ``i`` of one shard with ``start <= i < stop`` and ``i % stride == offset``, as raw dicts
    ``{"__key__", "__url__", "__index__", ext: bytes, …}``. A read error (truncated or corrupt tar) ends the shard
    with a :class:`ReadProblem` item instead of an exception. Local files skip unselected samples with seeks."""
    if is_local(url) and not (os.path.isfile(local_path(url)) and os.path.getsize(local_path(url))
                              and is_compressed(local_path(url))):
        yield from _iter_local(local_path(url), url, start, stop, stride, offset)
    else:
        yield from _iter_stream(url, start, stop, stride, offset)


class _Truncated(Exception):
    """A member's data runs past the end of the file."""


def _keyed(members: Iterable[tarfile.TarInfo]) -> Iterator[tuple[int, bool, str, str, tarfile.TarInfo]]:
    """``(sample index, first member of its sample?, key, extension, member)`` for each regular member that has a
    WebDataset key: members sharing a key form one sample (the convention :func:`split_name` implements)."""
    index, key = -1, None
    for m in members:
        if not m.isreg():
            continue
        k, ext = split_name(m.name)
        if k is None:
            continue
        first = k != key
        if first:
            key, index = k, index + 1
        yield index, first, k, ext, m


def _headers(tar: tarfile.TarFile, failed: list[bool]) -> Iterator[tarfile.TarInfo]:
    """The members of a seekable tar, forgotten as they pass; stops quietly at a header it cannot read (and notes it
    in ``failed``)."""
    while True:
        try:
            m = tar.next()
        except TAR_ERRORS:
            failed.append(True)
            return
        if m is None:
            return
        tar.members.clear()
        yield m


def _select(members: Iterator[tarfile.TarInfo], read, url: str, start: int, stop: int | None, stride: int,
            offset: int) -> Iterator[dict | ReadProblem]:
    """Group tar members into samples by key and keep the selected ones; ``read(member)`` is only called for those.

    Shared by the seeking (local) and the streaming reader; a read error ends the shard with a ReadProblem.
    """
    index, sample = -1, None
    try:
        for index, first, k, ext, m in _keyed(members):
            if first:
                if sample is not None:
                    yield sample
                    sample = None
                if stop is not None and index >= stop:
                    return
                if _in_piece(index, start, stop, stride, offset):
                    sample = {"__key__": k, "__url__": url, "__index__": index}
            if sample is not None:
                sample[ext] = read(m)
        if sample is not None:
            yield sample
    except _Truncated as e:
        yield ReadProblem(url, index, str(e))
    except TAR_ERRORS as e:
        yield ReadProblem(url, max(index, 0), f"tar is truncated or corrupt ({e})")


def _iter_tar(fileobj, mode: str, broken: str, members, read, url: str, start: int, stop: int | None, stride: int,
              offset: int) -> Iterator[dict | ReadProblem]:
    """Open ``fileobj`` as a tar (``broken`` names what a failure means) and select samples; closes it at the end.
    ``members(tar)`` walks the headers without keeping them; ``read(tar, member)`` returns a member's bytes."""
    try:
        try:
            tar = tarfile.open(fileobj=fileobj, mode=mode)
        except TAR_ERRORS as e:
            yield ReadProblem(url, 0, f"{broken} ({e})")
            return
        yield from _select(members(tar), lambda m: read(tar, m), url, start, stop, stride, offset)
    finally:
        try:
            fileobj.close()
        except Exception:  # noqa: BLE001 - a failing close of a read-only stream loses nothing
            pass


def _iter_local(path: str, url: str, start: int, stop: int | None, stride: int, offset: int):
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        yield ReadProblem(url, start, str(e))
        return
    if size == 0:
        f.close()
        return

    def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        while (m := tar.next()) is not None:  # raises on data cut short; None at the end or a zero header
            tar.members.clear()
            yield m

    def read(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:  # seek straight to the member: unselected
        if m.offset_data + m.size > size:                           # samples are never read
            raise _Truncated(f"tar is truncated inside {m.name}")
        f.seek(m.offset_data)
        data = f.read(m.size)
        if len(data) != m.size:
            raise _Truncated(f"tar is truncated inside {m.name}")
        return data

    yield from _iter_tar(f, "r:", "not a readable tar", members, read, url, start, stop, stride, offset)


def _iter_stream(url: str, start: int, stop: int | None, stride: int, offset: int):
    from webdataset import gopen

    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any opener failure is a read problem of this shard
        yield ReadProblem(url, start, str(e))
        return

    def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        for m in tar:
            tar.members = []
            yield m

    yield from _iter_tar(stream, "r|*", "tar is truncated or corrupt", members,
                         lambda tar, m: tar.extractfile(m).read(), url, start, stop, stride, offset)


def iter_index(path: str, read: tuple[str, ...] = ("cls", "json")) -> Iterator[dict]:
    """One pass over a local shard's headers: per sample ``{"__key__", "__index__", "members": {ext: (offset,
    size)}, ext: bytes for ext in read}``. Only the ``read`` members' bytes are read (image data is seeked over).
    Stops quietly at the first sign of truncation, leaving out the possibly incomplete last sample."""
    size = os.path.getsize(path)
    if size == 0:
        return
    sample = None
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except TAR_ERRORS:
            return
        failed: list[bool] = []
        for index, first, k, ext, m in _keyed(_headers(tar, failed)):
            if first:
                if sample is not None:
                    yield sample
                sample = {"__key__": k, "__index__": index, "members": {}}
            if m.offset_data + m.size > size:
                return  # the current sample is incomplete
            sample["members"][ext] = (m.offset_data, m.size)
            if ext in read:
                f.seek(m.offset_data)
                sample[ext] = f.read(m.size)
        if failed:
            return
        end = tar.offset
    if sample is not None:
        with open(path, "rb") as f:
            f.seek(end)
            block = f.read(512)
        if len(block) == 512 and not block.strip(b"\0"):
            yield sample


def read_members(path: str, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """The bytes of members located by :func:`iter_index`."""
    out = {}
    with open(path, "rb") as f:
        for ext, (offset, size) in sorted(members.items(), key=lambda kv: kv[1][0]):
            f.seek(offset)
            out[ext] = f.read(size)
            if len(out[ext]) != size:
                raise OSError(f"{path}: member {ext} cut short")
    return out
