"""Explainers: B-cos dynamic linear weights W(x) and positive GradCAM, batched, one class per sample.

Both return the maps and the logits of the same forward pass, so a caller that needs both (a teacher explaining its own
top-1 class, a GradCAM student) runs its model once. ``create_graph=True`` keeps the graph for double backprop
(students); without it the maps are detached and the graph is freed at once (teachers).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte.errors import GteError
from gte.models import get_submodule, info, own_explainer

EXPLAINERS = ("bcos", "gradcam")


def choose_explainer(name: str, student_bcos: bool) -> str:
    """The explainer a run uses — decided here only: ``distill.explainer``, or for ``"auto"`` the student's own (W(x)
    for a B-cos student, GradCAM otherwise). Teacher maps (live, precomputed, evaluated) are made with the same one."""
    if name == "auto":
        return own_explainer(student_bcos)
    if name not in EXPLAINERS:
        raise GteError(f"unknown distill.explainer '{name}' (known: auto, {', '.join(EXPLAINERS)})")
    return name


@contextlib.contextmanager
def bcos_explanation_mode(model: nn.Module) -> Iterator[None]:
    """The bcos package's explanation mode (detached dynamic scaling/normalisation), through DDP wrappers too."""
    from bcos.common import explanation_mode

    with explanation_mode(model):
        yield


def _selected(logits: torch.Tensor, classes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of each sample's chosen logit (samples are independent, so one gradient call serves the batch)."""
    if classes is None:
        classes = logits.detach().argmax(1)
    classes = classes.to(logits.device).long()
    return logits.gather(1, classes[:, None]).sum(), classes


def gradcam(acts: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor | None, size: tuple[int, int],
            create_graph: bool = False) -> torch.Tensor:
    """Positive GradCAM of ``classes`` (None = top-1) from a layer's activations and the logits of the same forward:
    ReLU(Σ_k mean_ij(∂y_c/∂A_k) · A_k), bilinearly upsampled to ``size`` (N×1×H×W)."""
    target, _ = _selected(logits, classes)
    (grads,) = torch.autograd.grad(target, acts, create_graph=create_graph)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)


def explain_with_logits(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None, method: str, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explanation maps and logits of one forward pass; ``classes=None`` explains each sample's top-1 class."""
    if method not in EXPLAINERS:
        raise GteError(f"unknown explainer '{method}' (known: {', '.join(EXPLAINERS)})")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        if method == "bcos":
            if not info(model).bcos:
                raise GteError(f"the 'bcos' explainer needs a B-cos model, {info(model).arch} is not one")
            with bcos_explanation_mode(model):
                logits = model(x)
                target, _ = _selected(logits, classes)
                (maps,) = torch.autograd.grad(target, x, create_graph=create_graph)
        else:
            layer_name = info(model).gradcam_layer
            if layer_name is None:
                raise GteError(f"{info(model).arch} has no GradCAM layer")
            store: list[torch.Tensor] = []
            handle = get_submodule(model, layer_name).register_forward_hook(lambda m, i, o: store.append(o))
            try:
                logits = model(x)
            finally:
                handle.remove()
            maps = gradcam(store[-1], logits, classes, x.shape[-2:], create_graph)
    if not create_graph:
        maps, logits = maps.detach(), logits.detach()
    return maps, logits


def explain(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None, method: str, create_graph: bool = False
) -> torch.Tensor:
    """Explanations of ``classes`` (one per sample; None = top-1): W(x) (N×6×H×W) or GradCAM (N×1×H×W).

    ``x`` is the model's input (6-channel for B-cos). The model's train/eval mode is left as it is.
    """
    return explain_with_logits(model, x, classes, method, create_graph)[0]


def contribution_map(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_channels x · W(x): the per-pixel contribution to the explained logit (N×H×W)."""
    return (x * weights).sum(1)
