"""``gte data info``: what a shard spec holds (any design.md or timm-wds shards, read as they are)."""

from __future__ import annotations

import json
import os
from collections import Counter

from gte.data.tario import expand_spec, is_local, iter_index, local_path, shard_counts
from gte.errors import GteError


def shard_info(spec: str, *, classes: bool = True, console=None) -> dict:
    """``{"shards", "samples", "truncated": [...], "classes": {cls: n}, "groups": {g: n}, "extensions": {...}}``."""
    urls = expand_spec(spec)
    if any(not is_local(u) for u in urls):
        raise GteError("gte data info reads local shards only")
    counts = shard_counts(urls)
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
    if console is not None:
        _print(info, urls, console)
    return info


def _print(info: dict, urls: list[str], console) -> None:
    from rich.table import Table

    t = Table(title=f"{info['samples']} samples in {info['shards']} shards "
                    f"({os.path.dirname(local_path(urls[0])) or '.'})")
    t.add_column("what")
    t.add_column("value", overflow="fold")
    if "classes" in info:
        v = list(info["classes"].values())
        if v:
            t.add_row("classes", f"{len(v)} (indices {min(map(int, info['classes']))}..{max(map(int, info['classes']))}); "
                      f"per class min / median / max {min(v)} / {sorted(v)[len(v) // 2]} / {max(v)}")
        if info["groups"]:
            t.add_row("groups", ", ".join(f"{k}: {n}" for k, n in info["groups"].items()))
        t.add_row("members", ", ".join(f"{k}: {n}" for k, n in info["members"].items()))
        if info["without_cls"]:
            t.add_row("[red]without cls", str(info["without_cls"]))
    if info["empty"]:
        t.add_row("empty shards", f"{len(info['empty'])}: {', '.join(info['empty'][:3])}")
    for u, why in list(info["truncated"].items())[:10]:
        t.add_row("[red]truncated", f"{u}: {why}")
    console.print(t)
