"""Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

With p = softmax(z / T), target class t, the binary probabilities b = [p_t, 1 − p_t] and the distribution over the
non-target classes p̂_i = p_i / (1 − p_t) (i ≠ t), classical KD splits as (paper Eq. 7)

    KD = KL(b^T ‖ b^S) + (1 − p_t^T) · KL(p̂^T ‖ p̂^S) = TCKD + (1 − p_t^T) · NCKD

and DKD weights the two parts freely (paper Eq. 8):

    DKD = α · TCKD + β · NCKD

each term multiplied by T² and averaged over the batch, as in the official ``dkd_loss``
(mdistiller ``mdistiller/distillers/DKD.py`` l. 8-32). p̂ is the softmax of z / T − 1000 · 1[i = t] (the official
gt-mask trick: exp(−1000) underflows to 0, so it is exact unless logits / T span about 1000); TCKD is computed in log
space (log p_t and log(1 − p_t) via logsumexp) rather than as the log of summed probabilities.

The official trainer multiplies DKD by min(epoch / WARMUP, 1) (DKD.py l. 72) with 1-based integer epochs, so on
ImageNet (WARMUP = 1) the ramp is already 1 in the first epoch; ``dkd_warmup`` takes a (possibly fractional) epoch
count and returns the same min(epoch / warmup, 1).

ImageNet defaults (ResNet-34 → ResNet-18): ``configs/imagenet/r34_r18/dkd.yaml`` l. 26-30 sets CE_WEIGHT 1.0,
BETA 0.5, T 1.0, WARMUP 1; ALPHA is not set there and keeps ``mdistiller/engine/cfg.py`` l. 164 ``DKD.ALPHA = 1.0``.
(ResNet-50 → MobileNet-V1 uses BETA 2.0, ``configs/imagenet/r50_mv1/dkd.yaml``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gte.losses import _f32
from gte.methods.base import at_least, option, register
from gte.methods.kd import KD
from gte.methods.logit_std import SETTINGS

DEFAULTS = {"ce_weight": 1.0, "alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup_epochs": 1.0}

_MASK_SHIFT = 1000.0  # the official code's gt-mask offset


def _log_binary(z: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """N×2 log [p_t, 1 − p_t] of softmax(z), from logsumexps (no log of a difference)."""
    lse_all = torch.logsumexp(z, dim=1, keepdim=True)
    log_pt = z.gather(1, gt) - lse_all
    log_rest = torch.logsumexp(z.masked_fill(F.one_hot(gt.squeeze(1), z.shape[1]).bool(), float("-inf")),
                               dim=1, keepdim=True) - lse_all
    return torch.cat([log_pt, log_rest], dim=1)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """α·TCKD + β·NCKD (each T²·KL(teacher ‖ student), summed over its classes, averaged over the batch)."""
    t = temperature
    zs = _f32(student_logits) / t
    zt = _f32(teacher_logits) / t
    if zs.shape[1] < 2:
        raise ValueError("DKD needs at least two classes")
    gt = labels.long().reshape(-1, 1)
    n = zs.shape[0]
    tckd = F.kl_div(_log_binary(zs, gt), _log_binary(zt, gt), reduction="sum", log_target=True) / n
    gt_mask = F.one_hot(gt.squeeze(1), zs.shape[1]).to(zs.dtype)
    log_ps_hat = F.log_softmax(zs - _MASK_SHIFT * gt_mask, dim=1)
    log_pt_hat = F.log_softmax(zt - _MASK_SHIFT * gt_mask, dim=1)
    nckd = F.kl_div(log_ps_hat, log_pt_hat, reduction="sum", log_target=True) / n
    return t * t * (alpha * tckd + beta * nckd)


def dkd_warmup(epoch_float: float, warmup_epochs: float) -> float:
    """The DKD weight ramp min(epoch / warmup, 1) (1 without warmup)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(max(epoch_float, 0.0) / warmup_epochs, 1.0)


# --------------------------------------------------------------------------------------------- the method
@dataclass
class DKDOptions:
    """``[distill.options]`` of ``dkd`` (mdistiller's ImageNet R34 → R18 setting; T is ``distill.temperature``)."""

    alpha: float = option(DEFAULTS["alpha"], at_least(0), ">= 0")
    beta: float = option(DEFAULTS["beta"], at_least(0), ">= 0")
    # the official min(epoch / warmup, 1), epochs counted from 1
    warmup_epochs: float = option(DEFAULTS["warmup_epochs"], at_least(0), ">= 0")


@register("dkd")
class DKD(KD):
    """Decoupled KD: target-class and non-target-class KL weighted apart (α · TCKD + β · NCKD); with
    ``distill.logit_std`` on z-scored logits."""

    Options = DKDOptions
    ce_default = DEFAULTS["ce_weight"]
    multilabel = False  # per-sample class distributions (softmax) and, for DKD, the target class
    logit_std_setting = SETTINGS["dkd"]  # α 9, β 4.5, T 2, CE 1 (gte.methods.logit_std)

    def objective(self, batch, s, t):
        o = self.options
        s_in, t_in = self.standardized(s.logits, t.logits.detach())
        ramp = dkd_warmup(int(batch.epoch) + 1, o.warmup_epochs) if o.warmup_epochs else 1.0
        dkd = dkd_loss(s_in, t_in, batch.labels, o.alpha, o.beta, self.cfg.temperature)
        logs = {"dkd": dkd.detach()}
        return self.with_labels(ramp * dkd, logs, s.logits, batch.labels), logs
