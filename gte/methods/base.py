"""The interface every training method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn

from gte.config import DistillConfig
from gte.errors import GteError
from gte.losses import classification_loss
from gte.models import info, to_model_input
from gte.onepass import fused_layers, is_bcos_cnn


class Method(ABC):
    """A training objective over a student (and optionally a frozen teacher)."""

    needs_teacher = False

    def __init__(self, cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None = None):
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.student_info = info(student)
        self.fused = is_bcos_cnn(student)  # B-cos CNN students train through gte.onepass' fused layers
        if teacher is not None and info(teacher).num_classes != self.student_info.num_classes:
            raise GteError(f"teacher has {info(teacher).num_classes} classes, student {self.student_info.num_classes}")

    @abstractmethod
    def loss(self, images: torch.Tensor, labels: torch.Tensor, step: int,
             frozen: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch and its logged terms.

        ``frozen`` (``distill.frozen``): the batch's stored teacher outputs, ``{"logits": N×C, "map": N×c×H×W}`` (the
        map already cropped/flipped like ``images``); methods that use a teacher take them instead of running it.
        """

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(self.student_info, images)

    def student_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The student's training forward (first-order gradients)."""
        xs = self.student_input(images)
        if not self.fused:
            return self.student(xs)
        with fused_layers(self.student):
            return self.student(xs)

    def with_labels(self, loss: torch.Tensor, logs: dict, logits: torch.Tensor, labels: torch.Tensor,
                    weight: float) -> torch.Tensor:
        """Add ``weight ·`` the label loss (skipped entirely at weight 0)."""
        if weight:
            ce = classification_loss(logits, labels, self.student_info.bcos)
            logs["ce"] = ce.detach()
            loss = loss + weight * ce
        return loss
