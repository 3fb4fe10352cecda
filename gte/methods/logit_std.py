"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

The Z-score pre-process (paper Algorithm 1): each sample's logit vector z ∈ R^C is standardised before the softmax,

    Z(z) = (z − mean(z)) / (std(z) + eps),      std unbiased (÷ (C − 1)), eps = 1e-7

as in the official ``normalize`` (github:sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``
l. 7-10, torch's default ``std``; torchdistill's ``LogitStdKDLoss.standardize`` is the same). The KD term is then the
classical one on standardised logits with a base temperature T, multiplied by T² as the official ``kd_loss`` does
(KD.py l. 12-19):

    L = T² · KL( softmax(Z(z_T) / T) ‖ softmax(Z(z_S) / T) ),  summed over classes, averaged over the batch.

ImageNet defaults (ResNet-34 → ResNet-18, README l. 119 ``--logit-stand --base-temp 2 --kd-weight 9`` on
``configs/imagenet/r34_r18/kd.yaml``, whose ``KD.LOSS.CE_WEIGHT`` is 1.0; ``tools/train.py`` l. 103-114 turn the flags
into ``KD.TEMPERATURE = 2``, ``KD.LOSS.KD_WEIGHT = 9``). Its DKD variant (same flags on
``configs/imagenet/r34_r18/dkd.yaml``: CE_WEIGHT 1.0, BETA 0.5, ALPHA 1.0 from ``mdistiller/engine/cfg.py`` l. 165)
multiplies both DKD weights by the KD weight and sets the temperature (``tools/train.py`` l. 115-118): α = 9, β = 4.5,
T = 2, CE 1.

``distill.logit_std = true`` alone gives these settings (``SETTINGS``, applied by :func:`gte.methods.resolve` to the
keys the recipe leaves to the method: ``distill.temperature``, ``distill.ce_weight`` and the method's options);
a key the recipe sets — in its file, its ``extends`` chain or by ``--set`` — keeps its value (unlike the official
DKD flag, which would multiply a given α/β by 9 too). DIST has no official logit-standardised setting and is left
as it is. ``gte distill --dry-run`` and the run's ``recipe.toml`` show the resolved values.
"""

from __future__ import annotations

import torch

from gte.losses import _f32, kd_loss

DEFAULTS = {"temperature": 2.0, "kd_weight": 9.0, "ce_weight": 1.0, "eps": 1e-7}
# per method: distill keys and [distill.options] keys the paper's ImageNet setting fixes (see the module docstring)
SETTINGS = {
    "kd": {"temperature": DEFAULTS["temperature"], "ce_weight": DEFAULTS["ce_weight"], "weight": DEFAULTS["kd_weight"]},
    "dkd": {"temperature": DEFAULTS["temperature"], "ce_weight": DEFAULTS["ce_weight"],
            "alpha": 1.0 * DEFAULTS["kd_weight"], "beta": 0.5 * DEFAULTS["kd_weight"]},
}


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score over the last dim: (z − mean) / (unbiased std + eps), at least float32."""
    z = _f32(logits)
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def standardized_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                         eps: float = 1e-7) -> torch.Tensor:
    """T² · KL(p_T ‖ p_S) with p = softmax(standardize(logits) / T), batchmean (``gte.losses.kd_loss``)."""
    return kd_loss(standardize(student_logits, eps), standardize(teacher_logits, eps), temperature)
