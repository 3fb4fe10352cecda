"""Weights on disk: reading state dicts safely, gte's ``model.safetensors`` (tensors + string metadata), building a
model from a file or a catalog name, and converting a released checkpoint into gte's format.

Nothing is ever unpickled: ``.pth`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from gte import __version__, hub
from gte.errors import GteError
from gte.io import atomic_write_bytes, is_file, loads_json, loads_toml
from gte.limits import MAX_CLASSES, check_side
from gte.models.registry import SPEC_KEYS, create, info, with_spec


def build_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build architecture ``name`` with a ``num_classes``-way head; optionally load ``weights`` (a file path, or a
    teacher catalog name meaning its cached download — an existing file path wins)."""
    model = create(name, num_classes)
    if weights is not None:
        path = weights if Path(weights).exists() else (hub.resolve(weights) or weights)
        state, meta = read_state_dict(path)
        _load_state(model, state, meta, path)
        _apply_file_spec(model, meta, Path(path))
    return model


def _clean_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": …}`` / ``{"state_dict": …}`` checkpoints and strip DDP/compile prefixes."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GteError(f"{source}: not a state dict of tensors")
    out = {}
    for k, v in obj.items():
        if v.layout == torch.strided and v.numel() and v.untyped_storage().nbytes() < v.numel() * v.element_size():
            # a torch.save of an expanded view: a shape far larger than the bytes behind it (a crafted head would
            # make the model allocate for it)
            raise GteError(f"{source}: tensor {k[:80]} claims shape {tuple(v.shape)} but holds "
                           f"{v.untyped_storage().nbytes()} bytes (a corrupt or crafted file?)")
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and string metadata from ``.safetensors`` or a ``.pth``/``.pt`` (never unpickling code)."""
    p = Path(path)
    if not is_file(p):
        raise GteError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise GteError(f"{p}: not a readable safetensors file ({e})") from None
        return _clean_state_dict(tensors, str(p)), meta
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GteError(f"{p}: cannot be loaded as a weights-only torch checkpoint ({type(e).__name__})") from None
    return _clean_state_dict(obj, str(p)), {}


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a released B-cos v2 / torchvision / gte state dict into ``model`` (strict, shapes checked)."""
    _load_state(model, *read_state_dict(path), path)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, str], path: object) -> None:
    mi = info(model)
    if "num_classes" in meta and meta["num_classes"] != str(mi.num_classes):
        raise GteError(f"{path}: has {meta['num_classes']} classes, the model {mi.num_classes}")
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].is_floating_point() and not v.is_floating_point():
            raise GteError(f"{path}: tensor {k[:80]} is {str(v.dtype).removeprefix('torch.')}, not floating point as "
                           f"{mi.arch}'s (a corrupt or wrong file?)")
        if k in own and v.is_floating_point() and v.numel() and bool(torch.isnan(v).all()):
            raise GteError(f"{path}: tensor {k[:80]} is all NaN (a diverged or corrupt model)")
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise GteError(f"{path}: does not fit {mi.arch}: {k} is {tuple(state[k].shape)}, the model's "
                       f"{tuple(own[k].shape)} (a different number of classes?)")
    result = model.load_state_dict(state, strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise GteError(f"{path}: does not fit {mi.arch} ({len(result.missing_keys)} missing, "
                       f"{len(result.unexpected_keys)} unexpected keys, e.g. {problems[0]})")


def model_metadata(model: nn.Module, **extra: str) -> dict[str, str]:
    """The string metadata gte writes into every ``model.safetensors``: the architecture, and its spec (``input_spec``:
    input size, crop fraction, interpolation, mean/std, explanation layer, …; ``class_names``) that
    :func:`load_model` reads back, so eval, explain and precompute see the model as it was trained."""
    mi = info(model)
    spec = {k: v for k, v in asdict(mi).items() if k != "class_names"}
    meta = {"format": "gte", "gte_version": __version__, "arch": mi.arch, "num_classes": str(mi.num_classes),
            "input_spec": json.dumps(spec)}
    if mi.class_names:
        meta["class_names"] = json.dumps(list(mi.class_names))
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def spec_from_metadata(meta: dict[str, str], path: object) -> dict:
    """The spec fields a ``model.safetensors`` sets (:data:`~gte.models.registry.SPEC_KEYS`), parsed; a file
    without them (gte < 0.4, or another tool's) sets none. Values are checked by ``with_spec``."""
    out: dict = {}
    for key, fields in (("input_spec", None), ("class_names", "class_names")):
        if key not in meta:
            continue
        try:
            value = loads_json(meta[key], f"{path}: metadata {key}")
        except json.JSONDecodeError:
            raise GteError(f"{path}: metadata {key} is not JSON (a corrupt or edited file?)") from None
        if fields:
            if not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
                raise GteError(f"{path}: metadata {key} is not a JSON list of strings (a corrupt or edited file?)")
            out[fields] = value
        elif isinstance(value, dict):
            out.update({k: v for k, v in value.items() if k in SPEC_KEYS and k != "class_names" and v is not None})
        else:
            raise GteError(f"{path}: metadata {key} is not a JSON object (a corrupt or edited file?)")
    return out


def save_model(model: nn.Module, path: str | os.PathLike, **extra: str) -> None:
    """Write the model's weights as safetensors with metadata, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # bytes written by Python: a full disk is an OSError (ENOSPC, one line from the CLI), not a SafetensorError
    atomic_write_bytes(path, save(state, metadata=model_metadata(model, **extra)))


def load_model(path_or_name: str, arch: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Build and load a model from a gte ``.safetensors`` (self-describing), a ``.pth`` given ``arch``, or a teacher
    catalog name that ``gte fetch-teachers`` has cached."""
    p = Path(path_or_name)
    if not p.exists():
        p = hub.resolve(path_or_name) or p  # GteError for a catalog name that is not downloaded
    if not p.exists():
        raise GteError(f"model not found: {path_or_name} (expected a .safetensors/.pth file or a teacher name)")
    state, meta = read_state_dict(p)
    arch = arch or meta.get("arch")
    if arch is None:
        raise GteError(f"{p}: the architecture is unknown; pass --arch")
    num_classes = num_classes or (_meta_classes(meta, p) if "num_classes" in meta else
                                  infer_num_classes(state, arch, p, "convert it with `gte convert --num-classes`"))
    model = create(arch, num_classes)
    _load_state(model, state, meta, p)
    return _apply_file_spec(model, meta, p)


def _apply_file_spec(model: nn.Module, meta: dict[str, str], path: Path) -> nn.Module:
    """The model's spec as its file says (the architecture's own facts where the file says nothing)."""
    spec = spec_from_metadata(meta, path) if meta.get("arch", info(model).arch) == info(model).arch else {}
    if "input_size" not in spec:  # no spec in the file: the recipe gte wrote next to it, if any
        spec.update(_recipe_geometry(path))
    try:
        return with_spec(model, **spec)
    except GteError as e:
        raise GteError(f"{path}: {e}") from None


def _meta_classes(meta: dict[str, str], path: object) -> int:
    """The metadata's class count, sanity-checked before any model is built (a corrupt value must not allocate a
    head of that size; a wrong but plausible one fails the strict shape check of the load)."""
    raw = meta["num_classes"]
    if not (raw.isdigit() and 2 <= int(raw) <= MAX_CLASSES):
        raise GteError(f"{path}: metadata num_classes {raw[:20]!r} is not a class count in 2..{MAX_CLASSES} "
                       "(a corrupt or edited file?)")
    return int(raw)


def infer_num_classes(state: dict[str, torch.Tensor], arch: str, path: object, hint: str) -> int:
    """The class count of a state dict (released checkpoints carry no metadata): the output size of ``arch``'s
    classifier (its spec's ``head``) weight, bounded by :data:`MAX_CLASSES` before any model is built at that size; a
    one-line error ending in ``hint`` (how to give the count) where the head is unknown or not in the weights."""
    with torch.device("meta"):  # parameter-free: only the head's name is wanted
        head = info(create(arch, 2)).head
    weights = [v for k, v in state.items() if head and k.startswith(f"{head}.") and k.endswith("weight")
               and v.ndim in (2, 4)]
    if not weights and head:  # a strict load would fail on the same missing keys
        raise GteError(f"{path}: does not fit {arch}: its classifier {head!r} is not in the weights")
    if not weights:
        raise GteError(f"{path}: cannot tell the class count for {arch} (gte does not know its classifier); {hint}")
    n = int(weights[0].shape[0])
    if not 2 <= n <= MAX_CLASSES:
        raise GteError(f"{path}: the classifier {head!r} has {n} outputs, not a class count in 2..{MAX_CLASSES} "
                       "(a corrupt or crafted file?)")
    return n


def eval_geometry(model: nn.Module, image_size: int | None = None, eval_resize: int = 0) -> tuple[int, int]:
    """(image_size, eval_resize) to evaluate or explain a model at — decided here only: the sizes given (``eval_resize``
    0 meaning size/0.875, the torchvision convention), else the model's spec (``input_size``, ``crop_pct``)."""
    if image_size is None:
        image_size, eval_resize = info(model).input_size, eval_resize or info(model).eval_resize
    check_side(image_size, "image size")  # the options are checked by name first; this guards every other caller
    check_side(eval_resize or round(image_size / 0.875), "eval resize")
    return image_size, eval_resize


def _recipe_geometry(model_path: Path) -> dict:
    """``input_size`` / ``crop_pct`` from the ``[data]`` of the ``recipe.toml`` gte wrote next to a model file that
    carries no spec (files written before the spec existed)."""
    recipe = model_path.with_name("recipe.toml")
    if not (model_path.is_file() and recipe.is_file()):
        return {}
    import tomllib

    try:
        d = loads_toml(recipe.read_text(), str(recipe)).get("data", {})
        size = int(d.get("image_size", 224))
        return {"input_size": size, "crop_pct": size / (int(d.get("eval_resize", 0)) or size / 0.875)}
    except (tomllib.TOMLDecodeError, ValueError, TypeError, OSError, ZeroDivisionError, AttributeError, GteError):
        return {}  # a best-effort fallback: the architecture's own geometry


def convert_release(teacher: hub.Teacher, pth: Path, out: Path, sha256: str) -> None:
    """``hub.fetch``'s conversion: load a verified release checkpoint weights-only into the gte model (strict: every
    key and shape must fit) and save it as ``out`` with gte metadata naming its source."""
    model = build_model(teacher.arch, teacher.num_classes)
    load_weights(model, pth)
    save_model(model, out, teacher=teacher.name, source=teacher.source, source_url=teacher.url, source_sha256=sha256)
