"""Positive GradCAM (Selvaraju et al., ICCV 2017) at a model's GradCAM layer (``ModelInfo.gradcam_layer``):

    CAM_c = ReLU( Σ_k mean_ij(∂y_c / ∂A_k) · A_k ),   bilinearly upsampled to the input size (N×1×H×W).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte.errors import GteError
from gte.explainers.base import Explainer, register, selected
from gte.models import get_submodule, info


def gradcam(acts: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor | None, size: tuple[int, int],
            create_graph: bool = False) -> torch.Tensor:
    """Positive GradCAM of ``classes`` (None = top-1) from a layer's activations and the logits of the same forward."""
    (grads,) = torch.autograd.grad(selected(logits, classes), acts, create_graph=create_graph)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)


@register
class GradCAM(Explainer):
    """GradCAM maps, N×1×H×W, for any model with a GradCAM layer."""

    name = "gradcam"

    def check(self, model: nn.Module) -> None:
        if info(model).gradcam_layer is None:
            raise GteError(f"{info(model).arch} has no GradCAM layer")

    def _forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the GradCAM layer's activations) of one forward with graph."""
        self.check(model)
        store: list[torch.Tensor] = []
        handle = get_submodule(model, info(model).gradcam_layer).register_forward_hook(lambda m, i, o: store.append(o))
        try:
            with torch.enable_grad():
                logits = model(x)
        finally:
            handle.remove()
        return logits, store[-1]

    def explain_with_logits(self, model, x, classes, create_graph=False):
        logits, acts = self._forward(model, x.detach().requires_grad_(True))
        with torch.enable_grad():
            return gradcam(acts, logits, classes, x.shape[-2:], create_graph), logits

    def training_forward(self, model, x, exp_grad="exact"):
        logits, acts = self._forward(model, x)

        def explain(classes: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return gradcam(acts, logits, classes, x.shape[-2:], create_graph=True)
        return logits, explain
