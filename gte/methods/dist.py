"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

With Y = softmax(Z / τ) (B×C, rows are samples) and the Pearson distance d_p(u, v) = 1 − ρ_p(u, v):

    L_inter = τ² · (1/B) Σ_i d_p(Y^S_{i,:}, Y^T_{i,:})     (inter-class relation: correlation over classes per sample)
    L_intra = τ² · (1/C) Σ_j d_p(Y^S_{:,j}, Y^T_{:,j})     (intra-class relation: correlation over the batch per class)
    L_DIST  = β · L_inter + γ · L_intra

(paper Sec. 3.2-3.3; the overall objective adds α · CE). ρ_p is computed as the official code does
(``lib/models/losses/dist_kd.py`` l. 4-10 of github:hunto/image_classification_sota, the DIST_KD submodule): centre
each vector, then (u·v) / (‖u‖‖v‖ + eps) with eps = 1e-8.

ImageNet defaults (ResNet-34 → ResNet-18, ``configs/strategies/distill/resnet_dist.yaml`` l. 28-30 ``kd: 'dist'``,
``ori_loss_weight: 1.``, ``kd_loss_weight: 2.``; ``lib/models/losses/kd_loss.py`` l. 68 ``DIST(beta=1, gamma=1,
tau=1)``): β = γ = τ = 1, the DIST term weighted 2 and cross-entropy 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gte.losses import _f32
from gte.methods.base import at_least, option, register
from gte.methods.kd import KD

DEFAULTS = {"beta": 1.0, "gamma": 1.0, "temperature": 1.0, "kd_weight": 2.0, "ce_weight": 1.0}


def pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of 1 − ρ(a_i, b_i), the Pearson correlation taken along dim 1 (official eps convention)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    rho = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return 1.0 - rho.mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              temperature: float) -> torch.Tensor:
    """β·τ²·inter-class + γ·τ²·intra-class Pearson distance between softmax(logits / τ) of student and teacher."""
    t = temperature
    ys = torch.softmax(_f32(student_logits) / t, dim=1)
    yt = torch.softmax(_f32(teacher_logits) / t, dim=1)
    inter = pearson_distance(ys, yt)
    intra = pearson_distance(ys.transpose(0, 1), yt.transpose(0, 1))
    return t * t * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------------------------- the method
@dataclass
class DISTOptions:
    """``[distill.options]`` of ``dist`` (the official ImageNet setting; τ is ``distill.temperature``)."""

    weight: float = option(DEFAULTS["kd_weight"], at_least(0), ">= 0")
    beta: float = option(DEFAULTS["beta"], at_least(0), ">= 0")  # inter-class relation
    gamma: float = option(DEFAULTS["gamma"], at_least(0), ">= 0")  # intra-class relation


@register("dist")
class DIST(KD):
    """DIST: the student's class distributions correlate with the teacher's, per sample and per class (Pearson)."""

    Options = DISTOptions
    ce_default = DEFAULTS["ce_weight"]
    multilabel = False  # per-sample class distributions (softmax) and, for DKD, the target class
    logit_std_setting = {}  # the logit-standardisation code has no DIST setting: its own defaults stay

    def objective(self, batch, s, t):
        o = self.options
        s_in, t_in = self.standardized(s.logits, t.logits.detach())
        dist = dist_loss(s_in, t_in, o.beta, o.gamma, self.cfg.temperature)
        logs = {"dist": dist.detach()}
        return self.with_labels(o.weight * dist, logs, s.logits, batch.labels), logs
