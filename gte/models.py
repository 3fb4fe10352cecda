"""Model zoo: B-cos and standard classifiers with what gte needs to know about each.

Every model built here carries a :class:`ModelInfo` as ``model.gte_info``: whether it is a B-cos network (6-channel
``[x, 1-x]`` input, explained by its dynamic linear weights W(x)) or a standard one (mean/std input, explained by
GradCAM at ``gradcam_layer``). Data pipelines hand models images in [0, 1]; :func:`to_model_input` applies the spec.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from gte import __version__
from gte.errors import GteError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of gte needs to know about a model."""

    arch: str
    num_classes: int
    bcos: bool
    gradcam_layer: str | None  # dotted module path of the last conv stage, None where GradCAM makes no sense
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def in_channels(self) -> int:
        return 6 if self.bcos else 3

    @property
    def explainer(self) -> str:
        """The explainer e2KD uses for this model by default."""
        return "bcos" if self.bcos else "gradcam"


def info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of a model built by gte (unwrapping DDP/compile wrappers)."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if m is not None and hasattr(m, "gte_info"):
            return m.gte_info
    raise GteError("this model was not built by gte.models.build_model (it has no gte_info)")


def to_model_input(model_info: ModelInfo, x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (N×3×H×W) → the model's input: ``[x, 1-x]`` for B-cos, mean/std-normalised otherwise."""
    if model_info.bcos:
        return torch.cat([x, 1.0 - x], dim=1)
    mean = torch.tensor(model_info.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(model_info.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


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


class SmallResNet(nn.Module):
    """A standard (non-B-cos) CIFAR-style ResNet (3 stages of torchvision BasicBlocks, 16/32/64 wide) for 32–64 px."""

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages, inplanes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(inplanes, planes, stride, down))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# name -> (builder, is_bcos, gradcam layer)
REGISTRY: dict[str, tuple[Callable[[int], nn.Module], bool, str | None]] = {
    "bcos_resnet18": (_bcos_imagenet("resnet18"), True, "layer4"),
    "bcos_resnet34": (_bcos_imagenet("resnet34"), True, "layer4"),
    "bcos_resnet50": (_bcos_imagenet("resnet50"), True, "layer4"),
    "bcos_densenet121": (_bcos_imagenet("densenet121"), True, "features"),
    "bcos_densenet169": (_bcos_imagenet("densenet169"), True, "features"),
    "bcos_vit_ti_patch16_224": (_bcos_imagenet("simple_vit_ti_patch16_224"), True, None),
    "bcos_cifar_resnet20": (_bcos_cifar(20), True, "layer3"),
    "bcos_cifar_resnet56": (_bcos_cifar(56), True, "layer3"),
    "resnet18": (_torchvision("resnet18"), False, "layer4"),
    "resnet34": (_torchvision("resnet34"), False, "layer4"),
    "resnet50": (_torchvision("resnet50"), False, "layer4"),
    "cifar_resnet20": (lambda c: SmallResNet(20, c), False, "layer3"),
    "cifar_resnet56": (lambda c: SmallResNet(56, c), False, "layer3"),
}


def check_arch(name: str) -> None:
    """Raise a one-line error naming close matches if ``name`` is not a known architecture."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(REGISTRY))}"
        raise GteError(f"unknown model '{name}'{hint}")


def build_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build architecture ``name`` with a ``num_classes``-way head; optionally load ``weights`` (a file path)."""
    check_arch(name)
    if num_classes < 2:
        raise GteError(f"num_classes must be at least 2, got {num_classes}")
    builder, is_bcos, cam_layer = REGISTRY[name]
    model = builder(num_classes)
    if is_bcos:
        from bcos.modules import LogitLayer

        # B-cos heads are trained with BCE; a prior of 1/C per class means a logit bias of -ln(C-1).
        for m in model.modules():
            if isinstance(m, LogitLayer):
                m.logit_bias = -math.log(num_classes - 1)
    model.gte_info = ModelInfo(arch=name, num_classes=num_classes, bcos=is_bcos, gradcam_layer=cam_layer)
    if weights is not None:
        from gte.teachers import resolve

        # A teacher catalog name (weights="bcos_resnet34") means its cached download; an existing file path wins.
        load_weights(model, weights if Path(weights).exists() else (resolve(weights) or weights))
    return model


# --------------------------------------------------------------------------------------------- weights
def _clean_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": …}`` / ``{"state_dict": …}`` checkpoints and strip DDP/compile prefixes."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GteError(f"{source}: not a state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and string metadata from ``.safetensors`` or a ``.pth``/``.pt`` (never unpickling code)."""
    p = Path(path)
    if not p.is_file():
        raise GteError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise GteError(f"{p}: not a readable safetensors file ({e})") from None
        return _clean_state_dict(tensors, str(p)), meta
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GteError(f"{p}: cannot be loaded as a weights-only torch checkpoint ({type(e).__name__})") from None
    return _clean_state_dict(obj, str(p)), {}


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a released B-cos v2 / torchvision / gte state dict into ``model`` (strict, shapes checked)."""
    _load_state(model, *read_state_dict(path), path)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, str], path: object) -> None:
    mi = info(model)
    if "num_classes" in meta and int(meta["num_classes"]) != mi.num_classes:
        raise GteError(f"{path}: has {meta['num_classes']} classes, the model {mi.num_classes}")
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise GteError(f"{path}: does not fit {mi.arch}: {k} is {tuple(state[k].shape)}, the model's "
                       f"{tuple(own[k].shape)} (a different number of classes?)")
    result = model.load_state_dict(state, strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise GteError(f"{path}: does not fit {mi.arch} ({len(result.missing_keys)} missing, "
                       f"{len(result.unexpected_keys)} unexpected keys, e.g. {problems[0]})")


def model_metadata(model: nn.Module, **extra: str) -> dict[str, str]:
    """The string metadata gte writes into every ``model.safetensors``."""
    mi = info(model)
    meta = {"format": "gte", "gte_version": __version__, "arch": mi.arch, "num_classes": str(mi.num_classes),
            "input_spec": json.dumps(asdict(mi))}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_model(model: nn.Module, path: str | os.PathLike, **extra: str) -> None:
    """Write the model's weights as safetensors with metadata, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=model_metadata(model, **extra))
    os.replace(tmp, path)


def load_model(path_or_name: str, arch: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Build and load a model from a gte ``.safetensors`` (self-describing), a ``.pth`` given ``arch``, or a teacher
    catalog name that ``gte fetch-teachers`` has cached."""
    from gte.teachers import resolve

    p = Path(path_or_name)
    if not p.exists():
        p = resolve(path_or_name) or p  # GteError for a catalog name that is not downloaded
    if not p.exists():
        raise GteError(f"model not found: {path_or_name} (expected a .safetensors/.pth file or a teacher name)")
    state, meta = read_state_dict(p)
    arch = arch or meta.get("arch")
    if arch is None:
        raise GteError(f"{p}: the architecture is unknown; pass --arch")
    num_classes = num_classes or (int(meta["num_classes"]) if "num_classes" in meta else _infer_num_classes(state))
    model = build_model(arch, num_classes)
    _load_state(model, state, meta, p)
    return model


def _infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    """The output size of the last weight matrix in a state dict (released checkpoints carry no metadata)."""
    heads = [v for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]
    if not heads:
        raise GteError("cannot infer the number of classes from the state dict")
    return int(heads[-1].shape[0])


def freeze(model: nn.Module) -> nn.Module:
    """Make ``model`` a teacher: eval mode and no parameter gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    """``model.get_submodule`` that also looks through DDP/compile wrappers."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    return inner.get_submodule(dotted)
