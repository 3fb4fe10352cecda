"""``gte data shard voc``: PASCAL VOC 2007/2012 (``Annotations/*.xml`` + ``ImageSets/Main/<split>.txt``) →
multi-label shards: ``json.labels``, ``json.boxes``, ``json.box_labels`` (the 20 classes, standard order)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable

from gte.data.index import keep_class_names
from gte.data.writers.core import Item, SplitSummary, output_dir, safe_key, write_split
from gte.errors import GteError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


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
    out = output_dir(out)
    keep_class_names(out, list(VOC_CLASSES))
    summaries = []
    for sp in splits:
        items, problems = voc_items(root, sp)
        s = write_split(out, sp, items, console=console, description=f"voc {sp}", **options)
        s.skipped += len(problems)
        s.problems = problems[:20] + s.problems
        summaries.append(s)
    return summaries, list(VOC_CLASSES)
