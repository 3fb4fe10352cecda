"""Streaming WebDataset shards (design.md format) into batches of images in [0, 1].

A sample is ``{jpg|jpeg|png|webp, cls, json?}``. Training: shards shuffled per epoch (seeded), a seeded sample-shuffle
buffer, RandomResizedCrop + horizontal flip. Evaluation: Resize + CenterCrop, shards in order. Shards are split by rank
(torch.distributed) and then by DataLoader worker. Images are decoded here with PIL; nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from gte.errors import GteError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_spec(spec: str) -> list[str]:
    """Brace-expand a shard spec (several specs may be joined with ``::``); local files must exist."""
    if not spec:
        raise GteError("no shards given (empty data spec)")
    urls = list(wds.shardlists.expand_urls(spec))
    local = [u for u in urls if "://" not in u or u.startswith("file://")]
    missing = [u for u in local if not Path(u.removeprefix("file://")).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GteError(f"shard file not found: {missing[0]}{more}")
    return urls


def count_samples(spec: str) -> int:
    """Number of samples (distinct keys with an image) in local shards, read from tar headers only."""
    n = 0
    for url in expand_spec(spec):
        with tarfile.open(url.removeprefix("file://")) as tar:
            n += sum(1 for m in tar if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    return n


@dataclass
class Transform:
    """Decode one raw sample and apply the train or eval geometry; output float image in [0, 1]."""

    train: bool
    image_size: int
    eval_resize: int
    crop_scale: tuple[float, float]

    def __post_init__(self) -> None:
        if self.train:
            geometry = [v2.RandomResizedCrop(self.image_size, scale=tuple(self.crop_scale), antialias=True),
                        v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(self.eval_resize, antialias=True), v2.CenterCrop(self.image_size)]
        self.pipeline = v2.Compose([v2.PILToTensor(), *geometry, v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} lacks an image or a cls member")
        with Image.open(io.BytesIO(sample[ext])) as im:
            image = im.convert("RGB")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        return {
            "image": self.pipeline(image),
            "label": int(sample["cls"]),
            "group": int(meta.get("group", -1)),
            "key": sample["__key__"],
        }


def _pipeline(urls: list[str], transform: Transform, *, shuffle_buffer: int, seed: int, epoch: int) -> wds.DataPipeline:
    if transform.train:
        urls = list(urls)
        random.Random(seed * 100_003 + epoch).shuffle(urls)
    stages: list[Any] = [
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
    ]
    if transform.train and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed * 100_003 + epoch))
    stages.append(wds.map(transform, handler=wds.warn_and_continue))
    return wds.DataPipeline(*stages)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples]),
        "group": torch.tensor([s["group"] for s in samples]),
        "key": [s["key"] for s in samples],
    }


def make_loader(
    spec: str,
    *,
    train: bool,
    image_size: int,
    batch_size: int,
    eval_resize: int = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    num_workers: int = 0,
    shuffle_buffer: int = 2000,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image": N×3×H×W in [0,1], "label": N, "group": N (-1 = none), "key": [str]}``."""
    urls = expand_spec(spec)
    transform = Transform(train, image_size, eval_resize or round(image_size / 0.875), tuple(crop_scale))
    dataset = _pipeline(urls, transform, shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=min(num_workers, len(urls)), collate_fn=_collate,
        drop_last=train, persistent_workers=False,
    )
    return iter(loader)
