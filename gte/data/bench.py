"""Loader benchmark (``gte data bench``, ``benchmarks/loader.py``): decode + augment img/s per DataLoader worker.

Writes synthetic photo-like JPEGs (quality 90: smooth colour fields, shapes, grain — JPEG entropy like a natural
photo, unlike noise; 500×375 is ~70–80 kB, ImageNet-like) of each requested size into shards, then streams them
through the real loader — the training transform (RandomResizedCrop + flip to ``image_size``², float batches) and
the eval one (Resize + CenterCrop) — for each decoder and worker count, PIL both at full size and with reduced-scale
decoding (``data.reduced_decode``), the two runs back to back so that the ratio between them holds on a busy machine.
For comparison it times what one training process consumes: forward + backward + Adam step of a model on random
input of the same size, on the same machine, with torch's default threads.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def realistic_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    from PIL import Image, ImageDraw, ImageFilter

    small = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 200))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2))).astype(np.float32)
    texture = rng.normal(0, 1, ((height + 1) // 2, (width + 1) // 2, 1)).repeat(2, 0).repeat(2, 1)[:height, :width]
    a = np.clip(a + 10 * texture + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_bench_shards(directory: Path, n: int, shards: int = 4, seed: int = 0, width: int = 500, height: int = 375,
                       distinct: int = 64) -> tuple[str, float]:
    """``n`` JPEG samples of ``width``×``height`` in ``shards`` shards, cycling over ``distinct`` different images (a
    multi-megapixel one takes a while to make); returns (spec, mean JPEG kB)."""
    from gte.data.writers.core import atomic_tar, shard_name, shard_spec

    rng = np.random.default_rng(seed)
    jpegs = [realistic_jpeg(rng, width, height) for _ in range(min(n, distinct))]
    per = -(-n // shards)
    for s in range(shards):
        with atomic_tar(directory / shard_name("bench", s)) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                sink.write({"__key__": f"{i:08d}", "jpg": jpegs[i % len(jpegs)], "cls": str(i % 1000).encode()})
    return shard_spec(directory, "bench", shards), float(np.mean([len(j) for j in jpegs])) / 1e3


def decode_only(spec: str, decoder: str, limit: int = 100) -> float:
    """Single-thread decode-only img/s (no geometry) of the first ``limit`` JPEGs."""
    import warnings

    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    from gte.data.spec import expand_spec
    from gte.data.tar import iter_samples

    blobs = [s["jpg"] for s in iter_samples(expand_spec(spec)[0]) if isinstance(s, dict)][:limit]

    def decode(b: bytes) -> None:
        if decoder == "pil":
            with Image.open(io.BytesIO(b)) as im:
                im.load()
        else:
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decode(blobs[0])  # warm-up (imports, first-call set-up)
        t0 = time.perf_counter()
        for b in blobs:
            decode(b)
        return len(blobs) / (time.perf_counter() - t0)


def loader_rate(spec: str, *, workers: int, decoder: str, image_size: int, batch_size: int, train: bool = True,
                reduced_decode: bool = True) -> dict:
    """Steady-state img/s of the training (or eval) loader (from the first batch on, so worker start-up is
    excluded)."""
    from gte.data.loader import make_loader

    loader = make_loader(spec, train=train, image_size=image_size, batch_size=batch_size, num_workers=workers,
                         shuffle_buffer=64, seed=0, decoder=decoder, reduced_decode=reduced_decode,
                         world_size=1, rank=0)
    t_start = time.perf_counter()
    it = iter(loader)
    next(it)
    t_first = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
    dt = time.perf_counter() - t_first
    rate = n / dt if dt > 0 else float("nan")
    return {"transform": "train" if train else "eval", "workers": workers, "decoder": decoder,
            "reduced_decode": reduced_decode, "img_per_s": round(rate, 1),
            "img_per_s_per_worker": round(rate / max(1, workers), 1), "startup_s": round(t_first - t_start, 2)}


def training_rate(model_name: str, image_size: int, batch_size: int, steps: int = 3) -> dict:
    """img/s one training process consumes: fwd + bwd + Adam step (CE) on random input, after one warm-up step."""
    import torch

    from gte.models import build_model, info, to_model_input

    model = build_model(model_name, 1000)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 1000, (batch_size,))
    mi = info(model)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(to_model_input(mi, x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * batch_size / (time.perf_counter() - t0)
    return {"model": model_name, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "img_per_s": round(rate, 1)}


def bench_loader(*, workers: list[int], images: int = 256, image_size: int = 224, batch_size: int = 32,
                 decoders: list[str] = ("pil", "torchvision"), model: str | None = "bcos_resnet18",
                 sizes: list[tuple[int, int]] = ((500, 375), (1600, 1200)),
                 transforms: list[str] = ("train", "eval")) -> dict:
    """``{"cpu_count", "image_size", "batch_size", "jpeg" (the first size's), "jpegs", "decode_only_img_per_s_1_thread"
    (first size), "loader": [one row per size × transform × decoder × workers × reduced_decode], "training"}`` (see
    the module docstring). PIL rows come in pairs, full size then reduced, the reduced one with ``vs_full`` (the
    ratio of the two); torchvision has no DCT scaling and runs at full size only."""
    result: dict = {"cpu_count": os.cpu_count(), "image_size": image_size, "batch_size": batch_size, "jpegs": [],
                    "loader": []}
    for width, height in sizes:
        with tempfile.TemporaryDirectory(prefix="gte-bench-") as tmp:
            spec, kb = write_bench_shards(Path(tmp), images, width=width, height=height)
            jpeg = {"width": width, "height": height, "quality": 90, "mean_kB": round(kb, 1), "images": images}
            result["jpegs"].append(jpeg)
            if len(result["jpegs"]) == 1:
                result["jpeg"] = jpeg
                result["decode_only_img_per_s_1_thread"] = {d: round(decode_only(spec, d), 1) for d in decoders}
            for transform in transforms:
                for d in decoders:
                    for w in workers:
                        kw = dict(workers=w, decoder=d, image_size=image_size, batch_size=batch_size,
                                  train=transform == "train")
                        rows = [loader_rate(spec, reduced_decode=False, **kw)]
                        if d == "pil":
                            rows.append(loader_rate(spec, reduced_decode=True, **kw))
                            full = rows[0]["img_per_s"]
                            rows[1]["vs_full"] = round(rows[1]["img_per_s"] / full, 2) if full > 0 else float("nan")
                        result["loader"] += [{"jpeg": f"{width}x{height}", **r} for r in rows]
    if model:
        result["training"] = training_rate(model, image_size, min(batch_size, 16))
    return result
