"""``gte data fewshot``: a few-shot training subset and a disjoint held-out validation set, from shards.

The rule (deterministic for a seed, whatever the shard layout, shard order or number of workers):
every sample gets the priority ``blake2b(f"{seed}\\0{key}")`` (64 bits; ties broken by the key). Within each class,
samples sorted by priority: the first ``holdout`` form the held-out validation set, the next ``shots`` the training
subset. Consequences: the two sets are disjoint; the held-out set does not depend on ``shots``, and the training
subsets of one seed are nested (the 10-shot set is inside the 50-shot set). A class with fewer than
``holdout + shots`` samples fills its held-out part first and is reported. Keys must be unique within the source.

One pass over the source: each shard's tar headers are walked once (images are seeked over, only the ``cls`` and
``json`` members are read), keeping per class the best ``holdout + shots`` candidates with their member offsets;
then only the selected samples' bytes are copied, verbatim (all members), into new shards ordered by priority (so
they mix classes). Local shards only.

Output: ``OUT/train-*.tar``, ``OUT/val-*.tar``, ``OUT/shards.json``, ``OUT/classes.json`` (copied from the source
directory when it has one) and ``OUT/fewshot.json`` (arguments, rule, counts, the selected keys).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gte.data.index import copy_names
from gte.data.tar import iter_index, read_members
from gte.data.writers.core import Item, SplitSummary, local_sources, write_split
from gte.errors import GteError
from gte.io import atomic_write_json

RULE = ("per class, samples sorted by blake2b(f'{seed}\\0{key}') (ties: key): the first `holdout` are held out "
        "for validation, the next `shots` form the training subset")


def priority(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "big")


@dataclass(order=True)
class Candidate:
    prio: int
    key: str
    cls: int = field(compare=False)
    path: str = field(compare=False)
    members: dict = field(compare=False)
    group: int | None = field(compare=False, default=None)


def _scan(args: tuple[str, int, int]) -> tuple[list[Candidate], int, int]:
    """The best ``keep`` candidates per class of one shard, the number of samples seen and of unusable ones."""
    path, seed, keep = args
    best: dict[int, list[tuple[int, str, Candidate]]] = {}  # max-heaps via negated priority
    seen = bad = 0
    for s in iter_index(path, read=("cls", "json")):
        seen += 1
        try:
            cls = int(s["cls"])
        except (KeyError, ValueError):
            bad += 1
            continue
        group = None
        if "json" in s:
            try:
                meta = json.loads(s["json"])
                group = meta.get("group") if isinstance(meta, dict) else None
            except ValueError:
                pass
        c = Candidate(priority(seed, s["__key__"]), s["__key__"], cls, path, s["members"],
                      group if isinstance(group, int) else None)
        heap = best.setdefault(cls, [])
        entry = (-c.prio, _neg_key(c.key), c)
        if len(heap) < keep:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)
    return [e[2] for heap in best.values() for e in heap], seen, bad


def _neg_key(key: str) -> tuple:
    """Orders keys in reverse, so that the max-heap on (−prio, −key) keeps the smallest (prio, key)."""
    return tuple(-b for b in key.encode()) + (1,)


@dataclass
class FewshotResult:
    train: SplitSummary
    val: SplitSummary
    source_samples: int
    unusable: int
    short_classes: dict[int, int]     # class → samples available, for classes below holdout + shots
    scan_s: float
    write_s: float
    shards: int


def select(candidates: list[Candidate], shots: int, holdout: int) -> tuple[list[Candidate], list[Candidate],
                                                                         dict[int, int]]:
    """(train, held-out, short classes) from the merged candidates (see the module docstring)."""
    by_class: dict[int, list[Candidate]] = {}
    for c in candidates:
        by_class.setdefault(c.cls, []).append(c)
    train, val, short = [], [], {}
    for cls in sorted(by_class):
        ranked = sorted(by_class[cls])[: holdout + shots]
        if len(ranked) < holdout + shots:
            short[cls] = len(ranked)
        val.extend(ranked[:holdout])
        train.extend(ranked[holdout:])
    keys: dict[str, Candidate] = {}
    for c in train + val:
        if c.key in keys:
            raise GteError(f"key '{c.key}' occurs twice in the source ({keys[c.key].path}, {c.path}): "
                           "few-shot selection needs unique keys")
        keys[c.key] = c
    return sorted(train), sorted(val), short


def _loader(item: Item) -> tuple[dict | None, str]:
    try:
        members = read_members(str(item.path), item.meta["members"])
    except OSError as e:
        return None, str(e)
    return {"__key__": item.key, **members}, ""


def fewshot(src: str, out: Path, *, shots: int, holdout: int = 50, seed: int = 42, max_samples: int = 1000,
            max_bytes: int = 0, workers: int = 1, overwrite: bool = False, console=None) -> FewshotResult:
    if shots < 1 or holdout < 0:
        raise GteError("--shots must be >= 1 and --holdout >= 0")
    out = Path(out)
    paths = local_sources(src, out, "few-shot subsets")  # checked before the scan, which reads every source shard
    keep = shots + holdout
    t0 = time.time()
    jobs = [(p, seed, keep) for p in paths]
    candidates: list[Candidate] = []
    seen = bad = 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]fewshot scan"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                        TimeElapsedColumn(), console=console, disable=console is None)
    with progress:
        task = progress.add_task("scan", total=len(jobs))
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_scan, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
                for cands, n, b in results:
                    candidates.extend(cands)
                    seen, bad = seen + n, bad + b
                    progress.advance(task)
        else:
            for job in jobs:
                cands, n, b = _scan(job)
                candidates.extend(cands)
                seen, bad = seen + n, bad + b
                progress.advance(task)
    train, val, short = select(candidates, shots, holdout)
    if not train:
        why = f"no class has more than --holdout {holdout} samples" if candidates else "no usable samples"
        raise GteError(f"no training samples selected from {src} ({seen} samples read; {why})")
    scan_s = time.time() - t0

    t1 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    copy_names(Path(paths[0]).parent, out)

    def items(cands: list[Candidate]) -> list[Item]:
        return [Item(c.key, Path(c.path), c.cls, {"members": c.members, **({"group": c.group} if c.group is not None
                                                                              else {})},
                     sum(size for _, size in c.members.values())) for c in cands]

    opts = dict(max_samples=max_samples, max_bytes=max_bytes, workers=4, overwrite=overwrite, keep_order=True,
                load=_loader, console=console)
    s_train = write_split(out, "train", items(train), description="fewshot train", **opts)
    s_val = write_split(out, "val", items(val), description="fewshot val", **opts) if val else SplitSummary("val")
    write_s = time.time() - t1
    atomic_write_json(out / "fewshot.json", {
        "source": src, "shots": shots, "holdout": holdout, "seed": seed, "rule": RULE,
        "source_samples": seen, "unusable": bad, "short_classes": {str(k): v for k, v in short.items()},
        "train": {"samples": s_train.samples, "shards": s_train.shards},
        "val": {"samples": s_val.samples, "shards": s_val.shards},
        "keys": {"train": [c.key for c in train], "val": [c.key for c in val]},
    })
    return FewshotResult(s_train, s_val, seen, bad, short, scan_s, write_s, len(paths))
