"""``gte data shard waterbirds``: Waterbirds (``metadata.csv``) → train/val/test shards; cls = y,
group = 2·y + place (``groups.json`` names the four groups)."""

from __future__ import annotations

import csv
from pathlib import Path

from gte.data.index import keep_class_names, write_group_names
from gte.data.writers.core import Item, SplitSummary, output_dir, safe_key, write_split
from gte.errors import GteError

WATERBIRDS_CLASSES = ("landbird", "waterbird")
# group = 2·y + place; the minority groups 1 and 2 are the out-of-distribution ones (gte eval --waterbirds)
WATERBIRDS_GROUPS = ("landbird-on-land", "landbird-on-water", "waterbird-on-land", "waterbird-on-water")
WATERBIRDS_SPLITS = {0: "train", 1: "val", 2: "test"}


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
    out = output_dir(out)
    keep_class_names(out, list(WATERBIRDS_CLASSES))
    write_group_names(out, list(WATERBIRDS_GROUPS))
    splits = waterbirds_items(root)
    return [write_split(out, sp, splits[sp], console=console, description=f"waterbirds {sp}", **options)
            for sp in ("train", "val", "test") if sp in splits], list(WATERBIRDS_CLASSES)
