"""The frozen-teaching format — its one owner: member names, ``gte-frozen.json``, and how training reads them.

``gte precompute`` writes, next to every sample's original members,

- ``logits.npy``: the teacher's logits (fp16, C),
- ``map.npy``: the teacher's explanation of its top-1 class (fp16; B-cos W(x) 6×h×w or GradCAM 1×h×w), optionally
  average-pooled to 1/2 or 1/4 of ``data.image_size``,

and ``DIR/gte-frozen.json`` saying how they were made. Training with ``distill.frozen = true`` reads them instead of
running a teacher: the loader is asked for these members (:func:`loader_members`; the map follows the crop, see
``gte.data.transforms.SampleTransform.follow``) and each batch hands them to ``method.loss(…, frozen=…)``
(:func:`from_batch`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gte.config import Recipe
from gte.data.spec import expand_spec
from gte.data.tar import ReadProblem, iter_samples
from gte.errors import GteError
from gte.methods import parse_method
from gte.io import atomic_write_json, read_json

LOGITS, MAP, INFO = "logits.npy", "map.npy", "gte-frozen.json"


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` as ``.npy`` bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_info(directory: Path, meta: dict[str, Any]) -> None:
    """``DIR/gte-frozen.json``, atomically."""
    atomic_write_json(directory / INFO, meta)


def read_info(directory: Path) -> dict[str, Any] | None:
    """``DIR/gte-frozen.json`` (None when there is none); a file that is not a JSON object is a one-line error."""
    path = Path(directory) / INFO
    if not path.exists():
        return None
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise GteError(f"{path} is unreadable or corrupt: re-run `gte precompute` into a new directory")
    return meta


def members_needed(recipe: Recipe) -> tuple[str, ...]:
    """The stored members a frozen run of this recipe's method reads."""
    try:
        explained = parse_method(recipe.distill.method)[1]
    except GteError:  # an unknown name is reported by the recipe checks
        explained = False
    return (LOGITS, MAP) if explained else (LOGITS,)


def check_shards(recipe: Recipe) -> None:
    """Fail early when ``data.train`` was not written by ``gte precompute`` for this recipe's geometry."""
    d = recipe.data
    urls = expand_spec(d.train)
    need = members_needed(recipe)
    first = next((s for s in iter_samples(urls[0], 0, 1) if not isinstance(s, ReadProblem)), None)
    if first is not None:
        missing = [m for m in need if m not in first]
        if missing:
            raise GteError(f"distill.frozen: {urls[0]} has no {', '.join(missing)} member: point data.train at the "
                           "shards written by `gte precompute`")
    meta = read_info(Path(urls[0]).parent)
    for key in ("image_size", "eval_resize", "num_classes") if meta is not None else ():
        if meta.get(key) != getattr(d, key):
            raise GteError(f"distill.frozen: the shards were precomputed with data.{key} = {meta.get(key)}, "
                           f"the recipe has {getattr(d, key)}")


def loader_members(recipe: Recipe) -> dict[str, tuple[str, ...]]:
    """``make_loader`` arguments that read the stored teacher outputs (frozen teaching), else none."""
    if not recipe.distill.frozen:
        return {}
    members = members_needed(recipe)
    return {"members": members, "maps": (MAP,) if MAP in members else ()}


def from_batch(batch: dict, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The batch's stored teacher outputs as ``method.loss(…, frozen=…)`` takes them (None when not frozen)."""
    if LOGITS not in batch:
        return None
    out = {"logits": batch[LOGITS].to(device, non_blocking=True)}
    if MAP in batch:
        out["map"] = batch[MAP].to(device, non_blocking=True)
    return out
