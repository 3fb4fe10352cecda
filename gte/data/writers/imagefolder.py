"""``gte data shard imagefolder``: an ImageFolder tree (``root/<class>/…/<image>``) → shards + ``classes.json``."""

from __future__ import annotations

import os
from pathlib import Path

from gte.data.index import keep_class_names
from gte.data.writers.core import Item, SplitSummary, output_dir, safe_key, write_split
from gte.errors import GteError

IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


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
        twice = next((f for f in folders if classes.count(f) > 1), None)
        if twice is not None:  # ImageNet has two 'crane's and two 'maillot's: an image must not count for both
            where = [i for i, c in enumerate(classes) if c == twice]
            raise GteError(f"{root}: folder '{twice}' names classes {where} of the given list: it is ambiguous")
    if not classes:
        raise GteError(f"{root} has no class folders (expected root/<class>/<image>)")
    items: list[Item] = []
    # Every directory is walked once, and only below its own class: a symlink loop, an alias, or a link into
    # another class's folder adds nothing twice and nothing under the wrong class.
    seen = {os.path.realpath(root / name) for name in classes}
    for idx, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            kept = []
            for name_ in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, name_))
                if real not in seen:
                    seen.add(real)
                    kept.append(name_)
            dirnames[:] = kept
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
    out = output_dir(out)
    keep_class_names(out, classes)
    return [write_split(out, split, items, console=console, description=f"imagefolder {split}", **options)], classes
