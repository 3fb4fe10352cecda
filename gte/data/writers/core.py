"""Writing samples as design.md WebDataset shards: shard names, the atomic tar writer, ``write_split``.

Output, per split: ``OUT/<split>-000000.tar, …`` (:func:`shard_name`, :func:`shard_spec`) holding samples
``{key}.jpg|png|webp`` (the source bytes, never re-encoded unless the format is another one, then PNG), ``{key}.cls``
(ASCII int) and ``{key}.json``; plus ``OUT/shards.json`` (per shard: samples, bytes, counts per class and group — the
loader reads sample counts from it instead of scanning tar headers; gte.data.index owns it).

How it is written:
- The sample list is built first, in a fixed order (sorted; then shuffled with ``seed`` unless ``shuffle=False``, so
  that every shard mixes classes, which streaming training needs), and cut into shards of at most ``max_samples``
  samples and ``max_bytes`` bytes (sizes of the source files plus tar headers; a re-encoded image can differ).
- A shard is written to a temporary file and renamed to ``NAME.tar`` when complete (:func:`atomic_tar`,
  byte-deterministic: mtime 0). The plan's digest is recorded in ``shards.json`` before writing; re-running the same
  conversion skips every finished shard, while a different conversion into the same directory is refused
  (``overwrite=True`` replaces it).
- An image that cannot be read or identified (``check="header"``, the default; ``"decode"`` decodes fully; ``"none"``
  trusts the extension) is skipped and counted in the summary.
- ``image_format``: ``"auto"`` keeps each source file's bytes (JPEG, PNG, WebP; other formats become PNG), so a tree
  of mixed formats gives mixed members — which Hugging Face ``datasets`` refuses in one shard set; ``"jpg"`` or
  ``"png"`` re-encodes every other image (JPEG quality 95 / lossless PNG) so that all members share one extension.
- Beside ``shards.json``, ``_info.json`` describes the splits in timm's WebDataset format (``gte.data.index``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from gte.data.index import is_shard_of, read_side_index, update_side_index, write_timm_info
from gte.errors import GteError
from gte.io import atomic_path, check_writable

_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_FORMATS = ("auto", "jpg", "png")
JPEG_QUALITY = 95  # re-encoding for --image-format jpg: visually lossless, about 3x smaller than PNG
_TAR_OVERHEAD = 512 * 4  # per sample: 3 member headers + padding, roughly


# ------------------------------------------------------------------------------------------------ shard files


def shard_name(split: str, i: int) -> str:
    """File name of shard ``i`` of ``split``: ``<split>-NNNNNN.tar``."""
    return f"{split}-{i:06d}.tar"


def shard_spec(out: str | os.PathLike, split: str, shards: int) -> str:
    """The spec naming the ``shards`` shards of ``split`` in ``out`` (a brace range, or the one file)."""
    if shards == 1:
        return str(Path(out) / shard_name(split, 0))
    return str(Path(out) / f"{split}-{{000000..{shards - 1:06d}}}.tar")


@contextmanager
def atomic_tar(path: str | os.PathLike) -> Iterator:
    """A ``webdataset.TarWriter`` (no encoding, mtime 0: the bytes are a pure function of the samples) onto a
    temporary file that replaces ``path`` when the block completes; on any error it is removed, so readers never
    see a partial shard."""
    import webdataset as wds

    with atomic_path(path) as tmp, open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        yield sink


def output_dir(out: str | os.PathLike) -> Path:
    """``out``, created, once it is known that shards can be written there (one line before any image is read)."""
    check_writable(out, "--out")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ items, plans


def local_sources(src: str, out: str | os.PathLike, what: str) -> list[str]:
    """The absolute paths of the local shards ``src`` that ``what`` (e.g. "few-shot subsets") copies into ``out``;
    one-line errors for remote shards, ``out`` being the source directory, or ``out`` not writable (checked before
    any shard is read)."""
    from gte.data.spec import expand_spec, is_local, local_path

    urls = expand_spec(src)
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise GteError(f"{what} need local shards (got {remote[0]}): download them first")
    paths = [os.path.abspath(local_path(u)) for u in urls]
    if any(Path(p).parent == Path(out).resolve() for p in paths):
        raise GteError("--out must not be the source directory")
    check_writable(out, "--out")
    return paths


def parse_size(text: str | int) -> int:
    """``1000000``, ``"500MB"``, ``"1GiB"``, ``"2G"`` → bytes (0 = no limit)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m:
        raise GteError(f"not a size: '{text}' (e.g. 1GB, 500MB, 3000000)")
    base = 1024 if m.group(3) else 1000
    power = "kmgt".index(m.group(2)) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * base**power)


def safe_key(relative: str) -> str:
    """A WebDataset key from a relative file path without extension: dots and spaces become ``_`` (a key must not
    contain a dot, which would start the extension), path separators stay ``/``."""
    key = re.sub(r"[.\s]", "_", relative.replace(os.sep, "/"))
    return key.strip("/") or "_"


@dataclass
class Item:
    """One sample to write: its image file, label and json metadata."""

    key: str
    path: Path
    cls: int
    meta: dict = field(default_factory=dict)
    size: int = 0

    def digest_entry(self) -> list:
        return [self.key, str(self.path), self.cls, self.meta, self.size]


@dataclass
class SplitSummary:
    split: str
    samples: int = 0
    skipped: int = 0
    shards: int = 0
    written: int = 0          # shards written by this run (the others were already complete)
    classes: dict[int, int] = field(default_factory=dict)
    groups: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)  # image members per extension (jpg, png, webp)

    def add(self, entry: dict) -> None:
        """Count one shard from its ``shards.json`` entry (class and group keys are JSON strings)."""
        self.samples += entry["n"]
        self.skipped += entry.get("skipped", 0)
        for k, v in entry.get("classes", {}).items():
            self.classes[int(k)] = self.classes.get(int(k), 0) + v
        for k, v in entry.get("groups", {}).items():
            self.groups[int(k)] = self.groups.get(int(k), 0) + v
        for k, v in entry.get("formats", {}).items():
            self.formats[k] = self.formats.get(k, 0) + v


def _unique_keys(items: list[Item]) -> None:
    seen: dict[str, int] = {}
    for it in items:
        if it.key in seen:
            seen[it.key] += 1
            it.key = f"{it.key}-{seen[it.key]}"
        else:
            seen[it.key] = 0


def plan_shards(items: list[Item], max_samples: int, max_bytes: int) -> list[list[Item]]:
    """Consecutive runs of ``items`` with at most ``max_samples`` samples and ``max_bytes`` bytes (0 = no limit);
    a sample larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[Item]] = []
    cur: list[Item] = []
    cur_bytes = 0
    for it in items:
        cost = it.size + _TAR_OVERHEAD
        if cur and ((max_samples and len(cur) >= max_samples) or (max_bytes and cur_bytes + cost > max_bytes)):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += cost
    if cur:
        shards.append(cur)
    return shards


def _plan_digest(split: str, shards: list[list[Item]], settings: dict) -> str:
    h = hashlib.sha256(json.dumps([split, settings], sort_keys=True).encode())
    for shard in shards:
        h.update(json.dumps([it.digest_entry() for it in shard], default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


MAX_IMAGE_FILE_BYTES = 1 << 30  # 1 GiB: no photograph is larger; a device or a mistake would fill memory


def load_image_item(item: Item, check: str, image_format: str = "auto") -> tuple[dict | None, str]:
    """The sample dict of ``item`` (image bytes as stored, or re-encoded to ``image_format``), or (None, why) when the
    image is unusable."""
    try:
        st = os.stat(item.path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would hang the read, /dev/zero would never end
            return None, f"{item.path}: not a regular file"
        if st.st_size > MAX_IMAGE_FILE_BYTES:
            return None, f"{item.path}: {st.st_size} bytes, more than an image file should have ({MAX_IMAGE_FILE_BYTES})"
        data = item.path.read_bytes()
    except OSError as e:
        return None, f"{item.path}: {e.strerror or e}"
    ext = item.path.suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg"}.get(ext, ext)
    if check != "none" or ext not in ("jpg", "png", "webp") or image_format not in ("auto", ext):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                found = _FORMAT_EXT.get(im.format or "")
                target = (found or "png") if image_format == "auto" else image_format
                if found == target and check != "decode":
                    im.verify()
                else:
                    im.load()
                if found != target:  # another format: re-encoded
                    data = _encode(im, target)
                ext = target
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return None, f"{item.path}: not a readable image ({e})"
    return {"__key__": item.key, ext: data, "cls": str(item.cls).encode(),
            "json": json.dumps(item.meta, sort_keys=True).encode()}, ""


def _encode(im, ext: str) -> bytes:
    """A decoded image as JPEG (quality :data:`JPEG_QUALITY`) or PNG bytes, in 8-bit RGB."""
    from gte.data.images import to_rgb

    buf = io.BytesIO()
    if ext == "jpg":
        to_rgb(im).save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        to_rgb(im).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- writing
IMAGE_EXTS = ("jpg", "png", "webp")


def _write_shard(path: Path, shard: list[Item], loaded: Iterator[tuple[dict | None, str]], problems: list[str],
                 advance: Callable[[int], None]) -> dict:
    """Write the usable samples of ``shard`` (``loaded``: its items' (sample, why), in order) to ``path``
    atomically; returns the shard's ``shards.json`` entry. The first 20 problems of a split are kept."""
    n, skipped = 0, 0
    classes: dict[int, int] = {}
    groups: dict[int, int] = {}
    formats: dict[str, int] = {}
    with atomic_tar(path) as sink:
        for item, (sample, why) in zip(shard, loaded):
            if sample is None:
                skipped += 1
                if len(problems) < 20:
                    problems.append(why)
            else:
                sink.write(sample)
                n += 1
                classes[item.cls] = classes.get(item.cls, 0) + 1
                g = item.meta.get("group")
                if isinstance(g, int):
                    groups[g] = groups.get(g, 0) + 1
                for ext in IMAGE_EXTS:
                    if ext in sample:
                        formats[ext] = formats.get(ext, 0) + 1
            advance(skipped)
    return {"n": n, "bytes": path.stat().st_size, "skipped": skipped,
            "classes": {str(k): v for k, v in sorted(classes.items())},
            "groups": {str(k): v for k, v in sorted(groups.items())}, "formats": dict(sorted(formats.items()))}




def _ordered(items: list[Item], keep_order: bool, shuffle: bool, seed: int) -> list[Item]:
    """The write order (see the module docstring), with file sizes filled in for the byte limit."""
    if not keep_order:
        items = sorted(items, key=lambda it: it.key)
        _unique_keys(items)
        if shuffle:
            random.Random(f"gte-convert/{seed}").shuffle(items)
    for it in items:
        if not it.size:
            try:
                it.size = it.path.stat().st_size
            except OSError:
                it.size = 0
    return items


def _start_plan(out: Path, split: str, names: list[str], digest: str, planned: int, overwrite: bool) -> None:
    """Record the plan in ``shards.json``; shards of a different earlier conversion are refused (or removed)."""
    existing = sorted(p.name for p in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    recorded = read_side_index(out).get("splits", {}).get(split, {}).get("digest")
    if (recorded and recorded != digest) or (existing and not recorded):
        if not overwrite:
            raise GteError(f"{out} already holds '{split}' shards of a different conversion "
                           "(use --overwrite to replace them, or another --out)")
        for name in existing:
            (out / name).unlink()

    def record_plan(data: dict) -> None:
        data["splits"][split] = {"digest": digest, "shards": len(names), "samples_planned": planned}
        for name in list(data["shards"]):
            if is_shard_of(name, split) and name not in names:
                del data["shards"][name]

    update_side_index(out, record_plan)


def write_split(out: Path, split: str, items: list[Item], *, max_samples: int = 1000, max_bytes: int = 0,
                check: str = "header", workers: int = 4, overwrite: bool = False, shuffle: bool = True,
                seed: int = 0, console=None, description: str = "", keep_order: bool = False,
                load: Callable[[Item], tuple[dict | None, str]] | None = None,
                image_format: str = "auto") -> SplitSummary:
    """Write ``items`` as ``out/<split>-NNNNNN.tar`` (see the module docstring); returns the split's summary.

    ``keep_order``: write the items in the given order (no sorting, no shuffling). ``load``: item → (sample dict,
    "") or (None, why); default: read ``item.path`` as an image file, stored as ``image_format``.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    if check not in ("none", "header", "decode"):
        raise GteError(f"check must be none, header or decode, got '{check}'")
    if image_format not in IMAGE_FORMATS:
        raise GteError(f"image format must be {', '.join(IMAGE_FORMATS)}, got '{image_format}'")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
        raise GteError(f"split name '{split}' must use letters, digits, '_', '-', '.' only")
    if max_samples < 0 or max_bytes < 0 or (max_samples == 0 and max_bytes == 0):
        raise GteError("a shard needs a limit: max_samples > 0 or max_bytes > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = _ordered(items, keep_order, shuffle, seed)
    load = load or (lambda it: load_image_item(it, check, image_format))
    shards = plan_shards(items, max_samples, max_bytes)
    names = [shard_name(split, i) for i in range(len(shards))]
    # "auto" is left out of the digest: conversions made before the option existed stay the same conversion
    settings = {"check": check, **({"image_format": image_format} if image_format != "auto" else {})}
    _start_plan(out, split, names, _plan_digest(split, shards, settings), len(items), overwrite)
    summary = SplitSummary(split, shards=len(shards))
    index = read_side_index(out)["shards"]
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=console is None)
    with progress, ThreadPoolExecutor(max(1, workers)) as pool:
        task = progress.add_task(description or split, total=len(items), note="")

        def advance(skipped: int) -> None:  # one sample of the shard being written, ``skipped`` of them so far
            progress.update(task, advance=1, note=f"{summary.skipped + skipped} skipped")

        for name, shard in zip(names, shards):
            final = out / name
            entry = index.get(name)
            if final.is_file() and entry and entry.get("bytes") == final.stat().st_size:  # finished by an earlier run
                progress.update(task, advance=len(shard))
            else:
                entry = _write_shard(final, shard, pool.map(load, shard), summary.problems, advance)
                update_side_index(out, lambda data, name=name, entry=entry: data["shards"].__setitem__(name, entry))
                summary.written += 1
            summary.add(entry)
    write_timm_info(out)
    return summary
