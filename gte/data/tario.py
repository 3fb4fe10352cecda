"""Low-level WebDataset tar I/O: shard specs, sample keys, counts from tar headers, ranged sample reading.

A *sample* is a run of consecutive tar members sharing a key (WebDataset's rule: the member name up to the first dot
of its last path component; ``a/b.c.jpg`` has key ``a/b`` and extension ``c.jpg``). Samples are numbered 0, 1, … in
tar order; that index is what the loader's split plans refer to.

Counting reads tar *headers* only (local files are walked with seeks, image bytes are never read) and detects
truncation: a member whose data runs past the end of the file, or a missing end-of-archive block. A truncated shard's
count excludes its last, possibly incomplete sample, so a plan built from counts never asks for bytes that are not
there. Counts are cached per file (path, size, mtime) in memory and under ``$GTE_HOME/shard-index.json``, and read
from a ``shards.json`` written next to the shards by ``gte data shard`` / ``gte data fewshot`` when its recorded
byte size still matches the file.

Nothing here unpickles anything: member bytes are returned as bytes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gte.errors import GteError

# webdataset's own .pth decoder unpickles unless this is set; gte never decodes .pth, but keep any wds use safe.
os.environ.setdefault("WDS_PYTORCH_WEIGHTS_ONLY", "1")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIDE_INDEX = "shards.json"  # written by gte's writers next to the shards
_META = re.compile(r"__[^/]*__($|/)")
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


def split_name(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` of a tar member name, WebDataset's rule; ``(None, None)`` for names without one."""
    if _META.match(name):
        return None, None
    m = _NAME.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def expand_spec(spec: str) -> list[str]:
    """Shard URLs of a spec: brace ranges (``a-{000000..000009}.tar``), several specs joined with ``::``, shell
    globs (``dir/*.tar``) and directories (all ``*.tar`` inside, sorted). Local files must exist; a spec or glob
    that matches nothing is an error (one line, before any work)."""
    import braceexpand

    if not spec or not spec.strip():
        raise GteError("no shards given (empty data spec)")
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        for url in braceexpand.braceexpand(part):
            if not is_local(url):
                urls.append(url)
                continue
            path = local_path(url)
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not found:
                    raise GteError(f"no *.tar shards in directory {path}")
                urls.extend(found)
            elif glob.has_magic(path):
                found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
                if not found:
                    raise GteError(f"shard pattern matches no files: {path}")
                urls.extend(found)
            else:
                urls.append(url)
    if not urls:
        raise GteError(f"shard spec '{spec}' names no shards")
    missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GteError(f"shard file not found: {local_path(missing[0])}{more}")
    return urls


# ---------------------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class ShardCount:
    """What a header scan learns about one shard."""

    n: int                  # complete samples (a truncated shard's last, partial sample excluded)
    truncated: bool = False
    detail: str = ""        # why it counts as truncated


def _compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00"


def _scan_stream(path: str) -> ShardCount:
    """Count a compressed tar by decompressing it (no seeking possible)."""
    n, last_key = 0, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for m in tar:
                tar.members = []
                key, _ = split_name(m.name) if m.isreg() else (None, None)
                if key is not None and key != last_key:
                    n, last_key = n + 1, key
    except _TAR_ERRORS as e:
        return ShardCount(max(n - 1, 0), True, f"compressed tar is truncated or corrupt ({e})")
    return ShardCount(n)


def scan_shard(path: str) -> ShardCount:
    """Count the samples of a local tar from its headers (data is skipped with seeks, never read)."""
    size = os.path.getsize(path)
    if size == 0:
        return ShardCount(0)
    if _compressed(path):
        return _scan_stream(path)
    n, last_key, complete = 0, None, True
    detail = ""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                try:
                    m = tar.next()
                except _TAR_ERRORS as e:
                    complete, detail = False, f"unreadable tar header ({e})"
                    break
                if m is None:
                    break
                tar.members.clear()  # keep memory flat on big shards
                if not m.isreg():
                    continue
                key, _ = split_name(m.name)
                if key is None:
                    continue
                if m.offset_data + m.size > size:
                    complete, detail = False, f"member {m.name} runs past the end of the file"
                    if key != last_key:  # the partial sample was never counted
                        last_key = None
                    break
                if key != last_key:
                    n += 1
                    last_key = key
            end = tar.offset
        if complete:  # a whole tar ends with zero blocks; their absence means the file was cut at a member boundary
            with open(path, "rb") as f:
                f.seek(end)
                block = f.read(512)
            if len(block) < 512 or block.strip(b"\0"):
                complete, detail = False, "no end-of-archive block (file cut short or corrupt?)"
    except tarfile.ReadError as e:  # not a tar at all (or a compressed one we do not seek in)
        if n == 0:
            raise GteError(f"{path}: not a readable tar file ({e})") from None
        complete, detail = False, str(e)
    if not complete and last_key is not None:
        n -= 1  # the last sample may be missing members: never plan on it
    return ShardCount(max(n, 0), not complete, detail)


_cache_lock = threading.Lock()
_mem_cache: dict[tuple[str, int, int], ShardCount] = {}


def _cache_file() -> Path:
    from gte.paths import gte_home

    return gte_home() / "shard-index.json"


def _load_disk_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk_cache(entries: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = _load_disk_cache()
        old.update(entries)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(old))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-scan next time


def _side_index(directory: str) -> dict:
    try:
        return json.loads(Path(directory, SIDE_INDEX).read_text()).get("shards", {})
    except (OSError, ValueError, AttributeError):
        return {}


def shard_counts(urls: list[str]) -> list[ShardCount | None]:
    """Sample counts of shards (``None`` for remote URLs, which cannot be counted without reading them)."""
    out: list[ShardCount | None] = []
    disk: dict | None = None
    side: dict[str, dict] = {}
    fresh: dict[str, dict] = {}
    for url in urls:
        if not is_local(url):
            out.append(None)
            continue
        path = os.path.abspath(local_path(url))
        st = os.stat(path)
        mkey = (path, st.st_size, st.st_mtime_ns)
        with _cache_lock:
            hit = _mem_cache.get(mkey)
        if hit is None:
            d = os.path.dirname(path)
            if d not in side:
                side[d] = _side_index(d)
            entry = side[d].get(os.path.basename(path))
            if isinstance(entry, dict) and entry.get("bytes") == st.st_size and isinstance(entry.get("n"), int):
                hit = ShardCount(entry["n"])
        if hit is None:
            if disk is None:
                disk = _load_disk_cache()
            entry = disk.get(path)
            if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
                hit = ShardCount(entry["n"], entry.get("truncated", False), entry.get("detail", ""))
        if hit is None:
            hit = scan_shard(path)
            fresh[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "n": hit.n, "truncated": hit.truncated,
                           "detail": hit.detail}
        with _cache_lock:
            _mem_cache[mkey] = hit
        out.append(hit)
    if fresh:
        _save_disk_cache(fresh)
    return out


def count_samples(spec: str) -> int:
    """Number of complete samples in local shards (tar headers only; cached)."""
    counts = shard_counts(expand_spec(spec))
    if any(c is None for c in counts):
        raise GteError(f"cannot count the samples of remote shards in '{spec}': set data.train_size")
    return sum(c.n for c in counts)  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------------- reading


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
                              and _compressed(local_path(url))):
        yield from _iter_local(local_path(url), url, start, stop, stride, offset)
    else:
        yield from _iter_stream(url, start, stop, stride, offset)


class _Truncated(Exception):
    """A member's data runs past the end of the file."""


def _select(members: Iterator[tarfile.TarInfo], read, url: str, start: int, stop: int | None, stride: int,
            offset: int) -> Iterator[dict | ReadProblem]:
    """Group tar members into samples by key and keep the selected ones; ``read(member)`` is only called for those.

    Shared by the seeking (local) and the streaming reader; a read error ends the shard with a ReadProblem.
    """
    index, key, sample = -1, None, None
    try:
        for m in members:
            if not m.isreg():
                continue
            k, ext = split_name(m.name)
            if k is None:
                continue
            if k != key:
                if sample is not None:
                    yield sample
                    sample = None
                key, index = k, index + 1
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
    except _TAR_ERRORS as e:
        yield ReadProblem(url, max(index, 0), f"tar is truncated or corrupt ({e})")


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
    try:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except _TAR_ERRORS as e:
            yield ReadProblem(url, 0, f"not a readable tar ({e})")
            return

        def members() -> Iterator[tarfile.TarInfo]:
            while (m := tar.next()) is not None:  # raises on data cut short; None at the end or a zero header
                tar.members.clear()
                yield m

        def read(m: tarfile.TarInfo) -> bytes:  # seek straight to the member: unselected samples are never read
            if m.offset_data + m.size > size:
                raise _Truncated(f"tar is truncated inside {m.name}")
            f.seek(m.offset_data)
            data = f.read(m.size)
            if len(data) != m.size:
                raise _Truncated(f"tar is truncated inside {m.name}")
            return data

        yield from _select(members(), read, url, start, stop, stride, offset)
    finally:
        f.close()


def _iter_stream(url: str, start: int, stop: int | None, stride: int, offset: int):
    from webdataset import gopen

    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any opener failure is a read problem of this shard
        yield ReadProblem(url, start, str(e))
        return
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except _TAR_ERRORS as e:
            yield ReadProblem(url, 0, f"tar is truncated or corrupt ({e})")
            return

        def members() -> Iterator[tarfile.TarInfo]:
            for m in tar:
                tar.members = []
                yield m

        yield from _select(members(), lambda m: tar.extractfile(m).read(), url, start, stop, stride, offset)
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001
            pass


def iter_index(path: str, read: tuple[str, ...] = ("cls", "json")) -> Iterator[dict]:
    """One pass over a local shard's headers: per sample ``{"__key__", "__index__", "members": {ext: (offset,
    size)}, ext: bytes for ext in read}``. Only the ``read`` members' bytes are read (image data is seeked over).
    Stops quietly at the first sign of truncation, leaving out the possibly incomplete last sample."""
    size = os.path.getsize(path)
    if size == 0:
        return
    index, key, sample = -1, None, None
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except _TAR_ERRORS:
            return
        while True:
            try:
                m = tar.next()
            except _TAR_ERRORS:
                return
            if m is None:
                break
            tar.members.clear()
            if not m.isreg():
                continue
            k, ext = split_name(m.name)
            if k is None:
                continue
            if k != key:
                if sample is not None:
                    yield sample
                key, index = k, index + 1
                sample = {"__key__": k, "__index__": index, "members": {}}
            if m.offset_data + m.size > size:
                return  # the current sample is incomplete
            sample["members"][ext] = (m.offset_data, m.size)
            if ext in read:
                f.seek(m.offset_data)
                sample[ext] = f.read(m.size)
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
