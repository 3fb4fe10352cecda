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
into ``KD.TEMPERATURE = 2``, ``KD.LOSS.KD_WEIGHT = 9``).
"""

from __future__ import annotations

import torch

from gte.losses import _f32, kd_loss

DEFAULTS = {"temperature": 2.0, "kd_weight": 9.0, "ce_weight": 1.0, "eps": 1e-7}


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score over the last dim: (z − mean) / (unbiased std + eps), at least float32."""
    z = _f32(logits)
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def standardized_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                         eps: float = 1e-7) -> torch.Tensor:
    """T² · KL(p_T ‖ p_S) with p = softmax(standardize(logits) / T), batchmean (``gte.losses.kd_loss``)."""
    return kd_loss(standardize(student_logits, eps), standardize(teacher_logits, eps), temperature)
