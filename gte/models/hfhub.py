"""``timm/hf-hub:<org>/<name>[@<revision>]``: a timm model with its pretrained weights and ``pretrained_cfg`` from a
Hugging Face Hub repo in timm's layout (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, what
``timm.models.push_to_hf_hub`` writes) — read from the **local Hugging Face cache only**.

The spelling is gte's ``timm/`` prefix before timm's own name (``hf-hub:<repo>``, as given to ``timm.create_model``);
a bare ``hf-hub:…`` (or timm's deprecated ``hf_hub:``) is refused in one line naming the right spelling.

gte never downloads: ``hf download <repo>`` fills the cache beforehand. At run time the cache is only looked up
(``huggingface_hub.try_to_load_from_cache``: file-system lookups, no HTTP) and the model is built from the snapshot
folder (timm's ``local-dir:`` source), so no request is made whether or not ``HF_HUB_OFFLINE`` is set. The cache is
where ``hf download`` puts it: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub`` (read when
a model is built, not when huggingface_hub was imported).

``num_classes``: the recipe's wins. Equal to the repo's, the pretrained head is kept; different, timm drops the
checkpoint's classifier and the head is randomly initialised (what ``timm.create_model(…, num_classes=n)`` does).
``pytorch_model.bin`` is read with ``torch.load(weights_only=True)`` (timm's default): nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gte.errors import GteError
from gte.io import loads_json
from gte.limits import MAX_CLASSES

PREFIX = "timm/hf-hub:"
_MISSPELT = ("hf-hub:", "hf_hub:", "timm/hf_hub:")  # timm's own forms without gte's prefix, and its deprecated alias
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what push_to_hf_hub writes, in timm's order of preference
KEPT = ("input_size", "crop_pct", "interpolation", "label_names")  # pretrained_cfg facts handed back besides mean/std


def is_hf_hub(name: str) -> bool:
    return name.startswith(PREFIX)


def is_misspelt(name: str) -> bool:
    """A Hub name in a spelling gte refuses (with the right one)."""
    return name.startswith(_MISSPELT)


def parse(name: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of ``timm/hf-hub:<repo>[@<revision>]``; a one-line error for any other spelling."""
    if is_misspelt(name):
        raise GteError(f"write Hugging Face Hub models as '{PREFIX}{name.split(':', 1)[1]}' (gte's timm/ prefix before "
                       f"timm's hf-hub: name), not '{name}'")
    repo, _, revision = name[len(PREFIX):].partition("@")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise GteError(f"'{name}': '{repo}' is not a Hugging Face Hub repo id ({PREFIX}<org>/<name>[@<revision>])"
                       ) from None
    return repo, revision or None


def cache_dir() -> Path:
    """The hub cache, resolved like huggingface_hub.constants does but now: its constants are fixed at import, and a
    process (a notebook, a test) may point ``HF_HUB_CACHE``/``HF_HOME`` elsewhere afterwards."""
    env = os.environ
    xdg = env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def snapshot(name: str) -> Path:
    """The cached snapshot folder holding the repo's config.json and weights, or a one-line error saying how to
    download it. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    repo, revision = parse(name)
    cache = cache_dir()
    found = try_to_load_from_cache(repo, "config.json", cache_dir=cache, revision=revision)
    if found is not None and not isinstance(found, str):  # the cache records that the repo has no config.json
        raise GteError(f"{repo} has no config.json (so says the local Hugging Face cache): not a timm model repo")
    folder = Path(found).parent if found else None
    missing = "config.json" if folder is None else \
        (None if any((folder / w).is_file() for w in WEIGHTS) else " or ".join(WEIGHTS))
    if missing:
        at, flag = (f"@{revision}", f" --revision {revision}") if revision else ("", "")
        raise GteError(f"{repo}{at} is not in the local Hugging Face cache ({cache}: no {missing}); download it "
                       f"first with `hf download {repo}{flag}` (gte never downloads at run time)")
    return folder


def repo_classes(name: str) -> int | None:
    """The cached repo's class count (its config.json's), None where the config does not say."""
    n = _config(name, snapshot(name))[1]
    return n if isinstance(n, int) else None


def _config(name: str, folder: Path) -> tuple[str, object]:
    """(architecture, num_classes) from a snapshot's config.json (timm's layout, or its legacy flat one), its
    pretrained_cfg values checked (:func:`check_config`)."""
    file = folder / "config.json"
    try:
        config = loads_json(file.read_text(encoding="utf-8"), str(file))
        cfg = config.get("pretrained_cfg") or {}
        arch = str(config.get("architecture") or cfg["architecture"])
        n = config.get("num_classes", cfg.get("num_classes"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise GteError(f"{name}: {file} is not a timm model config (no 'architecture')") from None
    check_config(config, file)
    return arch, n


def check_config(config: dict, file: Path) -> None:
    """The values gte and timm read from a config.json, checked as a model file's spec is
    (:func:`~gte.models.spec_values.checked_values`): a wrong type, a non-finite mean/std or a size over gte's limit
    is one line naming the key and the file, before timm builds anything from it."""
    from gte.models.spec_values import checked_values

    nested = "pretrained_cfg" in config
    cfg = config["pretrained_cfg"] if nested else config  # timm's legacy layout: one flat dict
    if not isinstance(cfg, dict):
        raise GteError(f"{file}: pretrained_cfg is not a JSON object")
    where = f"{file}: {'pretrained_cfg.' if nested else ''}"
    for d, at in ((config, f"{file}: "), (cfg, where)):
        v = d.get("num_classes")
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CLASSES):
            raise GteError(f"{at}num_classes {str(v)[:40]!r} is not a class count in 0..{MAX_CLASSES}")
    if not isinstance(config.get("model_args", {}), dict):
        raise GteError(f"{file}: model_args is not a JSON object")
    values = {k: cfg[k] for k in ("crop_pct", "mean", "std", "fixed_input_size") if cfg.get(k) is not None}
    size = cfg.get("input_size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 3 and size[0] == 3):
            raise GteError(f"{where}input_size {str(size)[:40]!r} is not [3, height, width]")
        checked_values(where, {"input_size": size[1]}, 224, 1.0)
        values["input_size"] = size[2]  # the side gte reads (timm_geometry), and with crop_pct its eval resize
    if cfg.get("interpolation") is not None and not isinstance(cfg["interpolation"], str):
        values["interpolation"] = cfg["interpolation"]  # an unknown name falls back to bilinear; a non-string is wrong
    checked_values(where, values, 224, 0.875)
    for key, d, at in (("label_names", config, f"{file}: "), ("label_names", cfg, where), ("labels", cfg, where)):
        names = d.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise GteError(f"{at}{key} is not a list of strings")


def create(name: str, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The cached repo's model with a ``num_classes``-way head and its weights (the head's only where the class
    counts agree), and the pretrained_cfg facts in :data:`KEPT` that it gives (label names only with the head kept).
    Under ``torch.device("meta")`` (gte's parameter-free layer checks) the weights are not read."""
    import timm

    folder = snapshot(name)
    arch = _config(name, folder)[0]
    if not timm.is_model(arch):
        raise GteError(f"{name}: its config.json names architecture '{arch}', which timm {timm.__version__} does not "
                       "know (a newer timm?)")
    weights = torch.get_default_device().type != "meta"
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=weights, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 — a repo timm cannot use fails in many ways: one line naming it
        raise GteError(f"{name}: timm cannot build it from {folder} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    cfg = dict(model.pretrained_cfg)
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in KEPT and v is not None}
    if cfg.get("num_classes") != num_classes:  # a new head: the repo's label names name other classes
        kept.pop("label_names", None)
    return model, kept
