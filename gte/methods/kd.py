"""Knowledge distillation (Hinton et al.): match the teacher's softened class distribution."""

from __future__ import annotations

import torch

from gte.errors import GteError
from gte.losses import kd_loss, multilabel_kd_loss
from gte.methods.base import Method
from gte.models import info, to_model_input


class KD(Method):
    """L = T²·KL(p_T ‖ p_S) (+ w_ce · CE); with ``distill.multilabel`` a per-class binary KL on sigmoids."""

    needs_teacher = True

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(info(self.teacher), images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, step: int, frozen=None) -> tuple[torch.Tensor, dict]:
        t_logits = self.teacher_logits(images, frozen)
        s_logits = self.student_logits(images)
        return self.logit_terms(s_logits, t_logits, labels)

    def teacher_logits(self, images: torch.Tensor, frozen: dict | None) -> torch.Tensor:
        """The stored logits (frozen teaching) or the live teacher's, without graph."""
        if frozen is not None:
            t_logits = frozen["logits"].to(images.device, torch.float32)
            if t_logits.shape != (len(images), self.student_info.num_classes):
                raise GteError(f"stored teacher logits have shape {tuple(t_logits.shape)}, expected "
                               f"({len(images)}, {self.student_info.num_classes}): precomputed for another task?")
            return t_logits
        with torch.no_grad():
            return self.teacher(self.teacher_input(images))

    def logit_terms(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss_fn = multilabel_kd_loss if self.cfg.multilabel else kd_loss
        kd = loss_fn(s_logits, t_logits.detach(), self.cfg.temperature)
        logs = {"kd": kd.detach()}
        return self.with_labels(kd, logs, s_logits, labels, self.cfg.ce_weight), logs
