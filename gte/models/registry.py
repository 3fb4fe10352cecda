"""Model specs and builders: every architecture gte can build, with what gte needs to know about it.

Every model built here carries a :class:`ModelInfo` as ``model.gte_info``: whether it is a B-cos network (6-channel
``[x, 1-x]`` input, explained by its dynamic linear weights W(x)) or a standard one (mean/std input, explained by
GradCAM at ``gradcam_layer``). Data pipelines hand models images in [0, 1]; :func:`to_model_input` applies the spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from gte.errors import GteError
from gte.models import external
from gte.models.small import SmallResNet
from gte.models.spec_values import checked_values
from gte.text import clean_name, shorten

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def own_explainer(bcos: bool) -> str:
    """W(x) for a B-cos network, GradCAM for any other."""
    return "bcos" if bcos else "gradcam"


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of gte needs to know about a model."""

    arch: str
    num_classes: int
    bcos: bool
    gradcam_layer: str | None  # dotted module path of the last conv stage, None where GradCAM makes no sense
    stages: tuple[str, ...] = ()  # modules whose outputs are the stage feature maps, shallow → deep (feature KD)
    head: str | None = None  # the classifier module (a Linear, or a B-cos 1×1 conv giving per-class maps)
    token_prefix: int | None = None  # token models (ViT): class/register tokens before the patch grid at gradcam_layer
    map_nhwc: bool = False  # the gradcam_layer's map is channels-last, N×H×W×C (timm Swin)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224  # the square side it was trained / released at (eval crop, `gte explain`)
    crop_pct: float = 0.875  # eval: short side resized to input_size / crop_pct, then the centre crop
    interpolation: str = "bilinear"  # of that resize (and of a teacher's own resize in training)
    fixed_input_size: bool = False  # runs at input_size only (ViT position embeddings)
    class_names: tuple[str, ...] = ()  # when known: the training data's, or the release's
    trained_explainer: str = ""  # the explainer e2KD trained it with ("" = none): what `gte eval` compares by default
    # a B-cosified standard network (gte.models.bcosify): its [x, 1-x] input normalised by (mean, 1-mean) / (std, std)
    bcosified: bool = False

    def __post_init__(self) -> None:
        # names come from files (metadata, --classes, a Hub repo): kept as shown, bounded and without controls
        names = tuple(clean_name(n) if isinstance(n, str) else n for n in self.class_names)
        object.__setattr__(self, "class_names", names)

    @property
    def eval_resize(self) -> int:
        """The eval resize (short side) before the centre crop."""
        return round(self.input_size / self.crop_pct)

    @property
    def in_channels(self) -> int:
        return 6 if self.bcos else 3

    @property
    def explainer(self) -> str:
        """The model's own explainer (what ``distill.explainer = "auto"`` means for it)."""
        return own_explainer(self.bcos)


def info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of a model built by gte (unwrapping DDP/compile wrappers)."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if m is not None and hasattr(m, "gte_info"):
            return m.gte_info
    raise GteError("this model was not built by gte.models.build_model (it has no gte_info)")


def to_model_input(model_info: ModelInfo, x: torch.Tensor, size: int = 0) -> torch.Tensor:
    """Images in [0, 1] (N×3×H×W) → the model's input: ``[x, 1-x]`` for B-cos (a B-cosified network's normalised by
    ``(mean, 1-mean) / (std, std)``), mean/std-normalised otherwise;
    ``size``: first resized to size² with the model's own interpolation (a teacher at its own side, :func:`run_size`)."""
    x = resized(x, size, model_info.interpolation)
    mean, std = model_info.mean, model_info.std
    if model_info.bcos:
        x = torch.cat([x, 1.0 - x], dim=1)
        if not model_info.bcosified:
            return x
        mean, std = mean + tuple(1.0 - m for m in mean), std + std
    c = x.shape[1]
    return (x - torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, c, 1, 1)) / \
        torch.tensor(std, device=x.device, dtype=x.dtype).view(1, c, 1, 1)


def resized(images: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """``images`` (N×3×H×W in [0, 1]) resized to size² (antialiased when shrinking), or as they are for size 0."""
    if not size or images.shape[-2:] == (size, size):
        return images
    mode = interpolation if interpolation in ("bilinear", "bicubic") else "nearest"
    out = torch.nn.functional.interpolate(images, size=(size, size), mode=mode, antialias=mode != "nearest",
                                          **({} if mode == "nearest" else {"align_corners": False}))
    return out.clamp(0.0, 1.0)  # bicubic overshoots


def run_size(model_info: ModelInfo, asked: int, size: int) -> int:
    """The side a model sees images of side ``size`` at: ``asked``, else its spec's size when it runs at that size
    only (ViT), else 0 (as they are); 0 too when that is ``size`` itself."""
    side = asked or (model_info.input_size if model_info.fixed_input_size else 0)
    return 0 if side == size else side


def at_size(maps: torch.Tensor, hw: tuple[int, ...]) -> torch.Tensor:
    """Explanation maps (N×C×h×w) of a model run at its own side, bilinearly resized to the images' ``hw``."""
    if tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    return torch.nn.functional.interpolate(maps.float(), size=tuple(hw), mode="bilinear",
                                           align_corners=False).to(maps.dtype)


# --------------------------------------------------------------------------------------------- builders
def _bcos_imagenet(entry: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import bcos.models.pretrained as pretrained

        # The `pretrained.` entry points carry the released configuration (BatchNormUncentered, B=2, logit bias).
        return getattr(pretrained, entry)(pretrained=False, progress=False, num_classes=num_classes)

    return build


def _bcos_cifar(depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from bcos.models import resnet
        from bcos.modules import norms

        # The CIFAR config's Identity norm does not learn on small tasks; the ImageNet norm (uncentered BN, no bias) does.
        norm = norms.NoBias(norms.BatchNormUncentered2d)
        return getattr(resnet, f"cifar10_resnet{depth}")(num_classes=num_classes, norm_layer=norm)

    return build


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


class Arch(NamedTuple):
    """A registered architecture: its builder and what gte needs to know about it (see :class:`ModelInfo`)."""

    builder: Callable[[int], nn.Module]
    bcos: bool
    gradcam_layer: str | None
    stages: tuple[str, ...]
    head: str | None
    input_size: int = 224  # the side its data has (CIFAR-style networks: 32)


_R4 = ("layer1", "layer2", "layer3", "layer4")
_R3 = ("layer1", "layer2", "layer3")
_DENSE = ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.norm5")

REGISTRY: dict[str, Arch] = {
    "bcos_resnet18": Arch(_bcos_imagenet("resnet18"), True, "layer4", _R4, "fc"),
    "bcos_resnet34": Arch(_bcos_imagenet("resnet34"), True, "layer4", _R4, "fc"),
    "bcos_resnet50": Arch(_bcos_imagenet("resnet50"), True, "layer4", _R4, "fc"),
    "bcos_densenet121": Arch(_bcos_imagenet("densenet121"), True, "features", _DENSE, "classifier"),
    "bcos_densenet169": Arch(_bcos_imagenet("densenet169"), True, "features", _DENSE, "classifier"),
    "bcos_vit_ti_patch16_224": Arch(_bcos_imagenet("simple_vit_ti_patch16_224"), True, None, (), None),
    "bcos_cifar_resnet20": Arch(_bcos_cifar(20), True, "layer3", _R3, "fc", 32),
    "bcos_cifar_resnet56": Arch(_bcos_cifar(56), True, "layer3", _R3, "fc", 32),
    "resnet18": Arch(_torchvision("resnet18"), False, "layer4", _R4, "fc"),
    "resnet34": Arch(_torchvision("resnet34"), False, "layer4", _R4, "fc"),
    "resnet50": Arch(_torchvision("resnet50"), False, "layer4", _R4, "fc"),
    "cifar_resnet20": Arch(lambda c: SmallResNet(20, c), False, "layer3", _R3, "fc", 32),
    "cifar_resnet56": Arch(lambda c: SmallResNet(56, c), False, "layer3", _R3, "fc", 32),
}


class Derived(NamedTuple):
    """Architectures built from another one by name, ``<prefix>/<arch>`` (``bcosify/resnet18``, registered in
    :data:`DERIVED` by their module: :mod:`gte.models.bcosify`)."""

    inner: Callable[[str], str]  # the architecture a name is built from (a one-line error for a malformed name)
    build: Callable[[str, int], nn.Module]  # (name, num_classes) → the model, carrying its gte_info
    bcos: bool


DERIVED: dict[str, Derived] = {}


def derived(name: str) -> Derived | None:
    """The :class:`Derived` entry ``name`` is built by (its prefix before ``/``, up to a ``-`` option), or None."""
    prefix, sep, _ = name.partition("/")
    return DERIVED.get(prefix.partition("-")[0]) if sep else None


def external_info(arch: str, num_classes: int, facts: external.Facts) -> ModelInfo:
    """The :class:`ModelInfo` of a timm / torchvision model from what :mod:`gte.models.external` read off it."""
    names = facts.class_names if len(facts.class_names) == num_classes else ()
    return ModelInfo(arch=arch, num_classes=num_classes, bcos=False, gradcam_layer=facts.gradcam_layer,
                     stages=facts.stages, head=facts.head, mean=facts.mean, std=facts.std,
                     token_prefix=facts.token_prefix, map_nhwc=facts.map_nhwc, class_names=names, **facts.geometry)


def check_arch(name: str) -> None:
    """Raise a one-line error naming close matches (gte's names, ``timm/…``, ``torchvision/…``) if ``name`` is not
    a known architecture."""
    d = derived(name)
    if d is not None:
        check_arch(d.inner(name))
        return
    if external.is_external(name):
        if not external.known(name):
            close = external.close_matches(name)
            raise GteError(f"unknown model '{name}'" + (f"; did you mean {', '.join(close[:3])}?" if close else ""))
        return
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5) + external.close_matches(name)[:2]
        hint = (f"; did you mean {', '.join(close)}?" if close else
                f"; known: {', '.join(sorted(REGISTRY))}, timm/<name>, torchvision/<name>")
        raise GteError(f"unknown model '{name}'{hint}")


def is_bcos(name: str) -> bool:
    """Whether architecture ``name`` is a B-cos network (without building it; external models never are)."""
    d = derived(name)
    return d.bcos if d is not None else name in REGISTRY and REGISTRY[name].bcos


def create(name: str, num_classes: int) -> nn.Module:
    """Architecture ``name`` with a ``num_classes``-way head, randomly initialised, carrying its ``gte_info``."""
    check_arch(name)
    if num_classes < 2:
        raise GteError(f"num_classes must be at least 2, got {num_classes}")
    d = derived(name)
    if d is not None:
        return d.build(name, num_classes)
    if external.is_external(name):
        model, facts = external.build(name, num_classes)
        model.gte_info = external_info(name, num_classes, facts)
        return model
    arch = REGISTRY[name]
    model = arch.builder(num_classes)
    if arch.bcos:
        from bcos.modules import LogitLayer

        # B-cos heads are trained with BCE; a prior of 1/C per class means a logit bias of -ln(C-1).
        for m in model.modules():
            if isinstance(m, LogitLayer):
                m.logit_bias = -math.log(num_classes - 1)
    model.gte_info = ModelInfo(arch=name, num_classes=num_classes, bcos=arch.bcos, gradcam_layer=arch.gradcam_layer,
                               stages=arch.stages, head=arch.head, input_size=arch.input_size)
    return model


SPEC_KEYS = ("input_size", "crop_pct", "interpolation", "fixed_input_size", "mean", "std", "gradcam_layer",
             "class_names", "trained_explainer")  # what a model.safetensors may set on the architecture's own facts


def with_spec(model: nn.Module, **changes) -> nn.Module:
    """Set spec fields (:data:`SPEC_KEYS`) on a gte model's :class:`ModelInfo`, checked
    (:func:`~gte.models.spec_values.checked_values`, and: a layer that does not exist, a class list of another
    length): a one-line error naming the key."""
    mi = info(model)
    unknown = sorted(set(changes) - set(SPEC_KEYS))
    if unknown:
        raise GteError(f"not a model spec field: {', '.join(unknown)} (known: {', '.join(SPEC_KEYS)})")
    c = checked_values(f"{mi.arch}: ", changes, mi.input_size, mi.crop_pct)
    if "trained_explainer" in c and c["trained_explainer"] not in ("", "bcos", "gradcam"):
        raise GteError(f"{mi.arch}: trained_explainer {shorten(repr(c['trained_explainer']))} is not an explainer")
    if c.get("class_names") and len(c["class_names"]) != mi.num_classes:
        raise GteError(f"{mi.arch}: {len(c['class_names'])} class names for {mi.num_classes} classes")
    if "gradcam_layer" in c:
        layer = c["gradcam_layer"]
        if not isinstance(layer, str) or not external.has_module(model, layer):
            close = difflib.get_close_matches(str(layer), [n for n, _ in model.named_modules() if n], n=3, cutoff=0.6)
            raise GteError(f"{mi.arch} has no layer {shorten(repr(layer))} to explain at (gradcam_layer)"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
    model.gte_info = dataclasses.replace(mi, **c)
    return model


def describe(model: nn.Module, arch: str | None = None) -> ModelInfo:
    """The :class:`ModelInfo` of a classifier built outside gte (``timm.create_model``, torchvision), attached as
    ``model.gte_info`` so every gte function takes it; a model that has one keeps it. ``arch`` defaults to
    ``timm/<architecture>`` from timm's ``pretrained_cfg`` (torchvision models must name it)."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    if hasattr(inner, "gte_info"):
        return inner.gte_info
    cfg = getattr(inner, "pretrained_cfg", None) or {}
    if arch is None:
        if "architecture" not in cfg:
            raise GteError(f"{type(inner).__name__} is not a timm model: describe(model, arch=...) needs its name")
        arch = external.TIMM + cfg["architecture"]
    num_classes = getattr(inner, "num_classes", None)
    if not isinstance(num_classes, int):  # torchvision: the classifier's width
        fc = getattr(inner, "fc", None)
        num_classes = fc.out_features if isinstance(fc, nn.Linear) else None
    if not num_classes or num_classes < 2:
        raise GteError(f"cannot tell how many classes {arch} has (a classifier with num_classes >= 2 is needed)")
    inner.gte_info = external_info(arch, num_classes, external.facts(inner, arch))
    return inner.gte_info


def freeze(model: nn.Module) -> nn.Module:
    """Make ``model`` a teacher: eval mode and no parameter gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    """``model.get_submodule`` that also looks through DDP/compile wrappers."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    return inner.get_submodule(dotted)
