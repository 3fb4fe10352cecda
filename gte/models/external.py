"""Classifiers from other libraries by name: ``timm/<name>`` (any model ``timm.list_models()`` knows; timm is a
dependency of gte) and ``torchvision/<name>`` (any torchvision classification model).

What gte needs to know about them is read from the model, not listed by hand:

- **GradCAM layer** — the last spatial feature map before global pooling. timm: the module whose output
  ``forward_features`` returns (ResNet ``layer4``, EfficientNet ``bn2``, MobileNetV3 ``blocks``; one probe forward at
  64 px); torchvision: ``layer4`` for ResNets, else
  ``features`` (MobileNet, EfficientNet, ConvNeXt, DenseNet, VGG, …). timm ViT / DeiT: the last block's ``norm1``,
  its tokens reshaped to the patch grid with the class/distillation/register tokens dropped (``num_prefix_tokens``;
  pytorch-grad-cam's ``reshape_transform`` convention). timm Swin: its final ``norm``, an N×H×W×C map
  (``map_nhwc``). torchvision's ViTs: none found (``explain_layer`` names one).
- **Stages** (feature methods) — timm: the ``feature_info`` modules at stride ≥ 4; torchvision: ResNets' ``layer1..4``.
- **Head** — timm: ``pretrained_cfg["classifier"]``; torchvision: ``fc`` where it is a Linear.
- **Input spec** — timm: ``pretrained_cfg`` mean/std; torchvision: ImageNet's.

``timm/hf-hub:<org>/<name>`` builds a timm model with its pretrained weights from the local Hugging Face cache
(:mod:`gte.models.hfhub`); its facts are found as for ``timm/<name>``, plus the repo's ``pretrained_cfg``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

import torch.nn as nn

from gte.errors import GteError
from gte.models import hfhub

TIMM, TORCHVISION = "timm/", "torchvision/"
PREFIXES = (TIMM, TORCHVISION)


@dataclass(frozen=True)
class Facts:
    """What :func:`build` learnt about an external model (the rest of :class:`~gte.models.registry.ModelInfo`)."""

    gradcam_layer: str | None
    stages: tuple[str, ...]
    head: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token_prefix: int | None = None
    geometry: dict = field(default_factory=dict, hash=False)  # input_size / crop_pct / interpolation / fixed_input_size
    class_names: tuple[str, ...] = ()  # timm/hf-hub: the repo's label_names (when its head is kept)
    map_nhwc: bool = False  # the GradCAM layer's map is channels-last, N×H×W×C (timm Swin)


def is_external(name: str) -> bool:
    return name.startswith(PREFIXES) or hfhub.is_misspelt(name)  # a misspelt Hub name gets hfhub's spelling error


def _timm():
    try:
        import timm
    except ImportError:
        raise GteError("timm/… models need timm: pip install 'timm>=1.0.23' (a dependency of gte-distill)") from None
    return timm


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def known(name: str) -> bool:
    """Whether the library behind ``name``'s prefix can build it (a Hub name: a one-line error if it is misspelt or
    not in the local Hugging Face cache, which says more than 'unknown model')."""
    if hfhub.is_misspelt(name):
        hfhub.parse(name)  # raises, naming the right spelling (needs no timm)
    if hfhub.is_hf_hub(name):
        _timm()
        return hfhub.snapshot(name).is_dir()
    if name.startswith(TIMM):
        return _timm().is_model(name[len(TIMM):])
    return name[len(TORCHVISION):] in _torchvision_names()


def close_matches(name: str) -> list[str]:
    """Prefixed names close to ``name`` (both libraries when they can be asked; the one named first)."""
    bare = name.split("/", 1)[-1]
    tv = [TORCHVISION + n for n in difflib.get_close_matches(bare, _torchvision_names(), n=3, cutoff=0.6)]
    try:
        tm = [TIMM + n for n in difflib.get_close_matches(bare, _timm().list_models(), n=3, cutoff=0.6)]
    except GteError:
        tm = []
    return tm + tv if name.startswith(TIMM) else tv + tm


def build(name: str, num_classes: int) -> tuple[nn.Module, Facts]:
    """A randomly initialised ``num_classes``-way model and its facts (a ``timm/hf-hub:`` model: pretrained, see
    :mod:`gte.models.hfhub`; its head re-initialised where ``num_classes`` differs from the repo's)."""
    if not known(name):
        close = close_matches(name)
        raise GteError(f"unknown model '{name}'" + (f"; did you mean {', '.join(close[:3])}?" if close else ""))
    if hfhub.is_hf_hub(name):
        model, kept = hfhub.create(name, num_classes)  # timm's pretrained_cfg is the repo's: geometry follows
        return model, replace(_timm_facts(model), class_names=tuple(kept.get("label_names", ())))
    if name.startswith(TIMM):
        return _build_timm(name[len(TIMM):], num_classes)
    return _build_torchvision(name[len(TORCHVISION):], num_classes)


def _build_timm(name: str, num_classes: int) -> tuple[nn.Module, Facts]:
    model = _timm().create_model(name, pretrained=False, num_classes=num_classes)
    return model, _timm_facts(model)


def _timm_facts(model: nn.Module) -> Facts:
    """What gte needs to know about a timm model, read from the model (and its ``pretrained_cfg``)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    infos = list(getattr(model, "feature_info", None) or [])
    tokens = getattr(model, "patch_embed", None) is not None  # ViT / DeiT / Swin: token maps, no spatial CNN map
    spatial = [] if tokens else [f["module"] for f in infos if f.get("reduction", 1) >= 4]
    head = cfg.get("classifier")
    head = head[0] if isinstance(head, (tuple, list)) else head
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    geometry = timm_geometry(cfg)
    prefix, nhwc = None, False
    blocks = getattr(model, "blocks", None)
    if tokens and isinstance(blocks, nn.Sequential) and hasattr(model, "num_prefix_tokens") and \
            has_module(model, f"blocks.{len(blocks) - 1}.norm1"):
        # ViT / DeiT: pytorch-grad-cam's convention, the last block's first LayerNorm, tokens back on the patch grid
        cam, prefix = f"blocks.{len(blocks) - 1}.norm1", int(model.num_prefix_tokens)
    else:  # CNNs; Swin, whose forward_features returns its last stage's normed map channels-last (N×H×W×C)
        side = geometry["input_size"] if geometry["fixed_input_size"] else 64
        cam, nhwc = _features_output_module(model, side)
    return Facts(cam, tuple(spatial), head if has_module(model, head) else None, mean, std, prefix, geometry,
                 map_nhwc=nhwc)


def timm_geometry(cfg: dict) -> dict:
    """The eval geometry of a timm ``pretrained_cfg`` (input size, crop fraction, interpolation, fixed size)."""
    size = cfg.get("input_size", (3, 224, 224))
    interpolation = cfg.get("interpolation", "bilinear")
    return {"input_size": int(size[-1]), "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "interpolation": interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
            "fixed_input_size": bool(cfg.get("fixed_input_size", False))}


def _features_output_module(model: nn.Module, side: int = 64) -> tuple[str | None, bool]:
    """The module whose output ``forward_features`` returns (the map global pooling sees: ResNet ``layer4``,
    EfficientNet ``bn2`` after the 1×1 head conv, MobileNetV3 ``blocks``, Swin ``norm``), found by one probe forward
    at side², and whether that map is channels-last (N×H×W×C: its last dim is ``num_features``, Swin's)."""
    import torch

    if not hasattr(model, "forward_features"):
        return None, False
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, o)))
             for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters(), None)  # a model built elsewhere may already sit on a GPU, in bf16
            shape = (1, 3, side, side)
            probe = torch.zeros(shape) if p is None else torch.zeros(shape, device=p.device, dtype=p.dtype)
            out = model.forward_features(probe)
    except Exception:  # a model that needs its own input size: no automatic layer  # noqa: BLE001
        return None, False
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        return None, False
    width = getattr(model, "num_features", None)
    nhwc = width is not None and out.shape[-1] == width and out.shape[1] != width
    # the outermost module (shortest name) among those that returned that very tensor last
    names = [n for n, o in seen if o is out]
    return (min(names, key=lambda n: n.count(".")), nhwc) if names else (None, False)


def _build_torchvision(name: str, num_classes: int) -> tuple[nn.Module, Facts]:
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return model, _torchvision_facts(model, name)


def _torchvision_facts(model: nn.Module, name: str = "") -> Facts:
    """A torchvision(-like) classifier and its facts: ResNets' ``layer1..4``, else ``features``."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        stages: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
        cam: str | None = "layer4"
    else:
        stages, cam = (), ("features" if isinstance(getattr(model, "features", None), nn.Module) else None)
    head = "fc" if isinstance(getattr(model, "fc", None), nn.Linear) else None
    # torchvision's Swin: ``features`` ends channels-last (N×H×W×C), permuted only after its norm
    return Facts(cam, stages, head, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None,
                 _tv_geometry(name) if name else {}, map_nhwc=name.startswith("swin"))


def _tv_geometry(name: str) -> dict:
    """The eval geometry of a torchvision model's default weights (its transforms' crop, resize, interpolation)."""
    import torchvision

    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        return {"input_size": crop, "crop_pct": crop / resize, "interpolation": t.interpolation.value,
                "fixed_input_size": name.startswith(("vit_", "swin", "maxvit"))}
    except (ValueError, AttributeError, TypeError, IndexError):  # a model without released weights
        return {}


def facts(model: nn.Module, name: str = "") -> Facts:
    """The facts of a classifier built outside gte: a timm model (it has ``pretrained_cfg``), else torchvision-like
    (``name``: its ``torchvision/<name>``, for the geometry of its released weights)."""
    if getattr(model, "pretrained_cfg", None) is not None:
        return _timm_facts(model)
    return _torchvision_facts(model, name[len(TORCHVISION):] if name.startswith(TORCHVISION) else "")


def has_module(model: nn.Module, name: str | None) -> bool:
    """Whether ``model`` has a submodule called ``name`` (dotted)."""
    if not name:
        return False
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
