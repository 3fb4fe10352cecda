"""Optimisation pieces of the training loop: optimizer, warm-up + cosine schedule, gradient clipping, the update."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn

from gte.config import Recipe
from gte.errors import GteError


def adaptive_clip_grad_(parameters: Iterable[nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise as in the B-cos v2 trainer."""

    def unitwise_norm(t: torch.Tensor) -> torch.Tensor:
        if t.squeeze().ndim <= 1:
            return torch.linalg.vector_norm(t)
        dim = 1 if t.ndim in (2, 3) else tuple(range(1, t.ndim))  # per output unit (row / filter)
        return torch.linalg.vector_norm(t, dim=dim, keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
        grad_norm = unitwise_norm(p.grad.detach())
        scale = (max_norm / grad_norm.clamp(min=1e-6)).clamp(max=1.0)
        p.grad.detach().mul_(scale)


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_decay: float):
    """LR factor: linear from ``warmup_decay`` to 1 over the warm-up, then cosine to 0 (per optimiser step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_decay + (1.0 - warmup_decay) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(recipe: Recipe, params: Iterable[Any]) -> torch.optim.Optimizer:
    """``optim.name`` over ``params`` (parameters, or parameter groups: dicts whose own keys override the recipe's)."""
    o = recipe.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay, nesterov=True)
    raise GteError(f"unknown optim.name '{o.name}' (known: adam, adamw, sgd)")


def apply_update(accelerator, modules: list[nn.Module], optimizer, scheduler, clip: str, clip_value: float) -> None:
    """Clip the (synchronised) gradients of ``modules`` (the student, and a method's trainable parts), step optimiser
    and schedule, clear the gradients."""
    params = [p for m in modules for p in m.parameters()]
    if clip == "agc":
        if accelerator.scaler is not None:
            accelerator.unscale_gradients()
        adaptive_clip_grad_(params, clip_value)
    elif clip == "norm":
        accelerator.clip_grad_norm_(params, clip_value)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
