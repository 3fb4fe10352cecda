"""``gte data …``: shard converters, few-shot subsets, shard summaries, the loader benchmark.

Registered on the main app in gte/cli.py (``app.add_typer(data_app, name="data")``); heavy imports stay inside the
commands so that ``gte --help`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gte.errors import GteError

data_app = typer.Typer(no_args_is_help=True, help="Datasets as WebDataset shards: convert, subset, inspect, benchmark.")
shard_app = typer.Typer(no_args_is_help=True, help="Write a dataset as design.md WebDataset shards "
                        "(HF timm/imagenet-1k-wds shards need no conversion: use them as they are).")
data_app.add_typer(shard_app, name="shard")
err = Console(stderr=True)

OutOpt = typer.Option(..., "--out", "-o", help="Output directory.")
MaxSamplesOpt = typer.Option(1000, "--max-samples", help="Samples per shard at most (0 = no limit).")
MaxBytesOpt = typer.Option("1GB", "--max-bytes", help="Bytes per shard at most, e.g. 500MB, 1GiB (0 = no limit).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the sample order across shards.")
ShuffleOpt = typer.Option(True, "--shuffle/--no-shuffle", help="Mix classes across shards (recommended for training).")
CheckOpt = typer.Option("header", "--check", help="Image check: none | header (identify + verify) | decode (full).")
WorkersOpt = typer.Option(4, "--workers", help="Threads reading and checking images.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace shards of a different earlier conversion in --out.")


def _options(max_samples: int, max_bytes: str, seed: int, shuffle: bool, check: str, workers: int,
             overwrite: bool) -> dict:
    from gte.data.convert import parse_size

    return dict(max_samples=max_samples, max_bytes=parse_size(max_bytes), seed=seed, shuffle=shuffle, check=check,
                workers=workers, overwrite=overwrite)


def _report(out: Path, summaries, classes: list[str], groups: list[str] | None = None) -> None:
    from gte.data.convert import shard_spec, summary_table

    err.print(summary_table(summaries, classes, groups))
    for s in summaries:
        err.print(f"{s.split}: {shard_spec(out, s.split, s.shards)}")
        for p in s.problems[:5]:
            err.print(f"  skipped: {p}")
        if len(s.problems) > 5 or s.skipped > len(s.problems[:5]):
            err.print(f"  ({s.skipped} skipped in all; the first are listed in the summary above)")


@shard_app.command("imagefolder")
def shard_imagefolder(
    root: Path = typer.Argument(..., help="root/<class>/<image>; class index = sorted folder order."),
    out: Path = OutOpt,
    split: str = typer.Option("train", "--split", help="Name of the written split (file prefix)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="classes.json to impose (e.g. the train "
                                           "split's, so that a val tree missing a class keeps the indices)."),
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt, seed: int = SeedOpt, shuffle: bool = ShuffleOpt,
    check: str = CheckOpt, workers: int = WorkersOpt, overwrite: bool = OverwriteOpt,
) -> None:
    """An ImageFolder tree → shards + classes.json."""
    from gte.data.convert import convert_imagefolder

    names = None
    if classes is not None:
        try:
            names = json.loads(classes.read_text())
        except (OSError, ValueError) as e:
            raise GteError(f"--classes {classes}: not a readable JSON list ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise GteError(f"--classes {classes}: expected a JSON list of class names")
    summaries, names = convert_imagefolder(root, out, split=split, classes=names, console=err,
                                           **_options(max_samples, max_bytes, seed, shuffle, check, workers, overwrite))
    _report(out, summaries, names)


@shard_app.command("waterbirds")
def shard_waterbirds(
    root: Path = typer.Argument(..., help="Waterbirds directory with metadata.csv (img_filename, y, place, split)."),
    out: Path = OutOpt,
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt, seed: int = SeedOpt, shuffle: bool = ShuffleOpt,
    check: str = CheckOpt, workers: int = WorkersOpt, overwrite: bool = OverwriteOpt,
) -> None:
    """Waterbirds → train/val/test shards; cls = y, json.group = 2·y + place."""
    from gte.data.convert import WATERBIRDS_GROUPS, convert_waterbirds

    summaries, names = convert_waterbirds(root, out, console=err, **_options(max_samples, max_bytes, seed, shuffle,
                                                                             check, workers, overwrite))
    _report(out, summaries, names, list(WATERBIRDS_GROUPS))


@shard_app.command("voc")
def shard_voc(
    root: Path = typer.Argument(..., help="VOCdevkit/VOC2007 or VOC2012 (Annotations, ImageSets/Main, JPEGImages)."),
    out: Path = OutOpt,
    split: List[str] = typer.Option(["trainval", "test"], "--split", help="ImageSets/Main/<split>.txt (repeatable)."),
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt, seed: int = SeedOpt, shuffle: bool = ShuffleOpt,
    check: str = CheckOpt, workers: int = WorkersOpt, overwrite: bool = OverwriteOpt,
) -> None:
    """PASCAL VOC → multi-label shards: json.labels, json.boxes, json.box_labels (the 20 classes, standard order)."""
    from gte.data.convert import convert_voc

    summaries, names = convert_voc(root, out, splits=split, console=err,
                                   **_options(max_samples, max_bytes, seed, shuffle, check, workers, overwrite))
    _report(out, summaries, names)


@data_app.command("fewshot")
def fewshot_cmd(
    src: str = typer.Argument(..., help="Source shard spec (local), e.g. 'train-{000000..001023}.tar' or a directory."),
    shots: int = typer.Option(..., "--shots", help="Training images per class."),
    out: Path = OutOpt,
    seed: int = typer.Option(42, "--seed"),
    holdout: int = typer.Option(50, "--holdout", help="Held-out validation images per class (disjoint)."),
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt,
    workers: int = typer.Option(max(1, min(8, os.cpu_count() or 1)), "--workers", help="Processes scanning shards."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """N images per class for training + M per class held out, deterministic for a seed (see gte.data.fewshot)."""
    from gte.data.convert import parse_size, shard_spec, summary_table
    from gte.data.fewshot import fewshot

    r = fewshot(src, out, shots=shots, holdout=holdout, seed=seed, max_samples=max_samples,
                max_bytes=parse_size(max_bytes), workers=workers, overwrite=overwrite, console=err)
    classes = _class_names(out, max(list(r.train.classes) + list(r.val.classes) + [0]) + 1)
    err.print(summary_table([r.train, r.val], classes))
    err.print(f"source: {r.source_samples} samples in {r.shards} shards ({r.unusable} without a usable cls); "
              f"scan {r.scan_s:.1f} s ({1000 * r.scan_s / max(1, r.shards):.0f} s per 1,000 shards), "
              f"copy {r.write_s:.1f} s")
    if r.short_classes:
        few = ", ".join(f"{k} ({v})" for k, v in list(r.short_classes.items())[:10])
        err.print(f"[yellow]{len(r.short_classes)} classes have fewer than {holdout + shots} samples:[/] {few}")
    err.print(f"train: {shard_spec(out, 'train', r.train.shards)}")
    if r.val.shards:
        err.print(f"val: {shard_spec(out, 'val', r.val.shards)}")


def _class_names(directory: Path, n: int) -> list[str]:
    try:
        names = json.loads((Path(directory) / "classes.json").read_text())
        if isinstance(names, list) and len(names) >= n:
            return [str(x) for x in names]
    except (OSError, ValueError):
        pass
    return [str(i) for i in range(n)]


@data_app.command("info")
def info_cmd(
    spec: str = typer.Argument(..., help="Shard spec (braces, globs, a directory, several joined with '::')."),
    classes: bool = typer.Option(True, "--classes/--no-classes", help="Also count samples per class and group "
                                 "(reads the small cls/json members)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary as JSON."),
) -> None:
    """Samples per shard, class and group; truncated shards. Reads any design.md / timm-wds shards as they are."""
    from gte.data.info import shard_info

    info = shard_info(spec, classes=classes, console=err)
    if json_out:
        from gte.data.convert import write_json_atomic

        write_json_atomic(json_out, info)


@data_app.command("bench")
def bench_cmd(
    workers: str = typer.Option("1,2", "--workers", help="Comma-separated DataLoader worker counts."),
    images: int = typer.Option(256, "--images", help="Synthetic JPEGs to write (500×375, quality 90)."),
    image_size: int = typer.Option(224, "--image-size"),
    batch_size: int = typer.Option(32, "--batch-size"),
    decoder: str = typer.Option("pil,torchvision", "--decoder", help="Comma-separated: pil, torchvision."),
    train_model: Optional[str] = typer.Option("bcos_resnet18", "--model", help="Also time one training process "
                                              "of this architecture (fwd+bwd, CE) for comparison; '' to skip."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
) -> None:
    """Loader throughput (decode + augment img/s per worker) vs what one training process consumes."""
    from gte.data.bench import run_bench

    result = run_bench(workers=[int(w) for w in workers.split(",") if w.strip()], images=images,
                       image_size=image_size, batch_size=batch_size,
                       decoders=[d.strip() for d in decoder.split(",") if d.strip()], model=train_model or None,
                       console=err)
    if json_out:
        from gte.data.convert import write_json_atomic

        write_json_atomic(json_out, result)
