"""Feature maps at named layers, taken with forward hooks (no model changes), for methods that match features.

A method names the layers it needs through :class:`~gte.methods.base.Needs` (``"stages"``: the model's stage outputs,
shallow → deep; ``"last"``: the map global pooling sees); ``distill.student_layers`` / ``distill.teacher_layers`` name others
(``"<module>:in"`` taps a module's input).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from gte.errors import GteError
from gte.models import get_submodule, info


def layer_names(model: nn.Module, which: str, override: list[str], role: str) -> list[str]:
    """The layers a method taps on ``model`` (``role``: "student"/"teacher", for messages): ``override`` when given,
    else the model's stages (``which = "stages"``), the same before their final ReLU (``"preact"``) or its deepest
    stage (``"last"``); each checked to exist."""
    if not which:
        return []
    mi = info(model)
    names = list(override) if override else (list(mi.stages) if which in ("stages", "preact") else last_map(mi))
    if not names:
        raise GteError(f"{mi.arch} has no feature stages gte knows: set distill.{role}_layers to module names "
                       f"(the {role} has e.g. {', '.join(_some_modules(model))})")
    for name in names:
        if not _module(name):  # get_submodule("") is the model itself: its input is the image
            raise GteError(f"distill.{role}_layers: '{name}' taps the {role}'s input image, not a feature (name a "
                           f"module, e.g. {', '.join(_some_modules(model)[1:3])})")
        try:
            get_submodule(model, _module(name))
        except AttributeError:
            raise GteError(f"{role} {mi.arch} has no layer '{name}' (it has e.g. "
                           f"{', '.join(_some_modules(model))})") from None
    return preactivation(model, names) if which == "preact" and not override else names


def last_map(mi) -> list[str]:
    """The map the classifier's global pooling sees: the GradCAM layer of a CNN (ResNet ``layer4``, EfficientNet
    ``bn2`` after its 1×1 head conv — not the last stage), else the deepest stage; [] when neither is known."""
    if mi.gradcam_layer and mi.token_prefix is None and not mi.map_nhwc:
        return [mi.gradcam_layer]
    return list(mi.stages[-1:])


def _module(name: str) -> str:
    return name[: -len(INPUT)] if name.endswith(INPUT) else name


INPUT = ":in"  # "<module>:in" taps a module's input (of its last call) instead of its output


def preactivation(model: nn.Module, stages: list[str]) -> list[str]:
    """The stages' outputs before their final ReLU, where a stage ends in a block with a ``relu`` module that it
    applies last (torchvision ResNet blocks): ``<stage>.<last block>.relu:in``; other stages as they are."""
    out = []
    for stage in stages:
        children = list(get_submodule(model, stage).named_children())
        last = children[-1] if children else None
        out.append(f"{stage}.{last[0]}.relu{INPUT}" if last is not None and hasattr(last[1], "relu") else stage)
    return out


def _some_modules(model: nn.Module, n: int = 6) -> list[str]:
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    return [name for name, _ in inner.named_children()][:n]


@contextlib.contextmanager
def tap(model: nn.Module, layers: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """``{layer: output}`` of the forward passes run inside the block (the last call of each layer wins)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        module = get_submodule(model, _module(name))
        if name.endswith(INPUT):
            # cloned: the module may work in place (ReLU(inplace=True)) and would overwrite what is kept
            def pre_hook(module, inputs, name=name):
                out[name] = inputs[0].clone()
            handles.append(module.register_forward_pre_hook(pre_hook))
        else:
            def hook(module, inputs, output, name=name):
                out[name] = output
            handles.append(module.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def probe(model: nn.Module, layers: list[str], model_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{layer: output}`` for an input like ``model_input`` (one forward, no graph; the model's train/eval mode is
    kept)."""
    if not layers:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tap(model, layers) as feats:
            model(model_input)
    finally:
        model.train(was_training)
    return feats


def feature_shapes(model: nn.Module, layers: list[str], model_input: torch.Tensor) -> list[torch.Size]:
    """Per-sample shapes (C×H×W) of ``layers``' outputs for an input like ``model_input`` (:func:`probe`)."""
    feats = probe(model, layers, model_input)
    return [feats[name].shape[1:] for name in layers]


def check_taps(feats: dict[str, torch.Tensor], model_input: torch.Tensor, role: str, method: str,
               spatial: bool) -> None:
    """One line for a tapped layer that gives the model's input image (``":in"`` of the model, or of a module the
    image goes into unchanged) and, with ``spatial``, for one whose output is not an N×C×H×W map."""
    for name, f in feats.items():
        if name.endswith(INPUT) and f.shape == model_input.shape and torch.equal(f, model_input):
            raise GteError(f"distill.{role}_layers: '{name}' taps the {role}'s input image, not a feature: "
                           f"{method} distils features (name the module whose output or input is a feature map)")
        if spatial and f.ndim != 4:
            raise GteError(f"distill.{role}_layers: {method} needs a spatial map (N×C×H×W) at each tapped layer; "
                           f"{role} layer '{name}' gives {'×'.join(['N', *map(str, f.shape[1:])])} (name a layer "
                           "whose output is a feature map, e.g. a stage)")


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """Global average pooling of an N×C×H×W map to N×C (the penultimate feature of a CNN)."""
    return feature.mean(dim=(2, 3)) if feature.ndim == 4 else feature.flatten(1)
