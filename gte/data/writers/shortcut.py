"""``gte data shortcut``: a copy of a shard set where images of one class carry a shortcut pattern — a biased training
split made from anyone's data, as the demo's synthetic task ties the background to the class.

The rule (deterministic for a seed, whatever the shard layout): a sample of class ``K`` gets the pattern when
``unit(seed, "select", key) < share`` (:func:`gte.shortcuts.unit`); the pattern is the per-image transform of
:mod:`gte.shortcuts` (``patch`` or ``watermark``) applied to the decoded image at its own resolution, with the same
seed and key. A patched image is stored as PNG (lossless, so the pattern's pixels are exact) in place of its image
member; every other member and every other sample is copied verbatim. Samples without a readable ``cls`` or image are
skipped and counted. Local shards only.

Output: ``OUT/<split>-*.tar``, ``OUT/shards.json``, ``OUT/classes.json`` / ``groups.json`` (copied when the source
has them) and ``OUT/shortcut.json`` (arguments, rule, counts, the patched keys).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from gte.data.index import copy_names
from gte.data.tar import IMAGE_EXTS, iter_index, read_members
from gte.data.writers.core import Item, SplitSummary, local_sources, write_split
from gte.errors import GteError
from gte.io import atomic_write_json
from gte.shortcuts import Shortcut, unit

PER_IMAGE = ("patch", "watermark")  # background needs a second image: not a per-sample pattern


@dataclass
class ShortcutSplit:
    summary: SplitSummary
    patched: list[str]
    without_cls: int


def selected(seed: int, key: str, share: float) -> bool:
    """Whether a sample of the chosen class gets the pattern."""
    return unit(seed, "select", key) < share


def _group(raw: bytes | None) -> int | None:
    """``json.group`` of a sample's json member, when it has one."""
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        return None
    group = meta.get("group") if isinstance(meta, dict) else None
    return group if isinstance(group, int) and not isinstance(group, bool) else None


def _patched(data: bytes, shortcut: Shortcut, key: str) -> bytes:
    """The image ``data`` with the pattern, as PNG bytes."""
    import numpy as np
    import torch
    from PIL import Image

    from gte.data.images import to_rgb

    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(to_rgb(im), dtype=np.float32) / 255.0
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    y = shortcut(x, [key]).images[0].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.rint(y * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _loader(shortcut: Shortcut, keys: set[str]):
    def load(item: Item) -> tuple[dict | None, str]:
        try:
            members = read_members(str(item.path), item.meta["members"])
        except OSError as e:
            return None, str(e)
        if item.key in keys:
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                return None, f"{item.path}: sample {item.key} has no image member"
            try:
                png = _patched(members.pop(ext), shortcut, item.key)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                return None, f"{item.path}: sample {item.key}: not a readable image ({e})"
            members["png"] = png
        return {"__key__": item.key, **members}, ""

    return load


def shortcut_split(src: str, out: Path, shortcut: Shortcut, *, cls: int, share: float = 1.0, split: str = "train",
                   max_samples: int = 1000, max_bytes: int = 0, overwrite: bool = False,
                   console=None) -> ShortcutSplit:
    """Copy the shards ``src`` to ``out`` with the pattern on a ``share`` of class ``cls`` (module docstring)."""
    if shortcut.name not in PER_IMAGE:
        raise GteError(f"gte data shortcut makes {' or '.join(PER_IMAGE)} splits ('{shortcut.name}' needs two "
                       "images per sample; use it in gte eval --shortcut)")
    if not 0 < share <= 1:
        raise GteError(f"--share must be in (0, 1], got {share}")
    if cls < 0:
        raise GteError(f"--class must be a class index (>= 0), got {cls}")
    out = Path(out)
    paths = local_sources(src, out, "shortcut splits")
    # the settings are part of each item, so a different marking into the same --out is a different conversion
    mark = {"shortcut": shortcut.label, "options": shortcut.options, "seed": shortcut.seed, "class": cls,
            "share": share}
    items, keys, without_cls, seen = [], [], 0, set()
    for path in paths:
        for s in iter_index(path, read=("cls", "json")):
            try:
                label = int(s["cls"])
            except (KeyError, ValueError):
                without_cls += 1
                continue
            if s["__key__"] in seen:
                raise GteError(f"key '{s['__key__']}' occurs twice in {src}: patched samples are chosen by key")
            seen.add(s["__key__"])
            group = _group(s.get("json"))  # counted in shards.json, as the source's
            items.append(Item(s["__key__"], Path(path), label, {"members": s["members"], "mark": mark,
                                                                **({"group": group} if group is not None else {})},
                              sum(size for _, size in s["members"].values())))
            if label == cls and selected(shortcut.seed, s["__key__"], share):
                keys.append(s["__key__"])
    if not any(it.cls == cls for it in items):
        raise GteError(f"no sample of class {cls} in {src} ({len(items)} samples read): nothing to mark")
    out.mkdir(parents=True, exist_ok=True)
    copy_names(Path(paths[0]).parent, out)
    summary = write_split(out, split, items, max_samples=max_samples, max_bytes=max_bytes, workers=4,
                          overwrite=overwrite, keep_order=True, load=_loader(shortcut, set(keys)), console=console,
                          description=f"shortcut {shortcut.name}")
    summary.skipped += without_cls
    atomic_write_json(out / "shortcut.json", {
        "source": src, "shortcut": shortcut.label, "options": shortcut.options, "seed": shortcut.seed, "class": cls,
        "share": share, "rule": "a sample of the class is marked when unit(seed, 'select', key) < share",
        "samples": summary.samples, "without_cls": without_cls, "patched": keys})
    return ShortcutSplit(summary, keys, without_cls)
