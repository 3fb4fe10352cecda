"""Attention Transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

Activation-based attention of a feature map A ∈ R^{C×H×W} (paper Sec. 3.1, F^p_mean):

    Q(A) = vec( (1/C) Σ_c |A_c|^p ),       normalised Q̂ = Q / ‖Q‖₂          (one map per sample, H·W entries)

and the loss over the chosen layer pairs j (paper Eq. 2, in the form of the authors' code, which is also what
mdistiller and torchdistill's ``mode='code'`` use):

    L_AT = Σ_j mean_{n, hw} ( Q̂_S^j[n, hw] − Q̂_T^j[n, hw] )²

i.e. the squared distance averaged over batch and positions rather than the paper's un-squared ‖·‖₂ with β/2 (the
code's ``mean`` plays the paper's "β divided by the number of elements in the attention map and batch size"). The
weight β is not applied here; the official ImageNet weight is in ``DEFAULTS``.

When a pair's spatial sizes differ, the larger *feature map* is adaptive-average-pooled to the smaller one's H×W
before the attention map is taken (as mdistiller's ``single_stage_at_loss`` does; torchdistill does not pool).

ImageNet defaults (ResNet-34 → ResNet-18, mdistiller ``configs/imagenet/r34_r18/at.yaml``, which keeps the defaults of
``mdistiller/engine/cfg.py`` l. 67-71: ``AT.P = 2``, ``AT.LOSS.CE_WEIGHT = 1.0``, ``AT.LOSS.FEAT_WEIGHT = 1000.0``),
applied to the outputs of the four residual stages (``feats[1:]``, after ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gte.errors import GteError
from gte.losses import _f32
from gte.methods.base import Method, Needs, at_least, option, positive, register

DEFAULTS = {"beta": 1000.0, "p": 2.0, "ce_weight": 1.0}


def attention_map(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """N×C×H×W features → N×(H·W) attention: channel mean of |f|^p, flattened, L2-normalised per sample."""
    a = _f32(f).abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def _match_size(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the spatially larger feature map down to the other's H×W (each side to the smaller of the two)."""
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    if tuple(fs.shape[-2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[-2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def at_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], p: float = 2) -> torch.Tensor:
    """Σ over layer pairs of mean((Q̂_S − Q̂_T)²) (unweighted; multiply by β). Pairs must agree in batch size."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student feature maps but {len(teacher_feats)} teacher ones")
    if not student_feats:
        raise ValueError("at_loss needs at least one pair of feature maps")
    total = None
    for fs, ft in zip(student_feats, teacher_feats):
        fs, ft = _match_size(_f32(fs), _f32(ft))
        term = (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------------- the method
@dataclass
class ATOptions:
    """``[distill.options]`` of ``at`` (mdistiller's ImageNet setting)."""

    weight: float = option(DEFAULTS["beta"], at_least(0), ">= 0")  # β of L = w_ce · CE + β · L_AT
    p: float = option(DEFAULTS["p"], positive, "> 0")


@register("at")
class AT(Method):
    """Attention transfer: the student's spatial attention maps match the teacher's at every stage."""

    needs = Needs(teacher=True, student_features="stages", teacher_features="stages", frozen=False,
                  spatial=True)
    Options = ATOptions
    ce_default = DEFAULTS["ce_weight"]

    def __init__(self, cfg, student, teacher, **kw):
        super().__init__(cfg, student, teacher, **kw)
        if len(self.student_layers) != len(self.teacher_layers):
            raise GteError(f"at pairs stages one to one: the student taps {len(self.student_layers)} layers, the "
                           f"teacher {len(self.teacher_layers)} (set distill.student_layers / teacher_layers)")

    def objective(self, batch, s, t):
        at = at_loss(s.features, t.features, self.options.p)
        logs = {"at": at.detach()}
        return self.with_labels(self.options.weight * at, logs, s.logits, batch.labels), logs
