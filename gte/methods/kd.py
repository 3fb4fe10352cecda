"""Knowledge distillation (Hinton et al.): match the teacher's softened class distribution."""

from __future__ import annotations

import torch

from gte.losses import kd_loss, multilabel_kd_loss
from gte.methods.base import Method
from gte.models import info, to_model_input


class KD(Method):
    """L = T²·KL(p_T ‖ p_S) (+ w_ce · CE); with ``distill.multilabel`` a per-class binary KL on sigmoids."""

    needs_teacher = True

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(info(self.teacher), images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            t_logits = self.teacher(self.teacher_input(images))
        s_logits = self.student(self.student_input(images))
        return self.logit_terms(s_logits, t_logits, labels)

    def logit_terms(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss_fn = multilabel_kd_loss if self.cfg.multilabel else kd_loss
        kd = loss_fn(s_logits, t_logits.detach(), self.cfg.temperature)
        logs = {"kd": kd.detach()}
        return self.with_labels(kd, logs, s_logits, labels, self.cfg.ce_weight), logs
