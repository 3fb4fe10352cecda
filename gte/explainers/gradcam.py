"""Positive GradCAM (Selvaraju et al., ICCV 2017) at a model's GradCAM layer (``ModelInfo.gradcam_layer``):

    CAM_c = ReLU( Σ_k mean_ij(∂y_c / ∂A_k) · A_k ),   bilinearly upsampled to the input size (N×1×H×W).

A student trained through its CAM (e2KD) needs the derivative of ∂y_c/∂A_k in its parameters: a second derivative of
every layer after A. PyTorch lacks some (``hardsigmoid_backward``: the squeeze-excitation gates of MobileNetV3 blocks),
so :meth:`GradCAM.check_student` takes it once on one small random image when the method is built, and names the
layer and the architecture's own GradCAM layer when it cannot.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte.errors import GteError
from gte.explainers.base import Explainer, register, selected
from gte.models import create, get_submodule, info, to_model_input


def on_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """N×L×D tokens → N×D×h×w: the ``prefix`` class/register tokens dropped, the rest on their square patch grid."""
    patches = tokens[:, prefix:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise GteError(f"{patches.shape[1]} patch tokens do not form a square grid: GradCAM cannot place them")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def gradcam(acts: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor | None, size: tuple[int, int],
            create_graph: bool = False, token_prefix: int | None = None, nhwc: bool = False) -> torch.Tensor:
    """Positive GradCAM of ``classes`` (None = top-1) from a layer's activations and the logits of the same forward
    (token activations, N×L×D, are put on their patch grid first: ``token_prefix`` tokens dropped)."""
    (grads,) = torch.autograd.grad(selected(logits, classes), acts, create_graph=create_graph)
    if nhwc:  # a channels-last map (Swin): channels first, as GradCAM weighs channels
        acts, grads = acts.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)
    elif acts.ndim == 3:  # tokens (N×L×D); a layer named by explain_layer may not say how many lead the grid
        prefix = token_prefix if token_prefix is not None else acts.shape[1] - math.isqrt(acts.shape[1]) ** 2
        acts, grads = on_grid(acts, prefix), on_grid(grads, prefix)
    elif acts.ndim != 4:
        raise GteError(f"GradCAM needs a feature map (N×C×H×W) or tokens (N×L×D); the layer gave {acts.ndim} dims")
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)


@register
class GradCAM(Explainer):
    """GradCAM maps, N×1×H×W, for any model with a GradCAM layer."""

    name = "gradcam"

    def check(self, model: nn.Module) -> None:
        if info(model).gradcam_layer is None:
            raise GteError(f"{info(model).arch} has no GradCAM layer")

    def check_student(self, model: nn.Module) -> None:
        mi = info(model)
        problem = double_backward_problem(model, mi.gradcam_layer)
        if problem is None:
            return
        own = _own_layer(mi.arch)
        hint = (f"; the architecture's own GradCAM layer takes it: student.explain_layer = \"{own}\""
                if own and own != mi.gradcam_layer and double_backward_problem(model, own) is None
                else "; name a later layer with student.explain_layer")
        raise GteError(f"student {mi.arch}: GradCAM at layer '{mi.gradcam_layer}' cannot be trained through — e2KD "
                       f"needs its gradient's derivative and PyTorch has none for a layer after it ({problem}){hint}")

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
        with _unfused_attention(model) if create_graph else contextlib.nullcontext():
            logits, acts = self._forward(model, x.detach().requires_grad_(True))
        with torch.enable_grad():
            return gradcam(acts, logits, classes, x.shape[-2:], create_graph, info(model).token_prefix,
                           info(model).map_nhwc), logits

    def training_forward(self, model, x, exp_grad="exact"):
        with _unfused_attention(model):
            logits, acts = self._forward(model, x)

        def explain(classes: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return gradcam(acts, logits, classes, x.shape[-2:], True, info(model).token_prefix,
                               info(model).map_nhwc)
        return logits, explain


def double_backward_problem(model: nn.Module, layer: str) -> str | None:
    """PyTorch's error taking ∂(Σ CAM)/∂θ for GradCAM at ``layer`` (the explanation term's gradient), or None when it
    can: one forward on one small random image in eval mode (running statistics untouched), nothing accumulated."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None
    mi = info(model)
    size = mi.input_size if mi.fixed_input_size else min(mi.input_size, 64)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(params[0].device, params[0].dtype)
    store: list[torch.Tensor] = []
    handle = get_submodule(model, layer).register_forward_hook(lambda m, i, o: store.append(o))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), _unfused_attention(model):
            logits = model(to_model_input(mi, x))
            cam = gradcam(store[-1], logits, None, x.shape[-2:], True, mi.token_prefix, mi.map_nhwc)
            torch.autograd.grad(cam.sum(), params, allow_unused=True)
    except (RuntimeError, NotImplementedError) as e:
        if "not implemented" not in str(e):
            raise
        return str(e).strip().splitlines()[0]
    finally:
        handle.remove()
        model.train(was_training)
    return None


def _own_layer(arch: str) -> str | None:
    """The GradCAM layer of ``arch`` as gte builds it (a parameter-free copy), whatever a spec override says."""
    try:
        with torch.device("meta"):
            return info(create(arch, 2)).gradcam_layer
    except GteError:
        return None


@contextlib.contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm attention without its fused kernel during a student's explained forward: torch's fused CPU attention has
    no double backward, and the explanation term needs one (same values; the plain softmax(QKᵀ)V path)."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in fused:
            m.fused_attn = True
