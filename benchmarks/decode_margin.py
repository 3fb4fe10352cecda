"""Training crops (RandomResizedCrop 224², one thread, in-process) of megapixel photos: img/s and pixel change of
full-size decoding, reduced-scale decoding with the default ``data.decode_margin = 2`` and with ``1``.

    python benchmarks/decode_margin.py [--crops 40] [--rounds 3]

The photos are scikit-image's retina (1411², a real 2 MP photo) and astronaut / coffee upscaled 3× (bicubic),
encoded as quality-90 JPEGs. img/s: the best of ``--rounds`` passes over the same ``--crops`` seeded crops. Pixel
change: max and mean absolute difference from the full-size decode's crop, in levels of 255.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image
from skimage import data as skd

from gte.data.transforms import SampleTransform


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _upscaled(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.array(Image.fromarray(arr).resize(size, Image.BICUBIC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    photos = {"retina 1411×1411": skd.retina()[..., :3],
              "astronaut ×3 1536×1536": _upscaled(skd.astronaut(), (1536, 1536)),
              "coffee ×3 1800×1200": _upscaled(skd.coffee(), (1800, 1200))}
    print("| photo | full img/s | margin 2: img/s (×), max / mean | margin 1: img/s (×), max / mean |")
    print("|---|---|---|---|")
    for name, arr in photos.items():
        samples = [{"__key__": f"k{i}", "cls": b"0", "jpg": _jpeg(arr)} for i in range(args.crops)]
        rates, crops = {}, {}
        for label, reduced, margin in (("full", False, 2.0), ("m2", True, 2.0), ("m1", True, 1.0)):
            transform = SampleTransform(train=True, image_size=224, reduced_decode=reduced, decode_margin=margin)
            best = float("inf")
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                crops[label] = [transform(s)["image"].int() for s in samples]
                best = min(best, time.perf_counter() - t0)
            rates[label] = args.crops / best
        cells = []
        for label in ("m2", "m1"):
            diffs = [(a - b).abs().float() for a, b in zip(crops[label], crops["full"])]
            cells.append(f"{rates[label]:.0f} ({rates[label] / rates['full']:.2f}×), "
                         f"{max(int(d.max()) for d in diffs)} / {np.mean([float(d.mean()) for d in diffs]):.2f}")
        print(f"| {name} | {rates['full']:.0f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
