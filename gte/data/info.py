"""``gte data info``: what a shard spec holds (any design.md or timm-wds shards, read as they are)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from gte.data.index import ShardSet, resolve_shards
from gte.data.spec import is_local, local_path
from gte.data.tar import iter_index
from gte.errors import GteError


def shard_info(data: str | ShardSet, *, classes: bool = True) -> dict:
    """``{"shards", "samples", "empty": [...], "truncated": {url: why}}`` plus, with ``classes``, ``"classes": {cls:
    n}, "groups": {g: n}, "members": {ext: n}, "without_cls"`` (reads the small cls/json members)."""
    shards = resolve_shards(data)
    urls, counts = shards.urls, shards.counts
    if any(not is_local(u) for u in urls):
        raise GteError("gte data info reads local shards only")
    info: dict = {"shards": len(urls), "samples": sum(c.n for c in counts),  # type: ignore[union-attr]
                  "empty": [u for u, c in zip(urls, counts) if c.n == 0],  # type: ignore[union-attr]
                  "truncated": {u: c.detail for u, c in zip(urls, counts) if c.truncated}}  # type: ignore[union-attr]
    if classes:
        cls: Counter = Counter()
        groups: Counter = Counter()
        exts: Counter = Counter()
        no_cls = 0
        for url in urls:
            for s in iter_index(local_path(url), read=("cls", "json")):
                exts.update(s["members"].keys())
                try:
                    cls[int(s["cls"])] += 1
                except (KeyError, ValueError):
                    no_cls += 1
                if "json" in s:
                    try:
                        g = json.loads(s["json"]).get("group")
                    except (ValueError, AttributeError):
                        g = None
                    if isinstance(g, int):
                        groups[g] += 1
        info.update({"classes": {str(k): v for k, v in sorted(cls.items())},
                     "groups": {str(k): v for k, v in sorted(groups.items())},
                     "members": dict(sorted(exts.items())), "without_cls": no_cls})
    return info


def sample_labels(data: str | ShardSet) -> np.ndarray:
    """Every sample's ``cls`` in the order of the loader's ``index`` (shards in spec order, samples in tar order:
    ``batch["index"]`` of a sample is its position here); -1 where ``cls`` is missing or not an integer. Reads only
    tar headers and the small ``cls`` members (methods that need every label up front, e.g. CRD's negatives)."""
    shards = resolve_shards(data)
    if shards.sizes is None or any(not is_local(u) for u in shards.urls):
        raise GteError(f"every sample's label needs local shards gte can count, not '{shards.spec}'")
    out = np.full(sum(shards.sizes), -1, dtype=np.int64)
    start = 0
    for url, n in zip(shards.urls, shards.sizes):
        for s in iter_index(local_path(url), read=("cls",)):
            if s["__index__"] < n:  # a truncated tail is not counted, nor read by the loader
                try:
                    out[start + s["__index__"]] = int(s["cls"])
                except (KeyError, ValueError):
                    pass
        start += n
    return out
