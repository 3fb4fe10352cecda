"""Frozen teaching: run the teacher once over the training shards and store its outputs next to every sample.

``gte precompute --recipe R --out DIR`` reads ``data.train`` in the eval geometry (Resize + CenterCrop at
``data.image_size``, un-augmented, shard order) and writes one shard per input shard into DIR, with the same name,
holding every sample's original members unchanged plus

- ``logits.npy``: the teacher's logits (fp16, C),
- ``map.npy``: the teacher's explanation of its top-1 class (fp16; B-cos W(x) 6×h×w or GradCAM 1×h×w), optionally
  average-pooled to 1/2 or 1/4 of ``data.image_size`` (``--map-scale``),

and ``DIR/gte-frozen.json`` describing how they were made. Finished shards are skipped (each is written to a ``.tmp``
and renamed), so an interrupted run continues where it stopped; under torchrun rank r writes shards r, r+W, ….
Training with ``distill.frozen = true`` and ``data.train`` pointing at DIR's shards reads them instead of running a
teacher (see gte.train / gte.data.transforms.SampleTransform.follow for how the map follows the crop).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gte.config import Recipe
from gte.data.tario import ReadProblem, expand_spec, iter_samples, shard_counts
from gte.data.transforms import BadSample, SampleTransform
from gte.errors import GteError

LOGITS, MAP, INFO = "logits.npy", "map.npy", "gte-frozen.json"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def teacher_outputs(teacher: torch.nn.Module, images: torch.Tensor, explainer: str,
                    map_scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N×C, explanation of the top-1 class N×c×h×w) of images in [0, 1], as stored (fp16)."""
    from gte.explain import explain_with_logits
    from gte.models import info, to_model_input

    maps, logits = explain_with_logits(teacher, to_model_input(info(teacher), images), None, explainer)
    if map_scale > 1:
        maps = F.avg_pool2d(maps, map_scale)
    return logits.half(), maps.half()


def precompute(recipe: Recipe, out: str | Path, *, map_scale: int = 1, batch_size: int = 0,
               console: Console | None = None) -> dict[str, Any]:
    """Write DIR's shards (this rank's share); returns a summary (shards written/skipped, samples, bad samples)."""
    from gte.models import build_model, freeze, info

    console = console or Console(stderr=True)
    d = recipe.data
    if map_scale not in (1, 2, 4):
        raise GteError(f"--map-scale must be 1, 2 or 4, got {map_scale}")
    if d.image_size % map_scale:
        raise GteError(f"data.image_size {d.image_size} is not divisible by --map-scale {map_scale}")
    if not recipe.teacher.arch or not recipe.teacher.weights:
        raise GteError("precompute needs teacher.arch and teacher.weights")
    urls = expand_spec(d.train)
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise GteError(f"{d.train}: shard file names are not unique, cannot write one output shard per input shard")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device()
    teacher = freeze(build_model(recipe.teacher.arch, d.num_classes, recipe.teacher.weights)).to(device)
    explainer = recipe.distill.explainer if recipe.distill.explainer != "auto" else info(teacher).explainer
    meta = {"teacher_arch": recipe.teacher.arch, "teacher_weights": str(recipe.teacher.weights),
            "explainer": explainer, "num_classes": d.num_classes, "image_size": d.image_size,
            "eval_resize": d.eval_resize, "map_scale": map_scale, "source": d.train, "members": [LOGITS, MAP]}
    if rank == 0:
        tmp = out / (INFO + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out / INFO)
    transform = SampleTransform(False, d.image_size, d.eval_resize)
    bs = batch_size or recipe.optim.batch_size
    mine = list(range(rank, len(urls), world))
    todo = [i for i in mine if not (out / names[i]).is_file()]
    counts = shard_counts([urls[i] for i in todo])
    total = sum(c.n for c in counts if c is not None)
    summary = {"written": 0, "skipped_shards": len(mine) - len(todo), "samples": 0, "bad": 0, "out": str(out)}
    progress = Progress(TextColumn("[bold]precompute[/] rank %d" % rank), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    with progress, torch.no_grad():
        task = progress.add_task("", total=total or None, note="")
        for i in todo:
            final = out / names[i]
            tmp = final.with_name(final.name + ".tmp")
            try:
                n, bad = _one_shard(urls[i], tmp, teacher, transform, explainer, map_scale, bs, device,
                                    lambda k: progress.update(task, advance=k))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, final)
            summary["written"] += 1
            summary["samples"] += n
            summary["bad"] += bad
            progress.update(task, note=f"{summary['written']}/{len(todo)} shards")
    console.print(f"precompute rank {rank}: {summary['written']} shards written, {summary['skipped_shards']} "
                  f"already done, {summary['samples']} samples" + (f", {summary['bad']} unreadable (dropped)"
                                                                   if summary["bad"] else "") + f" → {out}")
    return summary


def _one_shard(url: str, tmp: Path, teacher, transform: SampleTransform, explainer: str, map_scale: int, bs: int,
               device, advance) -> tuple[int, int]:
    import webdataset as wds

    n = bad = 0
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        pending: list[tuple[dict, torch.Tensor]] = []

        def flush() -> None:
            images = torch.stack([p[1] for p in pending]).to(device).float().div_(255.0)
            logits, maps = teacher_outputs(teacher, images, explainer, map_scale)
            logits, maps = logits.cpu().numpy(), maps.cpu().numpy()
            for k, (raw, _) in enumerate(pending):
                sample = {key: v for key, v in raw.items() if key not in ("__url__", "__index__")}
                sample[LOGITS], sample[MAP] = npy_bytes(logits[k]), npy_bytes(maps[k])
                sink.write(sample)
            advance(len(pending))
            pending.clear()

        for raw in iter_samples(url):
            if isinstance(raw, ReadProblem):
                warnings.warn(f"{url}: {raw.error} (at sample {raw.index}); the rest of this shard is dropped")
                break
            try:
                pixels = transform(raw)["image"]
            except BadSample as e:
                warnings.warn(f"{url}: sample {raw['__key__']} dropped: {e}")
                bad += 1
                advance(1)
                continue
            pending.append((raw, pixels))
            n += 1
            if len(pending) == bs:
                flush()
        if pending:
            flush()
    return n, bad


def check_frozen_shards(recipe: Recipe) -> None:
    """Fail early when ``data.train`` was not written by ``gte precompute`` for this recipe's geometry."""
    d = recipe.data
    urls = expand_spec(d.train)
    need = (LOGITS, MAP) if recipe.distill.method == "e2kd" else (LOGITS,)
    first = next((s for s in iter_samples(urls[0], 0, 1) if not isinstance(s, ReadProblem)), None)
    if first is not None:
        missing = [m for m in need if m not in first]
        if missing:
            raise GteError(f"distill.frozen: {urls[0]} has no {', '.join(missing)} member: point data.train at the "
                           "shards written by `gte precompute`")
    info_file = Path(urls[0]).parent / INFO
    if info_file.is_file():
        meta = json.loads(info_file.read_text())
        for key in ("image_size", "eval_resize", "num_classes"):
            if meta.get(key) != getattr(d, key):
                raise GteError(f"distill.frozen: the shards were precomputed with data.{key} = {meta.get(key)}, "
                               f"the recipe has {getattr(d, key)}")
