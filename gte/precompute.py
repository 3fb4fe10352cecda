"""Frozen teaching: run the teacher once over the training shards and store its outputs next to every sample.

``gte precompute --recipe R --out DIR`` reads ``data.train`` in the eval geometry (Resize + CenterCrop at
``data.image_size``, un-augmented, shard order) and writes one shard per input shard into DIR, with the same name,
holding every sample's original members unchanged plus the teacher's logits and explanation map (the format:
:mod:`gte.frozen`). Finished shards are skipped (each is written to a temporary file and renamed), so an interrupted
run continues where it stopped; under torchrun rank r writes shards r, r+W, ….
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gte import dist
from gte.config import Recipe
from gte.data.index import shard_counts
from gte.data.spec import expand_spec
from gte.data.tar import ReadProblem, iter_samples
from gte.data.transforms import BadSample, SampleTransform
from gte.data.writers.core import atomic_tar
from gte.errors import GteError
from gte.explain import choose_explainer, explain_with_logits
from gte.frozen import LOGITS, MAP, npy_bytes, read_info, write_info
from gte.io import check_writable
from gte.engine import layer_spec, teacher_size
from gte.models import at_size, build_model, freeze, info, is_bcos, to_model_input, with_spec


def teacher_outputs(teacher: torch.nn.Module, images: torch.Tensor, explainer: str,
                    map_scale: int = 1, size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N×C, explanation of the top-1 class N×c×h×w) of images in [0, 1], as stored (fp16); ``size``: the
    teacher sees them at size² (``teacher.image_size``), its map is resized back."""
    maps, logits = explain_with_logits(teacher, to_model_input(info(teacher), images, size), None, explainer)
    maps = at_size(maps, images.shape[-2:])
    if map_scale > 1:
        maps = F.avg_pool2d(maps, map_scale)
    return logits.half(), maps.half()


def precompute(recipe: Recipe, out: str | Path, *, map_scale: int = 1, batch_size: int = 0,
               console: Console | None = None) -> dict[str, Any]:
    """Write DIR's shards (this rank's share); returns a summary (shards written/skipped, samples, bad samples)."""
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
    rank, world = dist.rank_world()
    out = Path(out)
    check_writable(out, "--out")  # before the teacher is loaded
    out.mkdir(parents=True, exist_ok=True)
    device = dist.device()
    teacher = build_model(recipe.teacher.arch, d.num_classes, recipe.teacher.weights)
    teacher = freeze(with_spec(teacher, **layer_spec(recipe.teacher))).to(device)
    size = teacher_size(recipe, teacher)
    # The maps are made with the student's explainer: training compares them with the student's own maps.
    student_bcos = is_bcos(recipe.student.arch) if recipe.student.arch else info(teacher).bcos
    explainer = choose_explainer(recipe.distill.explainer, student_bcos)
    meta = {"teacher_arch": recipe.teacher.arch, "teacher_weights": str(recipe.teacher.weights),
            "explainer": explainer, "num_classes": d.num_classes, "image_size": d.image_size,
            "eval_resize": d.eval_resize, "map_scale": map_scale, "teacher_size": size,
            "explain_layer": info(teacher).gradcam_layer or "", "source": d.train, "members": [LOGITS, MAP]}
    earlier = read_info(out)
    if earlier is not None and earlier != meta and any((out / n).is_file() for n in names):
        changed = ", ".join(f"{k}: {earlier.get(k)!r} -> {meta[k]!r}" for k in meta if earlier.get(k) != meta[k])
        raise GteError(f"{out} holds shards precomputed with other settings ({changed}): choose another --out, or "
                       "delete it to start again")
    if rank == 0:
        write_info(out, meta)
    transform = SampleTransform(False, d.image_size, d.eval_resize, interpolation=d.interpolation,
                                reduced_decode=d.reduced_decode, decode_margin=d.decode_margin)
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
            n, bad = _one_shard(urls[i], out / names[i], teacher, transform, explainer, map_scale, bs, device,
                                lambda k: progress.update(task, advance=k), size)
            summary["written"] += 1
            summary["samples"] += n
            summary["bad"] += bad
            progress.update(task, note=f"{summary['written']}/{len(todo)} shards")
    console.print(f"precompute rank {rank}: {summary['written']} shards written, {summary['skipped_shards']} "
                  f"already done, {summary['samples']} samples" + (f", {summary['bad']} unreadable (dropped)"
                                                                   if summary["bad"] else "") + f" → {out}")
    return summary


def _one_shard(url: str, path: Path, teacher, transform: SampleTransform, explainer: str, map_scale: int, bs: int,
               device, advance, size: int = 0) -> tuple[int, int]:
    n = bad = 0
    with atomic_tar(path) as sink:  # a finished shard appears whole or not at all: a rerun skips it
        pending: list[tuple[dict, torch.Tensor]] = []

        def flush() -> None:
            images = torch.stack([p[1] for p in pending]).to(device).float().div_(255.0)
            logits, maps = teacher_outputs(teacher, images, explainer, map_scale, size)
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
