"""Knowledge distillation (Hinton et al., 2015): match the teacher's softened class distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gte.errors import GteError
from gte.losses import kd_loss, multilabel_kd_loss
from gte.methods.base import Method, Needs, at_least, option, register
from gte.methods.logit_std import SETTINGS, standardize


@dataclass
class KDOptions:
    """``[distill.options]`` of ``kd`` / ``e2kd`` (T is ``distill.temperature``, λ ``distill.lambda_exp``)."""

    # of the KD term (with distill.logit_std: 9, the logit-standardisation paper's ImageNet setting, with T 2, CE 1)
    weight: float = option(1.0, at_least(0), ">= 0")


@register("kd")
class KD(Method):
    """L = T²·KL(p_T ‖ p_S) (+ w_ce · CE); with ``distill.multilabel`` a per-class binary KL on sigmoids; with
    ``distill.logit_std`` both models' logits are z-scored first (Sun et al., CVPR 2024)."""

    needs = Needs(teacher=True)
    Options = KDOptions
    ce_default = 0.0  # the e2KD paper's KD and e2KD runs use no label loss (official coefficient 0)
    logit_std_setting = SETTINGS["kd"]  # T 2, weight 9, CE 1 (gte.methods.logit_std)

    def objective(self, batch, s, t):
        return self.logit_terms(s.logits, t.logits, batch.labels)

    def __init__(self, cfg, student, teacher=None, **kw):
        super().__init__(cfg, student, teacher, **kw)
        if cfg.logit_std and cfg.multilabel:
            raise GteError("distill.logit_std standardises a softmax's logits: not for multi-label data "
                           "(distill.multilabel)")

    def logit_terms(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss_fn = multilabel_kd_loss if self.cfg.multilabel else kd_loss
        s_in, t_in = self.standardized(s_logits, t_logits.detach())
        kd = loss_fn(s_in, t_in, self.cfg.temperature)
        logs = {"kd": kd.detach()}
        return self.with_labels(self.options.weight * kd, logs, s_logits, labels), logs

    def standardized(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both logit vectors z-scored per sample when ``distill.logit_std`` is set, else as they are."""
        if not self.cfg.logit_std:
            return s_logits, t_logits
        return standardize(s_logits), standardize(t_logits)
