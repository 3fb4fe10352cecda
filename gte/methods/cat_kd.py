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

The student's classifier, as the official one: its ImageNet student ``ResNet_test`` (``mdistiller/models/imagenet/
resnet.py`` l. 207 ``conv_test = Conv2d(512·expansion, num_classes, 1, bias=False)``, l. 269-272 logits =
avgpool(conv_test(ReLU(feat4)))) has no classifier bias, so its logits are exactly the spatial mean of its CAMs and
the CE term trains the maps themselves. A linear student head's bias is therefore zeroed and frozen when the method is
built (``[distill.options] head_bias = false``, the default); ``head_bias = true`` keeps and trains it (logits = mean
CAM + bias, as gte did before). The teacher's CAMs never include a bias (l. 269), whatever its head has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte.errors import GteError
from gte.losses import _f32
from gte.methods.base import Method, Needs, at_least, option, register
from gte.models import get_submodule, info

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


# --------------------------------------------------------------------------------------------- the method
@dataclass
class CATKDOptions:
    """``[distill.options]`` of ``cat_kd`` (the official ImageNet R34 → R18 setting)."""

    weight: float = option(DEFAULTS["beta"], at_least(0), ">= 0")
    pool_size: int = option(DEFAULTS["pool_size"], at_least(1), ">= 1")
    normalize: bool = DEFAULTS["normalize"]
    head_bias: bool = False  # False: the student's linear classifier bias is zeroed and frozen (the official
                             # bias-free 1×1 conv head); True: kept and trained


@register("cat_kd")
class CATKD(Method):
    """Class-activation transfer: the student's class activation maps, pooled to P×P, match the teacher's.

    A model with a linear classifier gets its maps from the deepest stage's output and the classifier's weight; a
    B-cos ResNet's 1×1 B-cos head already gives one map per class before pooling, and those are taken as they are.
    """

    needs = Needs(teacher=True, student_features="last", teacher_features="last", frozen=False,
                  spatial=True)
    Options = CATKDOptions
    ce_default = DEFAULTS["ce_weight"]

    def __init__(self, cfg, student, teacher, **kw):
        super().__init__(cfg, student, teacher, **kw)
        self.s_weight, self.t_weight = self._maps_from(student, "student"), self._maps_from(teacher, "teacher")
        if self.s_weight is not None and not self.options.head_bias:
            bias = get_submodule(student, self.student_info.head).bias
            if bias is not None:  # the official student's 1×1 conv head has none: logits = mean of its CAMs
                with torch.no_grad():
                    bias.zero_()
                bias.requires_grad_(False)

    def _maps_from(self, model: nn.Module, role: str) -> torch.Tensor | None:
        """The classifier weight (maps = weight · deepest stage), or None after re-pointing the tap to the head
        when the head itself outputs per-class maps."""
        mi = info(model)
        head = get_submodule(model, mi.head) if mi.head else None
        layers = self.student_layers if role == "student" else self.teacher_layers
        if isinstance(head, nn.Linear):
            channels = self.feature_shapes()[0 if role == "student" else 1][-1][0]
            if channels != head.in_features:
                raise GteError(f"cat_kd: the {role} {mi.arch}'s classifier reads {head.in_features} channels, its "
                               f"tapped map {layers[-1]} has {channels} (set distill.{role}_layers to the map it "
                               "pools)")
            return head.weight
        if head is not None:
            saved = list(layers)
            layers[:] = [mi.head]
            shapes = self.feature_shapes()[0 if role == "student" else 1]
            if len(shapes[0]) == 3 and shapes[0][0] == mi.num_classes and shapes[0][1] > 1:
                return None
            layers[:] = saved
        raise GteError(f"cat_kd needs class activation maps: the {role} {mi.arch} has neither a linear classifier "
                       "after its last stage nor a head giving one map per class")

    def objective(self, batch, s, t):
        o = self.options
        s_cams = s.features[-1] if self.s_weight is None else class_activation_maps(s.features[-1], self.s_weight)
        t_cams = t.features[-1] if self.t_weight is None else class_activation_maps(t.features[-1], self.t_weight)
        cat = cat_loss(s_cams, t_cams.detach(), o.pool_size, o.normalize)
        logs = {"cat": cat.detach()}
        return self.with_labels(o.weight * cat, logs, s.logits, batch.labels), logs
