"""What shards hold, without reading images: sample counts (a spec resolved once into a :class:`ShardSet`), the
``shards.json`` side index, class names.

Counting reads tar *headers* only (local files are walked with seeks, image bytes are never read) and detects
truncation: a member whose data runs past the end of the file, or a missing end-of-archive block. A truncated shard's
count excludes its last, possibly incomplete sample, so a plan built from counts never asks for bytes that are not
there. Counts are cached per file (path, size, mtime) in memory and under ``$GTE_HOME/shard-index.json``, and read
from a ``shards.json`` written next to the shards by ``gte data shard`` / ``gte data fewshot`` when its recorded
byte size still matches the file.

This module is the only reader and writer of the files gte keeps next to shards:

- ``shards.json``: ``{"splits": {split: {"digest", "shards", "samples_planned"}}, "shards": {name: {"n", "bytes",
  "skipped", "classes", "groups", "formats"}}}`` (written by gte.data.writers);
- ``_info.json``: the same splits in timm's WebDataset format (``timm/data/readers/reader_wds.py``: ``{"name",
  "splits": {split: {"name", "num_samples", "filenames", "shard_lengths"}}}``), so that timm's reader sizes them;
- ``classes.json``: the class names in index order (a JSON list of strings);
- ``groups.json``: the names of the ``json.group`` values in index order (Waterbirds' four, the demo's aligned and
  conflicting), read by ``gte eval`` and ``gte data info`` for their tables.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gte.data.spec import expand_spec, is_local, local_path
from gte.data.tar import TAR_ERRORS, is_compressed, split_name
from gte.errors import GteError
from gte.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from gte.text import clean_name

SIDE_INDEX = "shards.json"
TIMM_INFO = "_info.json"
CLASSES = "classes.json"
GROUPS = "groups.json"


# ---------------------------------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class ShardCount:
    """What a header scan learns about one shard."""

    n: int                  # complete samples (a truncated shard's last, partial sample excluded)
    truncated: bool = False
    detail: str = ""        # why it counts as truncated


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
    except TAR_ERRORS as e:
        return ShardCount(max(n - 1, 0), True, f"compressed tar is truncated or corrupt ({e})")
    return ShardCount(n)


def scan_shard(path: str) -> ShardCount:
    """Count the samples of a local tar from its headers (data is skipped with seeks, never read)."""
    size = os.path.getsize(path)
    if size == 0:
        return ShardCount(0)
    if is_compressed(path):
        return _scan_stream(path)
    n, last_key, complete = 0, None, True
    detail = ""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                try:
                    m = tar.next()
                except TAR_ERRORS as e:
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
    data = read_json(_cache_file(), {})
    return data if isinstance(data, dict) else {}


def _save_disk_cache(entries: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # other processes write their own temporary file (it carries the pid); threads of this one take turns
        with _cache_lock:
            old = _load_disk_cache()
            old.update(entries)
            atomic_write_json(path, old, indent=None)
    except OSError:
        pass  # a read-only home only costs a re-scan next time


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
                side[d] = _recorded_shards(d)
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


@dataclass(frozen=True)
class ShardSet:
    """A spec resolved once: its shard URLs and what a header scan learnt about each (``None`` for remote ones)."""

    spec: str
    urls: list[str]
    counts: list[ShardCount | None]

    @property
    def sizes(self) -> list[int] | None:
        """Complete samples per shard, or ``None`` when any shard is remote (uncounted)."""
        if any(c is None for c in self.counts):
            return None
        return [c.n for c in self.counts]  # type: ignore[union-attr]


def resolve_shards(data: str | ShardSet) -> ShardSet:
    """``data`` as a :class:`ShardSet`: a spec is expanded (gte.data.spec) and its local shards counted; a set is
    returned as it is."""
    if isinstance(data, ShardSet):
        return data
    urls = expand_spec(data)
    return ShardSet(data, urls, shard_counts(urls))


def count_samples(data: str | ShardSet) -> int:
    """Number of complete samples in local shards (tar headers only; cached)."""
    shards = resolve_shards(data)
    sizes = shards.sizes
    if sizes is None:
        raise GteError(f"cannot count the samples of remote shards in '{shards.spec}': set data.train_size")
    return sum(sizes)


# ------------------------------------------------------------------------------------------------ shards.json


def read_side_index(directory: str | os.PathLike) -> dict:
    """The ``shards.json`` of ``directory`` (``{}`` when it has none or it is unreadable)."""
    data = read_json(Path(directory, SIDE_INDEX), {})
    return data if isinstance(data, dict) else {}


def _recorded_shards(directory: str) -> dict:
    shards = read_side_index(directory).get("shards", {})
    return shards if isinstance(shards, dict) else {}


def split_group_counts(directory: str | os.PathLike, split: str = "train") -> dict[int, int] | None:
    """Samples per ``json.group`` of ``split``'s shards as ``shards.json`` records them (None where it records no
    such split or no groups): Waterbirds' training group sizes, for the weighted average of ``gte eval``."""
    counts: dict[int, int] = {}
    for name, entry in _recorded_shards(str(directory)).items():
        if is_shard_of(name, split) and isinstance(entry, dict) and isinstance(entry.get("groups"), dict):
            for k, v in entry["groups"].items():
                counts[int(k)] = counts.get(int(k), 0) + int(v)
    return counts or None


def update_side_index(directory: str | os.PathLike, update: Callable[[dict], None]) -> None:
    """Read ``shards.json``, let ``update`` change it in place, write it back atomically."""
    data = read_side_index(directory)
    data.setdefault("splits", {})
    data.setdefault("shards", {})
    update(data)
    atomic_write_text(Path(directory, SIDE_INDEX), json.dumps(data, indent=1, sort_keys=True))


def is_shard_of(name: str, split: str) -> bool:
    """True for the file name of a shard of ``split`` as gte data writes it: ``<split>-NNNNNN.tar``."""
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", name) is not None


def write_timm_info(directory: str | os.PathLike) -> dict:
    """Write ``_info.json`` from ``shards.json``: every split's finished shards, in order, with their sample counts;
    returns it."""
    recorded = _recorded_shards(str(directory))
    splits = {}
    for split in sorted(read_side_index(directory).get("splits", {})):
        names = sorted(n for n in recorded if is_shard_of(n, split))
        lengths = [int(recorded[n]["n"]) for n in names]
        splits[split] = {"name": split, "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}
    info = {"name": Path(directory).resolve().name, "splits": splits}
    atomic_write_json(Path(directory, TIMM_INFO), info)
    return info


# ----------------------------------------------------------------------------------------------- classes.json


def read_class_names(directory: str | os.PathLike) -> list[str] | None:
    """The class names of ``directory``'s ``classes.json`` (``None`` when missing, unreadable or not a list of
    strings)."""
    return _read_names(Path(directory, CLASSES))


def shard_class_names(shards: str | ShardSet) -> list[str] | None:
    """The class names of a shard set: the ``classes.json`` beside its first shard (local shards only)."""
    first = shards.urls[0] if isinstance(shards, ShardSet) else expand_spec(shards)[0]
    return read_class_names(Path(local_path(first)).parent) if is_local(first) else None


def read_group_names(directory: str | os.PathLike) -> list[str] | None:
    """The group names of ``directory``'s ``groups.json`` (``None`` when missing, unreadable or not a list of
    strings)."""
    return _read_names(Path(directory, GROUPS))


def write_group_names(directory: str | os.PathLike, names: list[str]) -> None:
    """Write ``directory/groups.json`` atomically."""
    atomic_write_json(Path(directory, GROUPS), list(names))


def _read_names(path: Path) -> list[str] | None:
    names = read_json(path)
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return [clean_name(n) for n in names]  # shown in tables and reports: bounded, control characters visible
    return None


def write_class_names(directory: str | os.PathLike, names: list[str]) -> None:
    """Write ``directory/classes.json`` atomically."""
    atomic_write_json(Path(directory, CLASSES), list(names))


def keep_class_names(directory: str | os.PathLike, names: list[str]) -> None:
    """Write ``classes.json``, or check that an existing one (from another split) agrees."""
    path = Path(directory, CLASSES)
    names = [clean_name(n) for n in names]  # as read back (folder names are file names: they may hold controls)
    if path.is_file():
        old = read_class_names(directory)
        if old != names:
            raise GteError(f"{path} lists other classes than this source ({len(old or [])} vs {len(names)}): "
                           "pass --classes with the first split's classes.json, or another --out")
        return
    write_class_names(directory, names)


def copy_names(source: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Copy ``source``'s ``classes.json`` and ``groups.json`` (verbatim) into ``directory``, those it has."""
    for name in (CLASSES, GROUPS):
        src = Path(source, name)
        if src.is_file():
            atomic_write_bytes(Path(directory, name), src.read_bytes())
