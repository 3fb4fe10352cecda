"""B-cos explanations: the dynamic linear weights W(x) of a B-cos network, ``logit_c = W_c(x) · x``.

Teachers and evaluation take W(x) as the bcos package does (explanation mode: the dynamic factors detached, so
∂logit/∂x = W(x)); students in training get W(x) from :class:`gte.onepass.OnePass` — the same maps, with the exact
derivative of the official e2KD code in the parameters (``distill.exp_grad``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from gte.errors import GteError
from gte.explainers.base import Explainer, register, selected
from gte.models import info
from gte.onepass import OnePass, supports_one_pass


@contextlib.contextmanager
def bcos_explanation_mode(model: nn.Module) -> Iterator[None]:
    """The bcos package's explanation mode (detached dynamic scaling/normalisation), through DDP wrappers too."""
    from bcos.common import explanation_mode

    with explanation_mode(model):
        yield


@register
class BcosExplainer(Explainer):
    """W(x), N×6×H×W for the ``[x, 1 − x]`` input."""

    name = "bcos"
    channels = 6
    needs_bcos = True

    def check(self, model: nn.Module) -> None:
        if not info(model).bcos:
            raise GteError(f"the 'bcos' explainer needs a B-cos model, {info(model).arch} is not one")

    def explain_with_logits(self, model, x, classes, create_graph=False):
        self.check(model)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), bcos_explanation_mode(model):
            logits = model(x)
            (maps,) = torch.autograd.grad(selected(logits, classes), x, create_graph=create_graph)
        return maps, logits

    def training_forward(self, model, x, exp_grad="exact"):
        if not supports_one_pass(model):
            raise GteError(f"e2KD with B-cos explanations needs a B-cos student gte can differentiate exactly; "
                           f"{info(model).arch} is not one")
        one = OnePass(model, x, exp_grad)
        return one.logits, one.explain

    def attribution(self, x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Σ_channels x · W(x): each pixel's contribution to the explained logit."""
        return (x * maps).sum(1)
