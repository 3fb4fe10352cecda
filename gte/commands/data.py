"""``gte data …``: shard converters, few-shot subsets, shard summaries, the loader benchmark.

Registered on the main app in gte/cli.py (``app.add_typer(data_app, name="data")``); the library halves live in
gte.data (writers, info, bench); the tables printed here are this module's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console

from gte.commands._common import err
from gte.errors import GteError
from gte.io import loads_json
from gte.tables import literal

if TYPE_CHECKING:
    from gte.data.writers.core import SplitSummary

data_app = typer.Typer(no_args_is_help=True, help="Datasets as WebDataset shards: convert, subset, inspect, benchmark.")
shard_app = typer.Typer(no_args_is_help=True, help="Write a dataset as WebDataset shards "
                        "(HF timm/imagenet-1k-wds shards need no conversion: use them as they are).")
data_app.add_typer(shard_app, name="shard")

RequiredOutOpt = typer.Option(..., "--out", "-o", help="Output directory.")
MaxSamplesOpt = typer.Option(1000, "--max-samples", help="Samples per shard at most (0 = no limit).")
MaxBytesOpt = typer.Option("1GB", "--max-bytes", help="Bytes per shard at most, e.g. 500MB, 1GiB (0 = no limit).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the sample order across shards.")
ShuffleOpt = typer.Option(True, "--shuffle/--no-shuffle", help="Mix classes across shards (recommended for training).")
CheckOpt = typer.Option("header", "--check", help="Image check: none | header (identify + verify) | decode (full).")
WorkersOpt = typer.Option(4, "--workers", help="Threads reading and checking images.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace shards of a different earlier conversion in --out.")
ImageFormatOpt = typer.Option("auto", "--image-format", help="auto (each image's own bytes: JPEG, PNG, WebP) | jpg | "
                              "png: one format for every member, as Hugging Face datasets needs (others re-encoded).")


def _options(max_samples: int, max_bytes: str, seed: int, shuffle: bool, check: str, workers: int,
             overwrite: bool, image_format: str) -> dict:
    from gte.data.writers.core import parse_size

    return dict(max_samples=max_samples, max_bytes=parse_size(max_bytes), seed=seed, shuffle=shuffle, check=check,
                workers=workers, overwrite=overwrite, image_format=image_format)


def _report(out: Path, summaries, classes: list[str]) -> None:
    from gte.data.index import read_group_names
    from gte.data.writers.core import shard_spec

    err.print(summary_table(summaries, classes, read_group_names(out)))
    for s in summaries:
        err.print(literal(f"{s.split}: {shard_spec(out, s.split, s.shards)}"))
        for p in s.problems[:5]:
            err.print(literal(f"  skipped: {p}"))  # problems name the source's files
        if len(s.problems) > 5 or s.skipped > len(s.problems[:5]):
            err.print(f"  ({s.skipped} skipped in all; the first are listed in the summary above)")
    formats = sorted({f for s in summaries for f in s.formats})
    if len(formats) > 1:
        err.print(f"[yellow]note:[/] the images are stored as {' and '.join(formats)} (their own formats); Hugging "
                  "Face datasets refuses mixed members in one shard set: --image-format jpg or png writes one")


@shard_app.command("imagefolder", epilog="Example: gte data shard imagefolder ~/imagenet/train --out data/imagenet "
                   "--split train  ·  gte data shard imagefolder photos --out data/own --classes imagenet")
def shard_imagefolder(
    root: Path = typer.Argument(..., help="root/<class>/<image>; class index = sorted folder order."),
    out: Path = RequiredOutOpt,
    split: str = typer.Option("train", "--split", help="Name of the written split (file prefix)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class list to impose: a classes.json (e.g. the "
                                          "train split's, so that a val tree missing a class keeps the indices), "
                                          "or 'imagenet' (folders named by ImageNet class, e.g. 'tiger cat', get "
                                          "ImageNet's indices)."),
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt, seed: int = SeedOpt, shuffle: bool = ShuffleOpt,
    check: str = CheckOpt, workers: int = WorkersOpt, overwrite: bool = OverwriteOpt,
    image_format: str = ImageFormatOpt,
) -> None:
    """An ImageFolder tree → shards + classes.json."""
    from gte.data.writers.imagefolder import convert_imagefolder

    names = None
    if classes == "imagenet":
        from gte.render import imagenet_class_names

        names = imagenet_class_names()
    elif classes is not None:
        try:
            names = loads_json(Path(classes).read_text(), f"--classes {classes}")
        except (OSError, ValueError) as e:
            raise GteError(f"--classes {classes}: not a readable JSON list ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise GteError(f"--classes {classes}: expected a JSON list of class names")
    summaries, names = convert_imagefolder(root, out, split=split, classes=names, console=err,
                                           **_options(max_samples, max_bytes, seed, shuffle, check, workers, overwrite,
                                                      image_format))
    _report(out, summaries, names)


@shard_app.command("waterbirds", epilog="Example: gte data shard waterbirds ~/waterbird_complete95_forest2water2 "
                   "--out data/waterbirds")
def shard_waterbirds(
    root: Path = typer.Argument(..., help="Waterbirds directory with metadata.csv (img_filename, y, place, split)."),
    out: Path = RequiredOutOpt,
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt, seed: int = SeedOpt, shuffle: bool = ShuffleOpt,
    check: str = CheckOpt, workers: int = WorkersOpt, overwrite: bool = OverwriteOpt,
    image_format: str = ImageFormatOpt,
) -> None:
    """Waterbirds → train/val/test shards; cls = y, json.group = 2·y + place."""
    from gte.data.writers.waterbirds import convert_waterbirds

    summaries, names = convert_waterbirds(root, out, console=err, **_options(max_samples, max_bytes, seed, shuffle,
                                                                             check, workers, overwrite, image_format))
    _report(out, summaries, names)


@shard_app.command("voc", epilog="Example: gte data shard voc ~/VOCdevkit/VOC2007 --out data/voc --split trainval "
                   "--split test")
def shard_voc(
    root: Path = typer.Argument(..., help="VOCdevkit/VOC2007 or VOC2012 (Annotations, ImageSets/Main, JPEGImages)."),
    out: Path = RequiredOutOpt,
    split: List[str] = typer.Option(["trainval", "test"], "--split", help="ImageSets/Main/<split>.txt (repeatable)."),
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt, seed: int = SeedOpt, shuffle: bool = ShuffleOpt,
    check: str = CheckOpt, workers: int = WorkersOpt, overwrite: bool = OverwriteOpt,
    image_format: str = ImageFormatOpt,
) -> None:
    """PASCAL VOC → multi-label shards: json.labels, json.boxes, json.box_labels (the 20 classes, standard order)."""
    from gte.data.writers.voc import convert_voc

    summaries, names = convert_voc(root, out, splits=split, console=err,
                                   **_options(max_samples, max_bytes, seed, shuffle, check, workers, overwrite,
                                              image_format))
    _report(out, summaries, names)


@data_app.command("fewshot", epilog="Example: gte data fewshot 'data/imagenet/*train-*.tar' --shots 50 --holdout 50 "
                  "--seed 42 --out data/imagenet-50shot")
def fewshot_cmd(
    src: str = typer.Argument(..., help="Source shard spec (local), e.g. 'train-{000000..001023}.tar' or a directory."),
    shots: int = typer.Option(..., "--shots", help="Training images per class."),
    out: Path = RequiredOutOpt,
    seed: int = typer.Option(42, "--seed"),
    holdout: int = typer.Option(50, "--holdout", help="Held-out validation images per class (disjoint)."),
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt,
    workers: int = typer.Option(max(1, min(8, os.cpu_count() or 1)), "--workers", help="Processes scanning shards."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """N images per class for training + M per class held out, deterministic for a seed (docs/data.md, "Few-shot
    subsets")."""
    from gte.data.writers.core import parse_size, shard_spec
    from gte.data.writers.fewshot import fewshot

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
    err.print(literal(f"train: {shard_spec(out, 'train', r.train.shards)}"))
    if r.val.shards:
        err.print(literal(f"val: {shard_spec(out, 'val', r.val.shards)}"))


@data_app.command("shortcut", epilog="Example: gte data shortcut patch 'data/own/train-*.tar' --class 3 --share 0.9 "
                  "--out data/own-patched")
def shortcut_cmd(
    name: str = typer.Argument(..., help="patch or watermark, with options as NAME:key=value,… (as gte eval "
                               "--shortcut)."),
    src: str = typer.Argument(..., help="Source shard spec (local)."),
    out: Path = RequiredOutOpt,
    cls: int = typer.Option(..., "--class", help="The class whose images get the pattern."),
    share: float = typer.Option(1.0, "--share", help="Fraction of that class's images marked (by key and seed)."),
    seed: int = typer.Option(0, "--seed", help="Seed of which images are marked and of random places."),
    split: str = typer.Option("train", "--split", help="Name of the written split (file prefix)."),
    max_samples: int = MaxSamplesOpt, max_bytes: str = MaxBytesOpt, overwrite: bool = OverwriteOpt,
) -> None:
    """A biased split: the pattern on images of one class, everything else copied as it is."""
    from gte.data.writers.core import parse_size, shard_spec
    from gte.data.writers.shortcut import shortcut_split
    from gte.shortcuts import parse_shortcut

    r = shortcut_split(src, out, parse_shortcut(name, seed), cls=cls, share=share, split=split,
                       max_samples=max_samples, max_bytes=parse_size(max_bytes), overwrite=overwrite, console=err)
    classes = _class_names(out, max(list(r.summary.classes) + [cls]) + 1)
    err.print(summary_table([r.summary], classes))
    err.print(f"{len(r.patched)} images of class {cls} marked ({name}); {r.summary.skipped} samples skipped "
              f"({r.without_cls} without a usable cls)")
    err.print(literal(f"{split}: {shard_spec(out, split, r.summary.shards)}"))


def _class_names(directory: Path, n: int) -> list[str]:
    from gte.data.index import read_class_names

    names = read_class_names(directory)
    return names if names is not None and len(names) >= n else [str(i) for i in range(n)]


@data_app.command("info", epilog="Example: gte data info 'data/imagenet/train-*.tar'")
def info_cmd(
    spec: str = typer.Argument(..., help="Shard spec (braces, globs, a directory, several joined with '::')."),
    classes: bool = typer.Option(True, "--classes/--no-classes", help="Also count samples per class and group "
                                 "(reads the small cls/json members)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary as JSON."),
) -> None:
    """Samples per shard, class and group; truncated shards. Reads gte's and timm-wds shards as they are."""
    from gte.data.info import shard_info
    from gte.data.index import resolve_shards
    from gte.data.spec import local_path
    from gte.io import atomic_write_json

    shards = resolve_shards(spec)
    info = shard_info(shards, classes=classes)
    Console().print(info_table(info, os.path.dirname(local_path(shards.urls[0])) or "."))  # a result: stdout
    if json_out:
        atomic_write_json(json_out, info)


@data_app.command("bench", epilog="Example: gte data bench 'data/imagenet/train-*.tar' --workers 4")
def bench_cmd(
    workers: str = typer.Option("1,2", "--workers", help="Comma-separated DataLoader worker counts."),
    images: int = typer.Option(256, "--images", help="Synthetic JPEGs to write per size (quality 90)."),
    sizes: str = typer.Option("500x375,1600x1200", "--sizes", help="Comma-separated JPEG sizes WxH."),
    transform: str = typer.Option("train,eval", "--transform", help="Comma-separated: train, eval."),
    image_size: int = typer.Option(224, "--image-size"),
    batch_size: int = typer.Option(32, "--batch-size"),
    decoder: str = typer.Option("pil,torchvision", "--decoder", help="Comma-separated: pil, torchvision."),
    train_model: Optional[str] = typer.Option("bcos_resnet18", "--model", help="Also time one training process "
                                              "of this architecture (fwd+bwd, CE) for comparison; '' to skip."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
) -> None:
    """Loader throughput (decode + augment img/s per worker) vs what one training process consumes."""
    from gte.data.bench import bench_loader
    from gte.io import atomic_write_json

    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError:
        raise GteError(f"--workers expects comma-separated worker counts such as 1,2,4, got '{workers}'") from None
    try:
        dims = [tuple(int(v) for v in s.lower().split("x")) for s in sizes.split(",") if s.strip()]
    except ValueError:
        dims = []
    if not dims or any(len(d) != 2 or min(d) < 1 for d in dims):
        raise GteError(f"--sizes expects comma-separated sizes such as 500x375,1600x1200, got '{sizes}'")
    transforms = [t.strip() for t in transform.split(",") if t.strip()]
    if not transforms or set(transforms) - {"train", "eval"}:
        raise GteError(f"--transform expects train, eval or train,eval, got '{transform}'")
    result = bench_loader(workers=counts, images=images, image_size=image_size, batch_size=batch_size,
                          decoders=[d.strip() for d in decoder.split(",") if d.strip()], model=train_model or None,
                          sizes=dims, transforms=transforms)
    print_bench(result)
    if json_out:
        atomic_write_json(json_out, result)


# ------------------------------------------------------------------------------------------------------ tables


def summary_table(summaries: list[SplitSummary], class_names: list[str], group_names: list[str] | None = None,
                  max_rows: int = 30):
    """A rich table of samples per class (and group) per split; long class lists are shown as min/median/max."""
    from rich.table import Table

    t = Table(title="samples written", show_lines=False)
    t.add_column("class" if len(class_names) <= max_rows else "classes")
    for s in summaries:
        t.add_column(s.split, justify="right")
    if len(class_names) <= max_rows:
        for i, name in enumerate(class_names):
            t.add_row(literal(f"{i} {name}"), *(str(s.classes.get(i, 0)) for s in summaries))
    else:
        def stats(s: SplitSummary) -> str:
            v = sorted(s.classes.get(i, 0) for i in range(len(class_names)))
            return f"{v[0]} / {v[len(v) // 2]} / {v[-1]}"

        t.add_row(f"{len(class_names)} classes: min / median / max per class", *(stats(s) for s in summaries))
    if any(s.groups for s in summaries):
        groups = sorted({g for s in summaries for g in s.groups})
        for g in groups:
            name = group_names[g] if group_names and 0 <= g < len(group_names) else str(g)
            t.add_row(literal(f"group {g} {name}"), *(str(s.groups.get(g, 0)) for s in summaries))
    t.add_row("[bold]total", *(f"[bold]{s.samples}" for s in summaries))
    t.add_row("skipped", *(str(s.skipped) for s in summaries))
    t.add_row("shards (written now)", *(f"{s.shards} ({s.written})" for s in summaries))
    return t


def info_table(info: dict, directory: str):
    """The rich table of ``gte data info`` (``info`` from gte.data.info.shard_info)."""
    from rich.table import Table

    t = Table(title=literal(f"{info['samples']} samples in {info['shards']} shards ({directory})"))
    t.add_column("what")
    t.add_column("value", overflow="fold")
    if "classes" in info:
        v = list(info["classes"].values())
        if v:
            indices = list(map(int, info["classes"]))
            t.add_row("classes", f"{len(v)} (indices {min(indices)}..{max(indices)}); "
                      f"per class min / median / max {min(v)} / {sorted(v)[len(v) // 2]} / {max(v)}")
        if info["groups"]:
            from gte.data.index import read_group_names

            names = read_group_names(directory) or []
            t.add_row("groups", literal(", ".join(f"{k} {names[int(k)]}: {n}" if 0 <= int(k) < len(names)
                                                  else f"{k}: {n}" for k, n in info["groups"].items())))
        t.add_row("members", literal(", ".join(f"{k}: {n}" for k, n in info["members"].items())))  # from the tars
        if info["without_cls"]:
            t.add_row("[red]without cls", str(info["without_cls"]))
    if info["empty"]:
        t.add_row("empty shards", literal(f"{len(info['empty'])}: {', '.join(info['empty'][:3])}"))
    for u, why in list(info["truncated"].items())[:10]:
        t.add_row("[red]truncated", literal(f"{u}: {why}"))
    return t


def print_bench(result: dict) -> None:
    """The loader table and the decode-only and training rates of ``gte data bench`` (on stderr)."""
    from rich.table import Table

    jpegs = ", ".join(f"{j['width']}×{j['height']} ({j['mean_kB']:.0f} kB)" for j in result["jpegs"])
    t = Table(title=f"loader: {result['jpeg']['images']} JPEGs q90 per size, {jpegs} → {result['image_size']}², "
                    f"{result['cpu_count']} CPUs; img/s per worker, full-size vs reduced-scale decode")
    for c in ("JPEG", "transform", "decoder", "workers", "full", "reduced", "× full", "worker start-up s"):
        t.add_column(c, justify="right")
    rows = result["loader"]
    for i, r in enumerate(rows):
        if r["reduced_decode"]:
            continue  # shown beside its full-size row
        red = rows[i + 1] if i + 1 < len(rows) and rows[i + 1]["reduced_decode"] else None
        t.add_row(r["jpeg"], r["transform"], r["decoder"], str(r["workers"]), str(r["img_per_s_per_worker"]),
                  str(red["img_per_s_per_worker"]) if red else "—", f"{red['vs_full']:.2f}" if red else "—",
                  str(r["startup_s"]))
    err.print(t)
    first = result["jpeg"]
    err.print(f"decode only, {first['width']}×{first['height']}, 1 thread (img/s): " + ", ".join(
        f"{k} {v}" for k, v in result["decode_only_img_per_s_1_thread"].items()))
    if "training" in result:
        tr = result["training"]
        err.print(f"one training process ({tr['model']}, batch {tr['batch_size']}, {tr['threads']} threads, "
                  f"fwd+bwd+step): {tr['img_per_s']} img/s")
