"""ReviewKD: distilling knowledge via knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021, arXiv:2104.09044).

The student's stage features F_1…F_n (shallow→deep; the last one the pooled feature as an N×C×1×1 map) are
fused deep→shallow by attention-based fusion (ABF, Fig. 3): at stage i the feature is projected to ``mid``
channels, ``X_i = BN(conv1x1(F_i))``, and merged with the upsampled fused residual of the deeper stage,

    A = σ(conv1x1([X_i, up(R_{i+1})])) ∈ R^{N×2×H×W},      R_i = A_0 ⊙ X_i + A_1 ⊙ up(R_{i+1})

(the deepest stage has no residual, ``R_n = X_n``); the output in the teacher's channel count is
``Y_i = BN(conv3x3(R_i))``. The review loss (eq. 6 with the fusion of eq. 7) compares each Y_i with the teacher's
feature at the same stage with the hierarchical context loss (HCL, Fig. 4):

    HCL(Y, T) = [ MSE(Y, T) + Σ_j w_j · MSE(pool_{l_j}(Y), pool_{l_j}(T)) ] / (1 + Σ_j w_j),
    L_review = Σ_i HCL(Y_i, T_i)

with ``pool_l`` adaptive average pooling to l×l over the levels l ∈ (4, 2, 1) that are smaller than the map
(``l < H``), and weights halving from the full-resolution term: w = 1/2, 1/4, 1/8 for the levels kept, in order.
The total loss is ``ce_weight · CE + weight · min(1, epoch / warmup) · L_review``.

Defaults follow the official ImageNet R34→R18 recipe (github:dvlab-research/ReviewKD ImageNet/README.md and
ImageNet/models/reviewkd.py): mid_channel 512 (``build_review_kd('resnet18')``; mdistiller's ``min(512, C_last)``
gives the same), loss weight 1.0, CE weight 1.0, and no warm-up of the review loss: ``ImageNet/imagenet_amp.py``
l. 381-384 adds ``hcl(...) * review_kd_loss_weight`` at full weight from the first step (the commented-out lines
l. 542-547 of its ``adjust_learning_rate`` are a 5-epoch *learning-rate* warm-up, not a loss ramp). mdistiller's
ImageNet yaml sets WARMUP_EPOCHS 1 with epochs counted from 1, i.e. full weight from the start too; the CIFAR-100
recipes use a 20-epoch linear warm-up of the loss (``warmup_epochs``).

Which stage features are distilled (``[distill.options] taps``):

- ``"post_relu"`` (the default): each stage's output after its final ReLU, for student and teacher alike — what the
  authors' ImageNet code actually feeds. Its ResNet (``ImageNet/models/resnet.py``) means to return pre-ReLU
  features: the last block of a stage skips its ReLU (l. 74-75, ``is_last``) and ``_forward_impl`` keeps ``x1…x4``
  (l. 217-227, returned at l. 234). But it then applies ``self.relu`` — ``nn.ReLU(inplace=True)``, l. 155 — to each
  of them (``x2 = self.relu(x1)``, l. 218, and likewise l. 221, 224, 227), which overwrites the kept tensors in
  place: the features the ImageNet results were trained on are post-ReLU (the fifth, ``x5``, is the average pool of
  the ReLU'd last map either way). The teacher is the same file's ResNet-34 (``imagenet_amp.py`` l. 16, 271-273,
  380), so it is post-ReLU too.
- ``"pre_relu"``: the stage outputs before their final ReLU (``<stage>.<last block>.relu:in``), as that ResNet
  intends and as mdistiller's re-implementation truly computes (``mdistiller/distillers/ReviewKD.py`` l. 72-77 for
  the student with ``configs/imagenet/r34_r18/reviewkd.yaml`` ``STU_PREACT: True``, l. 89 for the teacher:
  ``preact_feats``; read in the copy of mdistiller at github:sunshangquan/logit-standardization-KD). Stages that
  do not end in such a block are tapped as they are.

``distill.student_layers`` / ``teacher_layers`` replace the stages in both cases (taken as given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gte.errors import GteError
from gte.methods.base import Method, Needs, at_least, option, register
from gte.methods.features import last_map, pooled, preactivation
from gte.models import info

MID_CHANNEL = 512
MAX_MID_CHANNEL = 512  # mdistiller: mid = min(512, channels of the deepest student feature)
REVIEWKD_WEIGHT = 1.0
CE_WEIGHT = 1.0
WARMUP_EPOCHS = 0.0
HCL_LEVELS = (4, 2, 1)


def _as_map(f: torch.Tensor) -> torch.Tensor:
    """A pooled N×C feature as the N×C×1×1 map the official code feeds (4-D features pass through)."""
    return f[:, :, None, None] if f.dim() == 2 else f


class _NearestUp(torch.autograd.Function):
    """Nearest upsampling by whole factors as a strided copy (the values of ``F.interpolate(mode="nearest")``, which
    was 3.5× slower on CPU here), with the backward kernel ``F.interpolate``'s autograd uses."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        n, c, h, w = t.shape
        kh, kw = size[0] // h, size[1] // w
        ctx.sizes = (list(size), list(t.shape))
        return t[:, :, :, None, :, None].expand(n, c, h, kh, w, kw).reshape(n, c, *size)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_size, in_size = ctx.sizes
        return torch.ops.aten.upsample_nearest2d_backward(g, out_size, in_size, None, None), None


def _nearest_up(t: torch.Tensor, size) -> torch.Tensor:
    """``t`` (N×C×h×w) nearest-upsampled to ``size`` (:class:`_NearestUp` for whole factors)."""
    size = tuple(size)
    if tuple(t.shape[-2:]) == size:
        return t
    if size[0] % t.shape[-2] or size[1] % t.shape[-1]:
        return F.interpolate(t, size, mode="nearest")
    return _NearestUp.apply(t, size)


class ABF(nn.Module):
    """Attention-based fusion of one stage: ``forward(x, residual)`` returns ``(Y_i, R_i)``."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False), nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        # two sigmoid gates, one per input, from both inputs (no softmax: the gates need not sum to 1)
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channel, 2, 1), nn.Sigmoid()) if fuse else None
        # as the official code: kaiming-uniform with a=1 (gain 1, a linear layer's init) on both convolutions
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` the student's stage feature, ``residual`` the deeper stage's fused ``R`` (required iff the module
        fuses), ``out_size`` the teacher's spatial size when it differs from the student's."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the deeper stage's residual")
            x = self.fuse(x, residual)
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")  # the CIFAR code's `out_shape`
        return self.conv2(x), x

    def fuse(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``R = σ(a₀)·x + σ(a₁)·up(R')`` with ``a = W·[x, up(R')] + b`` (the 1×1 ``att_conv``) and ``up`` nearest
        upsampling to x's size, as the official (which passes that size as ``shape``).

        Computed with ``W = [W_x, W_r]`` split over its two inputs, ``a = W_x·x + up(W_r·R') + b`` (``up`` copies
        pixels, so it commutes with a per-pixel map): no concatenated 2·mid-channel tensor, the residual's half at its
        own, lower resolution, and the 1×1 convolution with two output channels as an einsum. At R18's 56² stage
        (mid 512, batch 16, CPU fp32, 1 thread) oneDNN took 192 ms forward and 384 ms backward for that convolution
        on the concatenation (+117 ms for it), the einsum 140 ms in all; ``F.interpolate``'s nearest upsampling took
        280 ms, the copy of :class:`_NearestUp` 80 ms."""
        conv = self.att_conv[0]
        c = x.shape[1]
        w = conv.weight.flatten(1)
        a = torch.einsum("oc,nchw->nohw", w[:, :c], x)
        a = a + _nearest_up(torch.einsum("oc,nchw->nohw", w[:, c:], residual), x.shape[-2:])
        gates = torch.sigmoid(a + conv.bias[None, :, None, None])
        return (x * gates[:, :1]).addcmul_(_nearest_up(residual, x.shape[-2:]), gates[:, 1:])


class ReviewKDHeads(nn.Module):
    """The review path: one ABF per student stage; ``forward(feats)`` maps the student's stage features
    (shallow→deep) to features in the teacher's channels (and sizes), in the same order."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], mid_channel: int = MID_CHANNEL,
                 out_sizes: Sequence[tuple[int, int] | None] | None = None):
        super().__init__()
        if len(in_channels) != len(out_channels) or not in_channels:
            raise GteError(f"ReviewKD pairs student and teacher stages one to one: got {len(in_channels)} student "
                           f"and {len(out_channels)} teacher features")
        n = len(in_channels)
        self.out_sizes = list(out_sizes) if out_sizes is not None else [None] * n
        if len(self.out_sizes) != n:
            raise GteError(f"ReviewKD got {len(self.out_sizes)} output sizes for {n} stages")
        # abfs[i] serves stage i (shallow→deep); the deepest starts the review and fuses nothing
        self.abfs = nn.ModuleList(ABF(c_in, mid_channel, c_out, fuse=i < n - 1)
                                  for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.abfs):
            raise ValueError(f"expected {len(self.abfs)} student features, got {len(feats)}")
        outs, residual = [], None
        for i in reversed(range(len(feats))):  # the review runs deep→shallow
            out, residual = self.abfs[i](_as_map(feats[i]), residual, self.out_sizes[i])
            outs.append(out)
        return outs[::-1]

    @classmethod
    def for_features(cls, student_shapes: Sequence[Sequence[int]], teacher_shapes: Sequence[Sequence[int]],
                     mid_channel: int | None = None) -> ReviewKDHeads:
        """Heads for features of these shapes (``(N, C, H, W)``, or ``(N, C)`` for a pooled feature), e.g. from
        a dry forward through hooks. ``mid_channel`` defaults to ``min(512, C_last)`` (mdistiller's rule, 512 for
        ResNet-18). Output sizes follow the teacher's where they differ from the student's."""
        s_shapes = [tuple(s) if len(s) == 4 else (*s, 1, 1) for s in student_shapes]
        t_shapes = [tuple(t) if len(t) == 4 else (*t, 1, 1) for t in teacher_shapes]
        if len(s_shapes) != len(t_shapes):
            raise GteError(f"ReviewKD pairs student and teacher stages one to one: got {len(s_shapes)} student "
                           f"and {len(t_shapes)} teacher features")
        in_channels = [s[1] for s in s_shapes]
        out_sizes = [None if s[2:] == t[2:] else t[2:] for s, t in zip(s_shapes, t_shapes)]
        mid = min(MAX_MID_CHANNEL, in_channels[-1]) if mid_channel is None else mid_channel
        return cls(in_channels, [t[1] for t in t_shapes], mid, out_sizes)


def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
             levels: Sequence[int] = HCL_LEVELS) -> torch.Tensor:
    """Σ over stages of the hierarchical context loss (formula in the module docstring)."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"{len(student_feats)} student and {len(teacher_feats)} teacher features")
    terms = []
    for fs, ft in zip(student_feats, teacher_feats):
        fs, ft = _as_map(fs), _as_map(ft)
        if fs.shape != ft.shape:
            raise ValueError(f"student feature {tuple(fs.shape)} and teacher feature {tuple(ft.shape)} differ")
        loss, weight, weight_sum = F.mse_loss(fs, ft), 1.0, 1.0
        # the official loop keys on the height only (square maps); a level as large as the map adds nothing new
        for level in (lv for lv in levels if lv < fs.shape[2]):
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weight_sum += weight
        terms.append(loss / weight_sum)
    return torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------- the method
@dataclass
class ReviewKDOptions:
    """``[distill.options]`` of ``reviewkd`` (the official ImageNet R34 → R18 setting)."""

    weight: float = option(REVIEWKD_WEIGHT, at_least(0), ">= 0")
    # 0: min(512, deepest student C). The fusion's cost grows with it: at 224², R34 → R18, 512 costs 1.90× a KD step
    # on CPU, 256 (not the official setting; accuracy effect unmeasured) 1.55× (benchmarks/README.md)
    mid_channel: int = option(0, at_least(0), ">= 0 (0 = min(512, C_last))")
    # the review loss ramps linearly over these epochs (0 = full weight)
    warmup_epochs: float = option(WARMUP_EPOCHS, at_least(0), ">= 0 (0 = no warm-up)")
    # "post_relu": stage outputs (the authors' ImageNet code) | "pre_relu": before the final ReLU (mdistiller);
    # module docstring
    taps: str = option("post_relu", choices=("post_relu", "pre_relu"))


@register("reviewkd")
class ReviewKD(Method):
    """Knowledge review: the student's stage features (``taps``: after their final ReLU, or before it) and its pooled
    feature, fused deep → shallow by trainable ABF modules, matched to the teacher's at every stage with the
    hierarchical context loss."""

    needs = Needs(teacher=True, student_features="stages", teacher_features="stages", frozen=False)
    Options = ReviewKDOptions
    ce_default = CE_WEIGHT

    def __init__(self, cfg, student, teacher, **kw):
        super().__init__(cfg, student, teacher, **kw)
        if self.options.taps == "pre_relu":
            if not cfg.student_layers:
                self.student_layers = preactivation(student, self.student_layers)
            if not cfg.teacher_layers:
                self.teacher_layers = preactivation(teacher, self.teacher_layers)
        # the pooled feature is the global average of the deepest stage's output (after its ReLU), as the
        # classifier sees it
        for layers, mi in ((self.student_layers, self.student_info), (self.teacher_layers, info(teacher))):
            layers.append((last_map(mi) or layers[-1:])[0])
        s_shapes, t_shapes = self.feature_shapes()
        pooled_shape = [(2, s_shapes[-1][0])], [(2, t_shapes[-1][0])]
        self.parts = ReviewKDHeads.for_features([(2, *x) for x in s_shapes[:-1]] + pooled_shape[0],
                                                [(2, *x) for x in t_shapes[:-1]] + pooled_shape[1],
                                                self.options.mid_channel or None)

    def objective(self, batch, s, t):
        fs = [*s.features[:-1], pooled(s.features[-1])]
        ft = [*t.features[:-1], pooled(t.features[-1])]
        review = hcl_loss(self.parts(fs), ft)
        o = self.options
        ramp = min(1.0, batch.epoch / o.warmup_epochs) if o.warmup_epochs else 1.0
        logs = {"review": review.detach()}
        return self.with_labels(o.weight * ramp * review, logs, s.logits, batch.labels), logs
