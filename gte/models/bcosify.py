"""B-cosification (Arya, Rao, Böhle, Schiele, NeurIPS 2024, "B-cosification: Transforming Deep Neural Networks to be
Inherently Interpretable"; official code shrebox/B-cosification, Apache-2.0): a pretrained standard CNN becomes a
B-cos network — ``logit = Σ W(x)·x + logit bias`` exactly, W(x) its dynamic linear map — that a short fine-tune
brings back to the original's accuracy.

:func:`bcosify` does what the official conversion does (``bcosify.py``, ``bcos/experiments/ImageNet/bcosification/
{experiment_parameters,model}.py``; the layer rules and their citations in :mod:`gte.models.bcosify_layers`):

- input ``[x, 1 − x]`` normalised by mean ``(μ, 1 − μ)``, std ``(σ, σ)`` (``bcosify.py`` L15–16, L43) — gte's
  :func:`~gte.models.registry.to_model_input` does it for a model whose spec says ``bcosified``, so that W(x) is the
  input gradient of the model itself and completeness holds without a bias; the first 3-channel convolution reads
  the 6 channels with weight ``cat(W, −W)/2``;
- every convolution a B-cos convolution with the pretrained weight unnormalised (B = 2, MaxOut 1), every bias
  removed, BatchNorm uncentered, MaxPool → AvgPool, ReLU kept (ReLU6 → ReLU);
- the classifier as a 1×1 B-cos convolution *before* global average pooling (``bcos/models/standard_models.py``
  L36–63), logit bias ``−log(C − 1)`` (``bcosify.py`` L31; ``experiment_parameters.py`` L60).

The result is a :class:`BcosifiedNet` around the converted network (``.net``, its layers under their original
names) with the architecture name ``bcosify/<original arch>`` (``bcosify-b<B>/…`` for B ≠ 2): ``load_model`` rebuilds
it from a ``model.safetensors`` by building the original architecture and converting it again. Supported families:
torchvision and timm ResNets, DenseNets and VGGs, torchvision MobileNetV2, timm EfficientNets without
squeeze-excitation and SiLU (EfficientNet-Lite, MobileNetV2), gte's ``cifar_resnet*``; anything else is refused in
one line naming the model or layer type.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte.errors import GteError
from gte.models.bcosify_layers import KEEP, bcos_conv, convert_children, kind, refuse, six_channel_input
from gte.models.registry import DERIVED, Derived, ModelInfo, create, describe

PREFIX = "bcosify"
_NAME = re.compile(r"bcosify(?:-b([0-9]+(?:\.[0-9]+)?))?/(.+)")


def _tv_resnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _small_resnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.layer3(net.layer2(net.layer1(net.stem(x))))


def _tv_densenet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(net.features(x))


def _features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.features(x)


def _tv_vgg(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.avgpool(net.features(x))


def _timm(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_features(x)


def _timm_vgg(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.pre_logits(net.forward_features(x))


def _pooled_side(net: nn.Module) -> int:
    """torchvision VGG: the side of the map its first classifier layer reads flattened (``avgpool``'s output)."""
    size = net.avgpool.output_size
    return int(size if isinstance(size, int) else size[0])


@dataclass(frozen=True)
class Family:
    """How a supported model computes: its feature map before global pooling (activation applied), and its
    classifier (a Linear, or a Sequential of Linears, ReLUs and dropout) that runs on that map."""

    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: str
    flat_side: Callable[[nn.Module], int] = lambda net: 1  # the first classifier Linear reads a flattened side² map


FAMILIES: dict[str, Family] = {
    "torchvision.models.resnet.ResNet": Family(_tv_resnet, "fc"),
    "torchvision.models.densenet.DenseNet": Family(_tv_densenet, "classifier"),
    "torchvision.models.vgg.VGG": Family(_tv_vgg, "classifier", _pooled_side),
    "torchvision.models.mobilenetv2.MobileNetV2": Family(_features, "classifier"),
    "timm.models.resnet.ResNet": Family(_timm, "fc"),
    "timm.models.densenet.DenseNet": Family(_timm, "classifier"),
    "timm.models.vgg.VGG": Family(_timm_vgg, "head.fc"),
    "timm.models.efficientnet.EfficientNet": Family(_timm, "classifier"),
    "gte.models.small.SmallResNet": Family(_small_resnet, "fc"),
}


class BcosifiedNet(nn.Module):
    """A B-cosified network: ``mean_hw(head(features(z))) + logit_bias`` for the normalised ``[x, 1 − x]`` input z."""

    def __init__(self, net: nn.Module, family: str, num_classes: int) -> None:
        super().__init__()
        self.net, self.family = net, family
        self.logit_bias = -math.log(num_classes - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = FAMILIES[self.family]
        maps = self.net.get_submodule(f.head)(f.features(self.net, x))
        return maps.mean((2, 3)) + self.logit_bias


def arch_name(arch: str, b: float = 2.0) -> str:
    """The architecture name of ``arch`` B-cosified with exponent ``b``."""
    return f"{PREFIX}/{arch}" if b == 2 else f"{PREFIX}-b{b:g}/{arch}"


def parse(name: str) -> tuple[float, str]:
    """``bcosify[-b<B>]/<arch>`` → (B, arch)."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise GteError(f"unknown model '{name}': a B-cosified architecture is written bcosify/<arch> "
                       "(e.g. bcosify/resnet18, bcosify/timm/tf_efficientnet_lite0)")
    return float(m.group(1) or 2), m.group(2)


def _convert_head(net: nn.Module, family: Family, b: float, arch: str) -> tuple[str, Counter]:
    """The classifier's Linears as B-cos convolutions on the feature map (the first one k×k where it reads a
    flattened k×k map, the others 1×1), in place; returns the path of the last one (the per-class maps)."""
    head = net.get_submodule(family.head)
    counts: Counter = Counter()
    items = list(head.named_children()) if kind(head) == "torch.nn.modules.container.Sequential" else [("", head)]
    side, last = family.flat_side(net), ""
    for name, m in items:
        where = f"{family.head}.{name}" if name else family.head
        if kind(m) in KEEP:
            continue
        if kind(m) != "torch.nn.modules.linear.Linear":
            raise refuse(arch, where, m, ", a classifier layer type gte cannot B-cosify")
        counts["bias"] += m.bias is not None
        w = m.weight.detach()
        k = side if not last else 1
        conv = bcos_conv(w.reshape(w.shape[0], w.shape[1] // (k * k), k, k), b)
        if name:
            setattr(head, name, conv)
        else:
            parent, _, attr = family.head.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, conv)
        last = where
    if not last:
        raise GteError(f"cannot B-cosify {arch}: its classifier {family.head} has no Linear layer")
    return last, counts


def _info(mi: ModelInfo, head: str, b: float) -> ModelInfo:
    def under(path: str | None) -> str | None:
        return None if path is None else f"net.{path}"

    return dataclasses.replace(mi, arch=arch_name(mi.arch, b), bcos=True, bcosified=True, head=under(head),
                               gradcam_layer=under(mi.gradcam_layer), stages=tuple(under(s) for s in mi.stages),
                               token_prefix=None, map_nhwc=False, trained_explainer="")


def convert(model: nn.Module, *, b: float = 2.0) -> tuple[BcosifiedNet, list[str]]:
    """:func:`bcosify`, and what the conversion changed beyond the rules every B-cosification applies (``ReLU6 →
    ReLU ×35``, ``MaxPool2d → AvgPool2d ×1``, ``biases dropped ×N``), for the user to read."""
    mi = describe(model)
    if mi.bcos:
        raise GteError(f"{mi.arch} is a B-cos network already")
    if not b >= 1:
        raise GteError(f"B-cos exponent B = {b} must be at least 1")
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    family = FAMILIES.get(kind(inner))
    if family is None:
        raise refuse(mi.arch, "the model", inner, ", a model type gte cannot B-cosify", "ResNets, DenseNets, VGGs, "
                     "MobileNetV2 and EfficientNet-Lite (torchvision, timm, gte's cifar_resnet*)")
    net = copy.deepcopy(inner)
    net.__dict__.pop("gte_info", None)
    six_channel_input(net, mi.arch)
    head, counts = _convert_head(net, family, b, mi.arch)
    convert_children(net, b, mi.arch, skip=family.head, counts=counts)
    out = BcosifiedNet(net, kind(inner), mi.num_classes).train(inner.training).requires_grad_(True)  # to fine-tune
    out.gte_info = _info(mi, head, b)
    changes = [f"{k} → {'ReLU' if k == 'ReLU6' else 'AvgPool2d' if k == 'MaxPool2d' else 'B-cos'} ×{n}"
               for k, n in sorted(counts.items()) if k in ("ReLU6", "MaxPool2d")]
    if counts["bias"]:
        changes.append(f"biases dropped ×{counts['bias']}")
    return out, changes


def bcosify(model: nn.Module, *, b: float = 2.0) -> BcosifiedNet:
    """A B-cos copy of ``model`` (a gte model, or a timm model; the original is left as it is), carrying its spec:
    B-cos, explained by W(x), the original's mean/std (now of the ``[x, 1 − x]`` input), geometry and class names.
    ``b``: the B-cos exponent (2 as the paper; 1 keeps each layer linear — the original function up to the removed
    biases, the uncentered norms and the pooling). A one-line :class:`GteError` for a model or layer gte cannot
    convert."""
    return convert(model, b=b)[0]


def _inner_arch(name: str) -> str:
    return parse(name)[1]


def _build(name: str, num_classes: int) -> nn.Module:
    b, arch = parse(name)
    return bcosify(create(arch, num_classes), b=b)


DERIVED[PREFIX] = Derived(_inner_arch, _build, bcos=True)

__all__ = ["FAMILIES", "PREFIX", "BcosifiedNet", "arch_name", "bcosify", "convert", "parse"]
