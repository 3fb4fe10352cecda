"""Resumable training state under ``OUT/checkpoints/step-<8-digit step>/``, written atomically, never pickled.

A checkpoint holds the student (safetensors), the method's trainable parts and state (``method.safetensors``, when
the method has any), optimizer and scheduler state dicts (tensors and plain Python values,
read back with ``torch.load(weights_only=True)``), the loop position and every rank's RNG states. It is written into a
hidden temporary directory and renamed into place, so a kill at any moment leaves either the old set of checkpoints
or the new one — never a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gte.errors import GteError

PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as weights-only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save(directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         position: dict[str, Any], rng: list[dict[str, Any]], keep: int,
         method_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one checkpoint (main process only) and delete all but the newest ``keep``."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{position['step']:08d}"
    tmp = directory / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:  # serialised in memory, written by Python: a full disk is an OSError (ENOSPC), not a library's RuntimeError
        (tmp / "model.safetensors").write_bytes(save({k: v.detach().contiguous().cpu()
                                                      for k, v in model.state_dict().items()}))
        if method_state:
            (tmp / "method.safetensors").write_bytes(save({k: v.detach().contiguous().cpu()
                                                           for k, v in method_state.items()}))
        state = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, state)
        (tmp / "state.pt").write_bytes(state.getbuffer())
        (tmp / "position.json").write_text(json.dumps(position))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half checkpoint would keep the space the disk lacks
        raise
    if final.exists():  # the same step saved twice (epoch end right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class OtherRecipe(GteError):
    """The checkpoint was written by a run of a different recipe (nothing was loaded)."""


def read_position(path: Path) -> dict[str, Any]:
    """A checkpoint's ``position.json`` (step, epoch, batch, digest, the training recipe), checked to be an object."""
    try:
        position = json.loads((path / "position.json").read_text())
    except (OSError, ValueError) as e:
        raise GteError(f"checkpoint {path} cannot be restored ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(position, dict):
        raise GteError(f"checkpoint {path} cannot be restored (position.json is not an object)")
    return position


def load(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         method: Any = None, digest: str | None = None) -> dict[str, Any]:
    """Restore model/optimizer/scheduler (and ``method``'s parts and state) from ``path``; returns its position (with
    the per-rank RNG list). ``digest``: the recipe's training digest, checked first (:class:`OtherRecipe`)."""
    from safetensors.torch import load_file

    try:
        position = json.loads((path / "position.json").read_text())
        if not isinstance(position, dict):
            raise ValueError("position.json is not an object")
        if digest is not None and position.get("digest") != digest:
            raise OtherRecipe(f"{path.parent} holds checkpoints of a different recipe: choose another --out")
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        if method is not None and (method.state_dict() or (path / "method.safetensors").exists()):
            method.load_state_dict(load_file(str(path / "method.safetensors")))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    # UnpicklingError: weights_only=True refusing a corrupt (or hostile) state.pt — nothing is ever unpickled
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise GteError(f"checkpoint {path} cannot be restored ({str(e).splitlines()[0][:200]})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    position["rng"] = state["rng"]
    return position
