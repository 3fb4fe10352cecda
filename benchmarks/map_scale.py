"""Frozen teaching with explanations stored at reduced resolution: storage per image vs. what the student learns.

    python benchmarks/map_scale.py [--scales 1 2 4] [--json benchmarks/map_scale.json] [--set key=value ...]

On the demo task (the shipped `demo` recipe: synthetic shapes whose places are coded by background texture, 32², the
cached B-cos ResNet-20 teacher under $GTE_HOME, trained on first use), for each `gte precompute --map-scale S`:

- bytes of the stored `map.npy` member per sample, and the fraction of a full-resolution map;
- fidelity: cosine between the stored map bilinearly upsampled to the image (what the loader does before cropping)
  and the full-resolution map, mean over the training set;
- the frozen e2KD student's explanation similarity to the teacher and its accuracy on conflicting backgrounds (test
  split), with frozen KD (logits only) as the no-map baseline.

It also prints what the same choice costs at ImageNet scale (6×224×224 fp16 maps).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from gte.config import load_recipe
from gte.data.spec import expand_spec
from gte.demo import prepare
from gte.evaluate import evaluate
from gte.models import freeze, load_model
from gte.precompute import MAP, precompute
from gte.train import train


def stored_maps(shard_dir: Path, pattern: str) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (map, bytes of the .npy member) for every sample of the precomputed shards."""
    out = {}
    for url in expand_spec(str(shard_dir / pattern)):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith("." + MAP):
                    raw = tar.extractfile(member).read()
                    out[member.name[: -len(MAP) - 1]] = (np.load(io.BytesIO(raw), allow_pickle=False), len(raw))
    return out


def fidelity(full: dict, scaled: dict, size: int) -> float:
    """Mean cosine between each upsampled stored map and the full-resolution one."""
    cos = []
    for key, (m, _) in scaled.items():
        up = F.interpolate(torch.from_numpy(m).float()[None], size=(size, size), mode="bilinear", align_corners=False)
        ref = torch.from_numpy(full[key][0]).float()[None]
        cos.append(F.cosine_similarity(up.flatten(1), ref.flatten(1)).item())
    return float(np.mean(cos))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    console = Console(stderr=True)
    ready = prepare(load_recipe("demo", args.overrides), console)
    teacher = freeze(load_model(ready.teacher.weights))
    size, pattern = ready.data.image_size, Path(ready.data.train).name
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        maps = {}
        for s in sorted(set(args.scales) | {1}):
            precompute(ready, root / f"scale{s}", map_scale=s, console=console)
            maps[s] = stored_maps(root / f"scale{s}", pattern)
        runs = [("frozen KD (no map)", "kd", 1)] + [(f"frozen e2KD, map 1/{s}", "e2kd", s) for s in args.scales]
        for name, method, s in runs:
            r = copy.deepcopy(ready)
            r.distill.method, r.distill.frozen, r.run.out = method, True, str(root / f"run-{method}-{s}")
            r.data.train = str(root / f"scale{s}" / pattern)
            console.print(f"[bold]map_scale[/]: {name}")
            student = train(r, console).model
            m = evaluate(student, r.data.test, data=r.data, teacher=teacher)
            row = {"explanation_similarity": m["explanation_similarity"], "conflicting_acc": m["groups"]["1"],
                   "acc1": m["acc1"]}
            if method == "e2kd":
                nbytes = float(np.mean([b for _, b in maps[s].values()]))
                row |= {"map_scale": s, "map_bytes_per_sample": nbytes,
                        "fraction_of_full": nbytes / float(np.mean([b for _, b in maps[1].values()])),
                        "fidelity_cos": fidelity(maps[1], maps[s], size)}
            results[name] = row

    table = Table(title=f"frozen teaching on the demo task ({size}², {len(maps[1])} training images)")
    for col in ("run", "map bytes/sample", "× full", "stored-map cos", "expl. sim.", "conflicting acc", "acc"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['map_bytes_per_sample']:.0f}" if "map_scale" in r else "—",
                      f"{r['fraction_of_full']:.3f}" if "map_scale" in r else "—",
                      f"{r['fidelity_cos']:.4f}" if "map_scale" in r else "—",
                      f"{100 * r['explanation_similarity']:.1f}", f"{100 * r['conflicting_acc']:.1f}",
                      f"{100 * r['acc1']:.1f}")
    Console().print(table)
    imagenet = {s: 6 * (224 // s) ** 2 * 2 + 128 for s in (1, 2, 4)}
    Console().print("ImageNet scale (6×224×224 fp16 W(x) + 128-byte .npy header): "
                    + ", ".join(f"1/{s}: {b / 1e3:.0f} kB per image = {b * 1_281_167 / 1e9:.0f} GB for the full "
                                f"train set, {b * 50_000 / 1e9:.1f} GB for 50 shots" for s, b in imagenet.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"demo": results, "imagenet_bytes_per_image": imagenet}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
