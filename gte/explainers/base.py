"""The interface every explainer implements, and the registry that names them.

An explainer turns one forward pass of a model into per-sample explanation maps of chosen classes. It serves two
callers: :meth:`Explainer.explain_with_logits` (teachers, evaluation, ``gte explain``: maps and logits of one forward,
detached unless ``create_graph``) and :meth:`Explainer.training_forward` (a student in training: the logits of one
forward and a function giving maps of any classes, differentiable in the parameters, from that same forward).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from gte.errors import GteError

Explain = Callable[[torch.Tensor], torch.Tensor]  # classes (N) -> maps (N×c×H×W), differentiable


class Explainer(ABC):
    """One attribution method."""

    name: ClassVar[str] = ""
    channels: ClassVar[int] = 1  # map channels (B-cos W(x): the 6 input channels)
    needs_bcos: ClassVar[bool] = False  # only for B-cos networks (explanations from their dynamic linear weights)

    def check(self, model: nn.Module) -> None:
        """Raise a one-line :class:`GteError` when ``model`` cannot be explained this way."""

    def check_student(self, model: nn.Module) -> None:
        """Raise a one-line :class:`GteError` when a student cannot be *trained* through its explanations (after
        :meth:`check`); the default: any model that can be explained can."""

    @abstractmethod
    def explain_with_logits(self, model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None,
                            create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps, logits) of one forward; ``classes=None`` explains each sample's top-1 class."""

    @abstractmethod
    def training_forward(self, model: nn.Module, x: torch.Tensor, exp_grad: str = "exact") -> tuple[torch.Tensor,
                                                                                                    Explain]:
        """A student's training forward: (logits, explain) — ``explain(classes)`` differentiable in the parameters."""

    def attribution(self, x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """N×H×W evidence per pixel (for EPG / IoU): the map itself for single-channel maps."""
        return maps[:, 0]


EXPLAINERS: dict[str, Explainer] = {}


def register(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator: make an explainer available as ``distill.explainer = cls.name``."""
    if cls.name in EXPLAINERS:
        raise ValueError(f"explainer '{cls.name}' registered twice")
    EXPLAINERS[cls.name] = cls()
    return cls


def selected(logits: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Sum of each sample's chosen logit (samples are independent, so one gradient call serves the batch)."""
    if classes is None:
        classes = logits.detach().argmax(1)
    return logits.gather(1, classes.to(logits.device).long()[:, None]).sum()


def get(name: str) -> Explainer:
    """The registered explainer ``name`` (one-line error naming the known ones)."""
    if name not in EXPLAINERS:
        raise GteError(f"unknown explainer '{name}' (known: {', '.join(EXPLAINERS)})")
    return EXPLAINERS[name]
