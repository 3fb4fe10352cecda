"""``gte data shard``: write datasets as design.md WebDataset shards.

Sources: an ImageFolder tree (``root/<class>/…/<image>``), Waterbirds (``metadata.csv``), PASCAL VOC 2007/2012
(``Annotations/*.xml`` + ``ImageSets/Main/<split>.txt``). Shards in the HF ``timm/imagenet-1k-wds`` layout need no
conversion: the loader reads them as they are (``gte data info`` summarises them).

Output, per split: ``OUT/<split>-000000.tar, …`` holding samples ``{key}.jpg|png|webp`` (the source bytes, never
re-encoded unless the format is another one, then PNG), ``{key}.cls`` (ASCII int) and ``{key}.json``; plus
``OUT/classes.json`` (class names in index order) and ``OUT/shards.json`` (per shard: samples, bytes, counts per
class and group — the loader reads sample counts from it instead of scanning tar headers).

How it is written:
- The sample list is built first, in a fixed order (sorted; then shuffled with ``seed`` unless ``shuffle=False``, so
  that every shard mixes classes, which streaming training needs), and cut into shards of at most ``max_samples``
  samples and ``max_bytes`` bytes (sizes of the source files plus tar headers; a re-encoded image can differ).
- A shard is written as ``NAME.tar.tmp`` and renamed to ``NAME.tar`` when complete (byte-deterministic: mtime 0). The
  plan's digest is recorded in ``shards.json`` before writing; re-running the same conversion skips every finished
  shard, while a different conversion into the same directory is refused (``overwrite=True`` replaces it).
- An image that cannot be read or identified (``check="header"``, the default; ``"decode"`` decodes fully; ``"none"``
  trusts the extension) is skipped and counted in the summary.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from gte.data.tario import SIDE_INDEX
from gte.errors import GteError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_GROUPS = ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")  # group = 2·y + place
WATERBIRDS_SPLITS = {0: "train", 1: "val", 2: "test"}
IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_TAR_OVERHEAD = 512 * 4  # per sample: 3 member headers + padding, roughly


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


# ------------------------------------------------------------------------------------------------ shards.json


def _read_index(out: Path) -> dict:
    try:
        data = json.loads((out / SIDE_INDEX).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_index(out: Path, update: Callable[[dict], None]) -> None:
    data = _read_index(out)
    data.setdefault("splits", {})
    data.setdefault("shards", {})
    update(data)
    tmp = out / f"{SIDE_INDEX}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, out / SIDE_INDEX)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def check_classes_file(out: Path, names: list[str]) -> None:
    """Write ``classes.json``, or check that an existing one (from another split) agrees."""
    path = out / "classes.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != names:
            raise GteError(f"{path} lists other classes than this source ({len(old or [])} vs {len(names)}): "
                           "pass --classes with the first split's classes.json, or another --out")
        return
    write_json_atomic(path, names)


# ---------------------------------------------------------------------------------------------------- writing


def _load(item: Item, check: str) -> tuple[dict | None, str]:
    """The sample dict of ``item`` (image bytes as stored), or (None, why) when the image is unusable."""
    try:
        data = item.path.read_bytes()
    except OSError as e:
        return None, f"{item.path}: {e.strerror or e}"
    ext = item.path.suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg"}.get(ext, ext)
    if check != "none" or ext not in ("jpg", "png", "webp"):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                if check == "decode" or fmt not in _FORMAT_EXT:
                    im.load()
                else:
                    im.verify()
                if fmt in _FORMAT_EXT:
                    ext = _FORMAT_EXT[fmt]
                else:  # another format: stored as PNG
                    buf = io.BytesIO()
                    im.convert("RGB").save(buf, format="PNG")
                    data, ext = buf.getvalue(), "png"
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return None, f"{item.path}: not a readable image ({e})"
    return {"__key__": item.key, ext: data, "cls": str(item.cls).encode(),
            "json": json.dumps(item.meta, sort_keys=True).encode()}, ""


def _plan_digest(split: str, shards: list[list[Item]], settings: dict) -> str:
    h = hashlib.sha256(json.dumps([split, settings], sort_keys=True).encode())
    for shard in shards:
        h.update(json.dumps([it.digest_entry() for it in shard], default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def write_split(out: Path, split: str, items: list[Item], *, max_samples: int = 1000, max_bytes: int = 0,
                check: str = "header", workers: int = 4, overwrite: bool = False, shuffle: bool = True,
                seed: int = 0, console=None, description: str = "", keep_order: bool = False,
                load: Callable[[Item], tuple[dict | None, str]] | None = None) -> SplitSummary:
    """Write ``items`` as ``out/<split>-NNNNNN.tar`` (see the module docstring); returns the split's summary.

    ``keep_order``: write the items in the given order (no sorting, no shuffling). ``load``: item → (sample dict,
    "") or (None, why); default: read ``item.path`` as an image file.
    """
    import webdataset as wds
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    if check not in ("none", "header", "decode"):
        raise GteError(f"check must be none, header or decode, got '{check}'")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
        raise GteError(f"split name '{split}' must use letters, digits, '_', '-', '.' only")
    if max_samples < 0 or max_bytes < 0 or (max_samples == 0 and max_bytes == 0):
        raise GteError("a shard needs a limit: max_samples > 0 or max_bytes > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not keep_order:
        items = sorted(items, key=lambda it: it.key)
        _unique_keys(items)
        if shuffle:
            random.Random(f"gte-convert/{seed}").shuffle(items)
    load = load or (lambda it: _load(it, check))
    for it in items:
        if not it.size:
            try:
                it.size = it.path.stat().st_size
            except OSError:
                it.size = 0
    shards = plan_shards(items, max_samples, max_bytes)
    digest = _plan_digest(split, shards, {"check": check})
    names = [f"{split}-{i:06d}.tar" for i in range(len(shards))]
    existing = sorted(p.name for p in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    index = _read_index(out)
    recorded = index.get("splits", {}).get(split, {}).get("digest")
    if (recorded and recorded != digest) or (existing and not recorded):
        if not overwrite:
            raise GteError(f"{out} already holds '{split}' shards of a different conversion "
                           "(use --overwrite to replace them, or another --out)")
        for name in existing:
            (out / name).unlink()
        existing = []

    def record_plan(data: dict) -> None:
        data["splits"][split] = {"digest": digest, "shards": len(shards), "samples_planned": len(items)}
        for name in list(data["shards"]):
            if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", name) and name not in names:
                del data["shards"][name]

    _write_index(out, record_plan)
    summary = SplitSummary(split, shards=len(shards))
    index = _read_index(out)["shards"]
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=console is None)
    with progress, ThreadPoolExecutor(max(1, workers)) as pool:
        task = progress.add_task(description or split, total=len(items), note="")
        for name, shard in zip(names, shards):
            final = out / name
            entry = index.get(name)
            if final.is_file() and entry and entry.get("bytes") == final.stat().st_size:
                summary.samples += entry["n"]
                summary.skipped += entry.get("skipped", 0)
                for k, v in entry.get("classes", {}).items():
                    summary.classes[int(k)] = summary.classes.get(int(k), 0) + v
                for k, v in entry.get("groups", {}).items():
                    summary.groups[int(k)] = summary.groups.get(int(k), 0) + v
                progress.update(task, advance=len(shard))
                continue
            tmp = out / (name + ".tmp")
            n, skipped = 0, 0
            classes: dict[int, int] = {}
            groups: dict[int, int] = {}
            try:
                with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
                    for item, (sample, why) in zip(shard, pool.map(load, shard)):
                        if sample is None:
                            skipped += 1
                            if len(summary.problems) < 20:
                                summary.problems.append(why)
                        else:
                            sink.write(sample)
                            n += 1
                            classes[item.cls] = classes.get(item.cls, 0) + 1
                            g = item.meta.get("group")
                            if isinstance(g, int):
                                groups[g] = groups.get(g, 0) + 1
                        progress.update(task, advance=1, note=f"{summary.skipped + skipped} skipped")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, final)
            size = final.stat().st_size

            def record_shard(data: dict, name=name, n=n, size=size, skipped=skipped, classes=classes,
                             groups=groups) -> None:
                data["shards"][name] = {"n": n, "bytes": size, "skipped": skipped,
                                        "classes": {str(k): v for k, v in sorted(classes.items())},
                                        "groups": {str(k): v for k, v in sorted(groups.items())}}

            _write_index(out, record_shard)
            summary.samples += n
            summary.skipped += skipped
            summary.written += 1
            for k, v in classes.items():
                summary.classes[k] = summary.classes.get(k, 0) + v
            for k, v in groups.items():
                summary.groups[k] = summary.groups.get(k, 0) + v
    return summary


def shard_spec(out: Path, split: str, shards: int) -> str:
    if shards == 1:
        return str(Path(out) / f"{split}-000000.tar")
    return str(Path(out) / f"{split}-{{000000..{shards - 1:06d}}}.tar")


# ------------------------------------------------------------------------------------------------- converters


def imagefolder_items(root: Path, classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Items of ``root/<class>/…/<image>`` (class index = position in ``classes``, default the sorted folders)."""
    root = Path(root)
    if not root.is_dir():
        raise GteError(f"not a directory: {root}")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if classes is None:
        classes = folders
    else:
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise GteError(f"{root}: folder '{unknown[0]}' is not in the given class list")
    if not classes:
        raise GteError(f"{root} has no class folders (expected root/<class>/<image>)")
    items: list[Item] = []
    for idx, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_FILE_EXTS):
                    p = Path(dirpath) / fn
                    rel = p.relative_to(root).with_suffix("")
                    items.append(Item(safe_key(str(rel)), p, idx))
    if not items:
        raise GteError(f"no images under {root} (extensions: {', '.join(IMAGE_FILE_EXTS)})")
    return items, classes


def convert_imagefolder(root: Path, out: Path, *, split: str = "train", classes: list[str] | None = None,
                        console=None, **options) -> tuple[list[SplitSummary], list[str]]:
    items, classes = imagefolder_items(root, classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_classes_file(out, classes)
    return [write_split(out, split, items, console=console, description=f"imagefolder {split}", **options)], classes


def waterbirds_items(root: Path) -> dict[str, list[Item]]:
    """Items per split from ``root/metadata.csv`` (img_filename, y, place, split): cls = y, group = 2·y + place."""
    root = Path(root)
    meta_path = root / "metadata.csv"
    if not meta_path.is_file():
        raise GteError(f"no metadata.csv in {root} (expected the Waterbirds dataset directory)")
    with open(meta_path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"img_filename", "y", "place", "split"}
        if not need <= set(reader.fieldnames or ()):
            raise GteError(f"{meta_path} lacks column(s) {', '.join(sorted(need - set(reader.fieldnames or ())))}")
        splits: dict[str, list[Item]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                y, place, sp = int(row["y"]), int(row["place"]), int(row["split"])
            except ValueError:
                raise GteError(f"{meta_path}:{line}: y, place and split must be integers") from None
            if y not in (0, 1) or place not in (0, 1) or sp not in WATERBIRDS_SPLITS:
                raise GteError(f"{meta_path}:{line}: y and place must be 0/1 and split 0/1/2")
            fn = row["img_filename"]
            item = Item(safe_key(str(Path(fn).with_suffix(""))), root / fn, y,
                        {"group": 2 * y + place, "place": place, "path": fn})
            splits.setdefault(WATERBIRDS_SPLITS[sp], []).append(item)
    if not splits:
        raise GteError(f"{meta_path} lists no images")
    return splits


def convert_waterbirds(root: Path, out: Path, *, console=None, **options) -> tuple[list[SplitSummary], list[str]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_classes_file(out, list(WATERBIRDS_CLASSES))
    write_json_atomic(out / "groups.json", list(WATERBIRDS_GROUPS))
    splits = waterbirds_items(root)
    return [write_split(out, sp, splits[sp], console=console, description=f"waterbirds {sp}", **options)
            for sp in ("train", "val", "test") if sp in splits], list(WATERBIRDS_CLASSES)


def parse_voc_xml(path: Path) -> dict:
    """``{"labels", "boxes", "box_labels", "difficult", "size"}`` of one VOC annotation.

    Boxes: VOC's 1-based inclusive pixel corners become ``[xmin − 1, ymin − 1, xmax, ymax]``, i.e. 0-based with
    x1/y1 exclusive (design.md, gte.metrics). ``labels`` are the sorted distinct classes of all objects, difficult
    ones included (``difficult`` flags them per box).
    """
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise GteError(f"{path}: not a readable VOC annotation ({e})") from None
    root = tree.getroot()
    boxes, box_labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise GteError(f"{path}: unknown VOC class '{name}'")
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise GteError(f"{path}: a bndbox lacks numeric xmin/ymin/xmax/ymax") from None
        boxes.append([x0 - 1, y0 - 1, x1, y1])
        box_labels.append(VOC_CLASSES.index(name))
        difficult.append(int((obj.findtext("difficult") or "0").strip() or 0))
    size = root.find("size")
    wh = [int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0))] if size is not None else []
    return {"labels": sorted(set(box_labels)), "boxes": boxes, "box_labels": box_labels, "difficult": difficult,
            "size": wh}


def voc_items(root: Path, split: str) -> tuple[list[Item], list[str]]:
    """Items of ``ImageSets/Main/<split>.txt``; cls = the class of the largest box (multi-label: json.labels)."""
    root = Path(root)
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise GteError(f"no {ids_file} (expected a VOCdevkit/VOC20XX directory)")
    items, problems = [], []
    for line in ids_file.read_text().split("\n"):
        image_id = line.strip().split(" ")[0] if line.strip() else ""
        if not image_id:
            continue
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            problems.append(f"{image_id}: no annotation")
            continue
        ann = parse_voc_xml(xml)
        if not ann["boxes"]:
            problems.append(f"{image_id}: no objects")
            continue
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in ann["boxes"]]
        main = ann["box_labels"][max(range(len(areas)), key=lambda i: (areas[i], -i))]
        meta = {k: ann[k] for k in ("labels", "boxes", "box_labels", "difficult")}
        items.append(Item(safe_key(image_id), root / "JPEGImages" / f"{image_id}.jpg", main, meta))
    if not items:
        raise GteError(f"{ids_file}: no annotated images")
    return items, problems


def convert_voc(root: Path, out: Path, *, splits: Iterable[str] = ("trainval", "test"), console=None,
                **options) -> tuple[list[SplitSummary], list[str]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_classes_file(out, list(VOC_CLASSES))
    summaries = []
    for sp in splits:
        items, problems = voc_items(root, sp)
        s = write_split(out, sp, items, console=console, description=f"voc {sp}", **options)
        s.skipped += len(problems)
        s.problems = problems[:20] + s.problems
        summaries.append(s)
    return summaries, list(VOC_CLASSES)


# ---------------------------------------------------------------------------------------------------- summary


def summary_table(summaries: list[SplitSummary], class_names: list[str], group_names: list[str] | None = None,
                  max_rows: int = 30):
    """A rich table of samples per class (and group) per split; long class lists are shown as min/median/max."""
    from rich.table import Table

    t = Table(title="samples written", show_lines=False)
    t.add_column("class" if len(class_names) <= max_rows else "classes")
    for s in summaries:
        t.add_column(s.split, justify="right")
    if len(class_names) <= max_rows:
        for i, name in enumerate(class_names):
            t.add_row(f"{i} {name}", *(str(s.classes.get(i, 0)) for s in summaries))
    else:
        def stats(s: SplitSummary) -> str:
            v = sorted(s.classes.get(i, 0) for i in range(len(class_names)))
            return f"{v[0]} / {v[len(v) // 2]} / {v[-1]}"

        t.add_row(f"{len(class_names)} classes: min / median / max per class", *(stats(s) for s in summaries))
    if any(s.groups for s in summaries):
        groups = sorted({g for s in summaries for g in s.groups})
        for g in groups:
            name = group_names[g] if group_names and 0 <= g < len(group_names) else str(g)
            t.add_row(f"group {g} {name}", *(str(s.groups.get(g, 0)) for s in summaries))
    t.add_row("[bold]total", *(f"[bold]{s.samples}" for s in summaries))
    t.add_row("skipped", *(str(s.skipped) for s in summaries))
    t.add_row("shards (written now)", *(f"{s.shards} ({s.written})" for s in summaries))
    return t
