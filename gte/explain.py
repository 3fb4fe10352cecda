"""Explanations by name: the functional face of :mod:`gte.explainers` (``"bcos"``: W(x) of B-cos networks,
``"gradcam"``: positive GradCAM), batched, one class per sample.

Each call returns the maps and the logits of the same forward pass, so a caller that needs both (a teacher explaining
its own top-1 class) runs its model once. ``create_graph=True`` keeps the graph for double backprop; without it the
maps are detached and the graph is freed at once (teachers).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gte.explainers import choose_explainer, get
from gte.explainers import EXPLAINERS as _REGISTRY
from gte.explainers.bcos import bcos_explanation_mode
from gte.explainers.gradcam import gradcam

EXPLAINERS = tuple(_REGISTRY)


def explain_with_logits(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None, method: str, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explanation maps and logits of one forward pass; ``classes=None`` explains each sample's top-1 class."""
    maps, logits = get(method).explain_with_logits(model, x, classes, create_graph)
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
    return get("bcos").attribution(x, weights)


__all__ = ["EXPLAINERS", "bcos_explanation_mode", "choose_explainer", "contribution_map", "explain",
           "explain_with_logits", "gradcam"]
