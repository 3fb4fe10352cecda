"""Small data fixtures for tests and examples: real JPEG shards, corruption, truncation, tiny source trees."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(rng: np.random.Generator, width: int = 24, height: int = 20, quality: int = 90) -> bytes:
    a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg_shards(directory: Path, sizes: list[int], *, prefix: str = "data", num_classes: int = 4,
                      seed: int = 0, width: int = 24, height: int = 20, key_format: str = "{i:06d}",
                      extra: dict[str, bytes] | None = None) -> tuple[str, list[str]]:
    """Shards ``prefix-000000.tar…`` with ``sizes[j]`` samples each (0 writes an empty, valid tar): ``jpg``,
    ``cls`` = i % num_classes, ``json`` {"group": i % 2}; returns (brace spec, keys in order)."""
    import webdataset as wds

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, i = [], 0
    for j, n in enumerate(sizes):
        with wds.TarWriter(str(directory / f"{prefix}-{j:06d}.tar"), encoder=False, mtime=0) as sink:
            for _ in range(n):
                key = key_format.format(i=i)
                sample = {"__key__": key, "jpg": jpeg_bytes(rng, width, height), "cls": str(i % num_classes).encode(),
                          "json": json.dumps({"group": i % 2}).encode(), **(extra or {})}
                sink.write(sample)
                keys.append(key)
                i += 1
    last = len(sizes) - 1
    spec = str(directory / (f"{prefix}-000000.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"))
    return spec, keys


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar member by member: ``change(name, data) -> bytes | None`` (None keeps the member)."""
    path = Path(path)
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isfile() else b""
            new = change(m.name, data)
            members.append((m, data if new is None else new))
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    os.replace(tmp, path)


def corrupt_images(path: Path, keys: set[str]) -> None:
    """Cut the image (jpg/png/webp) of each key in ``keys`` to its first third (a truncated image file)."""
    rewrite_tar(path, lambda name, data: data[: len(data) // 3] if name.rsplit(".", 1)[0] in keys
                and name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp") else None)


def truncate_tar(path: Path, *, inside_last: bool = True) -> None:
    """Cut a tar inside the data of its last member (``inside_last``) or right after its last member's data."""
    path = Path(path)
    with tarfile.open(path) as tar:
        last = [m for m in tar][-1]
    cut = last.offset_data + (last.size // 2 if inside_last else last.size)
    with open(path, "r+b") as f:
        f.truncate(cut)


def write_imagefolder(root: Path, layout: dict[str, int], *, seed: int = 0) -> None:
    """``root/<class>/img_<i>.jpg`` with ``layout[class]`` small JPEGs each."""
    rng = np.random.default_rng(seed)
    for cls, n in layout.items():
        d = Path(root) / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"img_{i}.jpg").write_bytes(jpeg_bytes(rng))


def _dump_keys(argv: list[str]) -> None:
    """``python -m gte.data.testing SPEC OUT_DIR MODE WORKERS BATCH [EPOCH]`` (under torchrun): one epoch of the
    loader on this rank; training steps all-reduce once per batch like DDP (uneven step counts would hang);
    writes ``OUT_DIR/rank<r>.json`` with the keys seen, the batch count and the skipped count."""
    import torch
    import torch.distributed as dist

    from gte.data.shards import make_loader

    spec, out, mode, workers, batch = argv[0], Path(argv[1]), argv[2], int(argv[3]), int(argv[4])
    epoch = int(argv[5]) if len(argv) > 5 else 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    loader = make_loader(spec, train=mode == "train", image_size=16, batch_size=batch, num_workers=workers,
                         shuffle_buffer=50, seed=7, epoch=epoch)
    keys, batches = [], 0
    for b in loader:
        keys.extend(b["key"])
        batches += 1
        if world > 1 and mode == "train":
            dist.all_reduce(torch.ones(1))
    if world > 1:
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({"keys": keys, "batches": batches, "len": len(loader),
                                                      "skipped": loader.skipped}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    _dump_keys(sys.argv[1:])
