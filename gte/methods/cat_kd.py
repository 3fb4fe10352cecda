"""CAT-KD (Guo et al., "Class Attention Transfer Based Knowledge Distillation", CVPR 2023).

Class activation maps of the last feature map F ∈ R^{K×H×W} with the classifier weight W ∈ R^{C×K} (a bias-free 1×1
convolution; the official models replace ``fc`` by ``conv_test = Conv2d(K, C, 1, bias=False)`` applied to ReLU(F),
and their logits are the spatial mean of these maps):

    A_c = Σ_k W_{c,k} · F_k                                            (C maps of H×W per sample)

The CAT loss (official ``CAT_loss``, github:GzyAftermath/CAT-KD ``mdistiller/distillers/CAT_KD.py`` l. 72-81):
average-pool every map to P×P, optionally L2-normalise each pooled map over its P·P entries, then the mean squared
error over batch, classes and positions:

    L_CAT = mean_{n,c,i,j} ( φ(A^S)_{n,c,i,j} − φ(A^T)_{n,c,i,j} )²,   φ = [normalise ∘] adaptive_avg_pool_{P×P}

weighted by β in CAT-KD's total loss  L = CE + β · L_CAT  (the "CAT" variant drops the CE, ``onlyCAT``). Student and
teacher maps of different H×W need no extra step: each is pooled to P×P on its own, as the official code does.
The binarisation and partial-class options of the official code are ablations and are not implemented.

ImageNet defaults (ResNet-34 → ResNet-18, ``configs/imagenet/CAT-KD/r34_r18.yaml`` l. 27-34): β
(``CAT_loss_weight``) 0.5, P (``CAM_RESOLUTION``) 4, ``CE_WEIGHT`` 1, ``onlyCAT: False`` (CAT-KD, with CE),
``IF_NORMALIZE: False``. (ResNet-50 → MobileNet-V2 uses β 10, P 2, normalised; the function defaults P = 2,
normalise = True are those of ``mdistiller/engine/cfg.py`` l. 26-38.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gte.losses import _f32

DEFAULTS = {"beta": 0.5, "pool_size": 4, "normalize": False, "ce_weight": 1.0, "only_cat": False}


def class_activation_maps(features: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    """N×K×H×W features and a C×K (or C×K×1×1) classifier weight → N×C×H×W maps (1×1 conv, no bias)."""
    w = _f32(fc_weight)
    w = w.reshape(w.shape[0], -1)
    f = _f32(features)
    if f.shape[1] != w.shape[1]:
        raise ValueError(f"features have {f.shape[1]} channels but the classifier weight expects {w.shape[1]}")
    dtype = torch.promote_types(f.dtype, w.dtype)
    return torch.einsum("nkhw,ck->nchw", f.to(dtype), w.to(dtype))


def _pooled(cams: torch.Tensor, pool_size: int, normalize: bool) -> torch.Tensor:
    x = F.adaptive_avg_pool2d(_f32(cams), (pool_size, pool_size))
    if normalize:
        norm = x.flatten(2).norm(dim=2).clamp_min(1e-12)
        x = x / norm[..., None, None]
    return x


def cat_loss(student_cams: torch.Tensor, teacher_cams: torch.Tensor, pool_size: int = 2,
             normalize: bool = True) -> torch.Tensor:
    """MSE between the P×P average-pooled (optionally per-map L2-normalised) CAMs; unweighted (multiply by β)."""
    if student_cams.shape[:2] != teacher_cams.shape[:2]:
        raise ValueError(f"student CAMs {tuple(student_cams.shape)} and teacher CAMs {tuple(teacher_cams.shape)} "
                         "differ in batch size or number of classes")
    s = _pooled(student_cams, pool_size, normalize)
    t = _pooled(teacher_cams, pool_size, normalize)
    dtype = torch.promote_types(s.dtype, t.dtype)
    return F.mse_loss(s.to(dtype), t.to(dtype))
