"""The layer rules of B-cosification (:mod:`gte.models.bcosify`): each layer of a pretrained standard CNN → its B-cos
form, the pretrained weights kept as they are. Written from the official code (shrebox/B-cosification, commit
de03a03; cited by file and line):

- **Convolution** → a bcos ``BcosConv2d`` whose ``linear`` is a plain ``nn.Conv2d`` holding the pretrained weight
  *unnormalised*, bias dropped, MaxOut 1 (``bcos/modules/bcosifyconv2d.py`` L18–31, ``from_standard_module``
  L116–148; ``bcosify.py`` L90–92; biases removed in ``bcos/experiments/ImageNet/bcosification/model.py`` L51–55).
  With ``a = w·x`` its output is ``a·|a|/‖x‖`` for B = 2 (``bcosifyconv2d.py`` L68–101: the dynamic scale is
  ``|a|/‖x‖``, i.e. ``‖w‖·|cos(x, w)|`` — the weight norm is not divided out), ``a·(|a|/‖x‖ + 1e-6)^(B−1)`` otherwise,
  and ``a`` for B = 1. ``‖x‖`` is the input patch norm ``√(Σ_patch x² + 1e-6)`` over the convolution's channel group
  (``bcos/modules/bcosconv2d.py`` L196–231: an average pool of x² with ``divisor_override=1``; bcos 0.1.3's
  ``calc_patch_norms`` multiplies the mean by the patch size instead, the same sum). Using bcos' own ``BcosConv2d``
  type makes the layer a first-class B-cos layer everywhere gte handles one: the bcos explanation mode, and
  :mod:`gte.onepass`'s gated forward, whose ``BcosScale2`` computes exactly ``a·|a|/n`` from ``a = linear(x)``.
- **Linear classifier** → the same with a 1×1 kernel (``bcosifyconv2d.py`` L150–182), run *before* global average
  pooling (``bcos/models/standard_models.py`` L36–63); a VGG's first classifier layer, which reads a flattened k×k
  map, becomes the equivalent k×k convolution (the official code has no VGG; its ``BcosifyLinear`` would take the
  norm as ``‖x‖ + 1e-12``, a convolution's is ``√(‖x‖² + 1e-6)``).
- **BatchNorm** → bcos' ``BatchNormUncentered2d`` (``batchnorm_uncentered.py`` L21–60: ``γ·x/√(var + ε)`` with no mean
  subtraction — the batch variance in training, ``running_var`` in eval) with the pretrained ``γ``, ``running_var``,
  ``eps`` and momentum; ``β`` and the running mean's shift are dropped (``from_standard_module`` L117–141 folds them
  into a bias, which ``model.py`` L51–55 then removes).
- **MaxPool** → ``AvgPool2d`` of the same geometry (the official configs: ResNet ``maxpool`` and DenseNet
  ``features[3]``, both (3, 2, 1) — ``experiment_parameters.py`` L99, L124). **ReLU** kept (``bcosify.py`` L110–114);
  **ReLU6** → ReLU (its saturation at 6 is an offset a bias-free network cannot have; not in the paper).

Anything else is refused in one line naming the layer and its type: SiLU, squeeze-excitation gates, LayerNorm,
attention, … have no bias-free, positively homogeneous form, and an unknown container may compute anything.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn as nn

from gte.errors import GteError


def kind(m: nn.Module) -> str:
    """A module's type by its full name (no import of the libraries that define it)."""
    return f"{type(m).__module__}.{type(m).__qualname__}"


# layers whose forward is (piecewise) linear, bias-free and positively homogeneous: kept as they are
KEEP = frozenset({
    "torch.nn.modules.activation.ReLU", "torch.nn.modules.linear.Identity", "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.pooling.AvgPool2d", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.flatten.Flatten", "timm.layers.drop.DropPath",
})
# containers whose own forward only composes their children with sums, concatenations and the above (read in their
# libraries' source): their children are converted one by one
CONTAINERS = frozenset({
    "torch.nn.modules.container.Sequential",
    "torchvision.models.resnet.BasicBlock", "torchvision.models.resnet.Bottleneck",
    "torchvision.models.densenet._DenseLayer", "torchvision.models.densenet._DenseBlock",
    "torchvision.models.densenet._Transition", "torchvision.ops.misc.Conv2dNormActivation",
    "torchvision.models.mobilenetv2.InvertedResidual",
    "timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck",
    "timm.models.densenet.DenseLayer", "timm.models.densenet.DenseBlock", "timm.models.densenet.DenseTransition",
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv", "timm.models._efficientnet_blocks.InvertedResidual",
    "timm.models.vgg.ConvMlp", "timm.layers.classifier.ClassifierHead",
    "timm.layers.adaptive_avgmax_pool.SelectAdaptivePool2d",
})
NOTED = frozenset({"torch.nn.modules.activation.ReLU6", "torch.nn.modules.pooling.MaxPool2d"})  # changes reported
CONV = "torch.nn.modules.conv.Conv2d"
CONV_SAME = "timm.layers.conv2d_same.Conv2dSame"
WHAT_GTE_CONVERTS = ("Conv2d, Linear classifiers, BatchNorm2d, ReLU/ReLU6, max/average pooling, dropout")


def refuse(arch: str, where: str, m: nn.Module, why: str = ", a layer type gte cannot B-cosify",
           known: str = WHAT_GTE_CONVERTS) -> GteError:
    """The one-line refusal: which layer (``where``), its type, why, and what gte converts."""
    return GteError(f"cannot B-cosify {arch}: {where} is a {type(m).__name__}{why}; it converts {known}")


def bcos_conv(weight: torch.Tensor, b: float, stride=1, padding=0, dilation=1, groups: int = 1) -> nn.Module:
    """A bcos ``BcosConv2d`` computing with ``weight`` (O×I/groups×k×k) as it is, no bias, MaxOut 1."""
    from bcos.modules.bcosconv2d import BcosConv2d

    out_ch, in_ch = weight.shape[0], weight.shape[1] * groups
    kernel = tuple(weight.shape[2:])
    dilation = dilation if isinstance(dilation, int) else max(dilation)  # bcos 0.1.3 compares it with 1 (square)
    with torch.device("meta"):  # the unit-norm convolution BcosConv2d makes is replaced: no initialisation
        m = BcosConv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, b=b, max_out=1)
        linear = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=False)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    m.linear = linear
    return m


class SamePad(nn.Module):
    """TensorFlow's "SAME" zero padding (timm's ``Conv2dSame``: asymmetric, from the input size), in front of the
    B-cos convolution, so that its patch norms see the padded input as the convolution does."""

    def __init__(self, kernel_size: tuple, stride: tuple, dilation: tuple) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = list(kernel_size), list(stride), list(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers.padding import pad_same

        return pad_same(x, self.kernel_size, self.stride, self.dilation)


def _conv(m: nn.Conv2d, b: float, where: str, arch: str) -> nn.Module:
    if m.padding_mode != "zeros":
        raise refuse(arch, where, m, f" with padding_mode {m.padding_mode!r} (B-cos patch norms assume zero padding)")
    padding = m.padding
    if len(set(m.dilation)) > 1:
        raise refuse(arch, where, m, f" with dilation {m.dilation} (bcos convolutions take one dilation)")
    if isinstance(padding, str):  # torch's "same"/"valid": symmetric for stride 1, which is all torch allows
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
        if m.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(m.kernel_size, m.dilation)):
            raise refuse(arch, where, m, " with asymmetric 'same' padding")
    return bcos_conv(m.weight, b, m.stride, padding, m.dilation, m.groups)


def _conv_same(m: nn.Conv2d, b: float, where: str, arch: str) -> nn.Module:
    return nn.Sequential(SamePad(m.kernel_size, m.stride, m.dilation),
                         bcos_conv(m.weight, b, m.stride, 0, m.dilation, m.groups))


def uncentered(bn: nn.BatchNorm2d) -> nn.Module:
    """bcos' ``BatchNormUncentered2d`` with ``bn``'s γ, running statistics, ε and momentum; no bias."""
    from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import BatchNormUncentered2d

    with torch.device("meta"):
        new = BatchNormUncentered2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.bias = None
    new.weight = bn.weight  # a Parameter or None; the model converted is a copy, nothing is shared with the original
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    return new


def _relu6(m: nn.ReLU6, b: float, where: str, arch: str) -> nn.Module:
    return nn.ReLU(inplace=m.inplace)


def activation(m: nn.Module, where: str, arch: str) -> nn.Module:
    """ReLU and Identity as they are, ReLU6 → ReLU; anything else refused."""
    k = kind(m)
    if k == "torch.nn.modules.activation.ReLU6":
        return nn.ReLU(inplace=m.inplace)
    if k in ("torch.nn.modules.activation.ReLU", "torch.nn.modules.linear.Identity"):
        return m
    raise refuse(arch, where, m)


def _bn_act(m: nn.Module, b: float, where: str, arch: str) -> nn.Module:
    """timm's ``BatchNormAct2d`` (batch norm, dropout, activation in one module)."""
    if kind(m.drop) not in KEEP:
        raise refuse(arch, f"{where}.drop", m.drop)
    return nn.Sequential(uncentered(m), activation(m.act, f"{where}.act", arch))


def _max_pool(m: nn.MaxPool2d, b: float, where: str, arch: str) -> nn.Module:
    if m.return_indices or any(d != 1 for d in ((m.dilation,) if isinstance(m.dilation, int) else m.dilation)):
        raise refuse(arch, where, m, " with dilation or returned indices")
    return nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)


# module type → its B-cos form (module, b, where, arch)
CONVERT: dict[str, Callable[[nn.Module, float, str, str], nn.Module]] = {
    CONV: _conv,
    CONV_SAME: _conv_same,
    "torch.nn.modules.batchnorm.BatchNorm2d": lambda m, b, where, arch: uncentered(m),
    "timm.layers.norm_act.BatchNormAct2d": _bn_act,
    "torch.nn.modules.activation.ReLU6": _relu6,
    "torch.nn.modules.pooling.MaxPool2d": _max_pool,
}


def convert_children(module: nn.Module, b: float, arch: str, path: str = "", skip: str = "",
                     counts: Counter | None = None) -> Counter:
    """Replace every layer under ``module`` by its B-cos form, in place (``skip``: a path already converted);
    returns what was replaced (by kind), and the biases dropped."""
    counts = Counter() if counts is None else counts
    for name, child in list(module.named_children()):
        where = f"{path}.{name}" if path else name
        k = kind(child)
        if where == skip or k in KEEP:
            continue
        if k in CONVERT:
            counts["bias"] += getattr(child, "bias", None) is not None
            counts.update(type(m).__name__ for m in child.modules() if kind(m) in NOTED)
            setattr(module, name, CONVERT[k](child, b, where, arch))
        elif k in CONTAINERS and next(child.parameters(recurse=False), None) is None:
            convert_children(child, b, arch, where, skip, counts)
        else:
            raise refuse(arch, where, child)
    return counts


def six_channel_input(net: nn.Module, arch: str) -> None:
    """The first convolution reading 3 channels reads ``[x, 1 − x]``: weight ``cat(W, −W)/2`` (``bcosify.py``
    L55–72), which on the normalised ``(x − μ)/σ`` and ``−(x − μ)/σ`` computes the original ``W(x − μ)/σ``."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1:
            with torch.no_grad():
                m.weight = nn.Parameter(torch.cat([m.weight, -m.weight], dim=1) / 2)
            m.in_channels = 6
            return
    raise GteError(f"cannot B-cosify {arch}: it has no convolution reading the 3 image channels")
