"""The reference e2KD step of ``gte bench``: the official GoodTeachersExplain formulation, without optimisation.

Written from the official code's description (../shared/notes/method.md): every dynamic factor of a B-cos layer (the
scaling ``|ŵ·x|/‖x‖``, the uncentered norms' ``1/σ``, the ViT's attention matrix) enters through
:class:`DynamicMultiplication`, which saves the factor *with its graph* and reads an explanation flag at backward time;
the student's forward and W(x) (``autograd.grad(create_graph=True)``) run with the flag on, the final ``backward()``
with it off. This gives the exact gradient gte's one-pass step computes (``tests/test_exact_gradient.py`` checks gte
against its own, independent copy of this formulation), at the cost of plain autograd everywhere. GradCAM students:
one forward, the CAM's gradient with ``create_graph=True``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from bcos.models.vit import Attention
from bcos.modules.bcosconv2d import BcosConv2d
from bcos.modules.bcoslinear import BcosLinear
from bcos.modules.norms.centered_norms import DetachableLayerNorm
from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import BatchNormUncentered2d

from gte.config import DistillConfig
from gte.explain import explain_with_logits
from gte.losses import explanation_loss, kd_loss
from gte.models import info, to_model_input


class DynamicMultiplication(torch.autograd.Function):
    """``weight · input``; with ``state["fixed_weights"]`` (read at backward time) the factor ``weight`` gets no
    gradient, but it is saved with its graph, so a double backward differentiates it."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, input: torch.Tensor, state: dict) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(weight, input)
        return weight * input

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        weight, input = ctx.saved_tensors
        if ctx.state["fixed_weights"]:
            return None, g * weight, None
        return g * input, g * weight, None  # autograd sums a broadcast factor's gradient back to its shape


def _conv(m: BcosConv2d, state: dict, x: torch.Tensor) -> torch.Tensor:
    out = m.linear(x)
    if m.max_out > 1:
        out = out.unflatten(1, (m.out_channels, m.max_out)).max(dim=2).values
    if m.b == 1:
        return out
    norm = m.calc_patch_norms(x)
    scale = out.abs() / norm if m.b == 2 else ((out / norm).abs() + 1e-6).pow(m.b - 1)
    return DynamicMultiplication.apply(scale, out, state)


def _linear(m: BcosLinear, state: dict, x: torch.Tensor) -> torch.Tensor:
    out = m.linear(x)
    if m.max_out > 1:
        out = out.unflatten(-1, (m.out_features, m.max_out)).max(dim=-1).values
    if m.b == 1:
        return out
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-12
    scale = out.abs() / norm if m.b == 2 else ((out / norm).abs() + 1e-6).pow(m.b - 1)
    return DynamicMultiplication.apply(scale, out, state)


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    y = y if weight is None else weight * y
    return y if bias is None else y + bias


def _batch_norm(m: BatchNormUncentered2d, state: dict, x: torch.Tensor) -> torch.Tensor:
    if m.training:
        var = x.var(dim=(0, 2, 3), unbiased=False)
        if m.track_running_stats:
            m.num_batches_tracked.add_(1)
            momentum = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            m.running_var.copy_((1 - momentum) * m.running_var + momentum * var.detach())
    else:
        var = m.running_var
    y = DynamicMultiplication.apply(1 / (var + m.eps).sqrt()[None, :, None, None], x, state)
    c = (lambda t: None if t is None else t[None, :, None, None])
    return _affine(y, c(m.weight), c(m.bias))


def _layer_norm(m: DetachableLayerNorm, state: dict, x: torch.Tensor) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=tuple(range(-len(m.normalized_shape), 0)), unbiased=False, keepdim=True)
    return _affine(DynamicMultiplication.apply(1 / (var + m.eps).sqrt(), x - mean, state), m.weight, m.bias)


def _attention(m: Attention, state: dict, x: torch.Tensor) -> torch.Tensor:
    x = m.norm(x)
    q, k, v = (t.unflatten(-1, (m.heads, -1)).transpose(1, 2) for t in m.to_qkv(x).chunk(3, dim=-1))
    attn = m.attend(q @ k.transpose(-1, -2) * m.scale)
    out = DynamicMultiplication.apply(attn[..., None], v.unsqueeze(2), state).sum(-2)  # as the official ViT
    return m.to_out(out.transpose(1, 2).flatten(2))


_FORWARDS = {BcosConv2d: _conv, BcosLinear: _linear, BatchNormUncentered2d: _batch_norm,
             DetachableLayerNorm: _layer_norm, Attention: _attention}


@contextlib.contextmanager
def official_layers(model: nn.Module) -> Iterator[dict]:
    """Inside, the model's B-cos layers run the official formulation; yields the explanation flag's state dict."""
    state = {"fixed_weights": False}
    patched = [m for m in model.modules() if type(m) in _FORWARDS]
    for m in patched:
        m.forward = lambda x, m=m, f=_FORWARDS[type(m)]: f(m, state, x)
    try:
        yield state
    finally:
        for m in patched:
            del m.forward


def reference_e2kd_loss(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: DistillConfig,
                        explainer: str) -> torch.Tensor:
    """The official step's loss (call ``.backward()`` on it): teacher forward + grad for its map; B-cos student: its
    forward and W(x) with the flag on, the flag off before returning."""
    t_maps, t_logits = explain_with_logits(teacher, to_model_input(info(teacher), images), None, explainer)
    classes = t_logits.argmax(1)
    xs = to_model_input(info(student), images)
    if explainer == "gradcam":
        s_maps, s_logits = explain_with_logits(student, xs, classes, explainer, create_graph=True)
    else:
        with official_layers(student) as state:
            xs = xs.detach().requires_grad_(True)
            state["fixed_weights"] = True
            s_logits = student(xs)
            (s_maps,) = torch.autograd.grad(s_logits.gather(1, classes[:, None]).sum(), xs, create_graph=True)
            state["fixed_weights"] = False
    return kd_loss(s_logits, t_logits, cfg.temperature) + cfg.lambda_exp * explanation_loss(s_maps, t_maps)
