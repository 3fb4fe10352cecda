"""gte.models: the zoo, released-checkpoint formats, safetensors round trips, refusal of pickled code, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gte.errors import GteError
from gte.models import (
    REGISTRY,
    build_model,
    freeze,
    get_submodule,
    info,
    load_model,
    load_weights,
    save_model,
    to_model_input,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def input_size(name: str) -> int:
    if "vit" in name:
        return 224  # patch 16 at a fixed 224² position grid
    if name.startswith(("bcos_cifar", "cifar")):
        return 32
    return 64


def perturb_(model: nn.Module, seed: int, in_channels: int, size: int) -> nn.Module:
    """Make every weight non-default and set the BN running stats to those of one random batch (so that logits vary
    by O(0.1) around the bias instead of 1e-5), reproducibly; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point() and not k.endswith(("running_mean", "running_var")):
                v.add_(0.1 * torch.randn(v.shape, generator=g))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    model.train()
    x = torch.rand(4, 3, size, size, generator=g)
    with torch.no_grad():
        model(torch.cat([x, 1 - x], 1) if in_channels == 6 else x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def image(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the zoo
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_model_builds_and_runs(name):
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    mi = info(model)
    assert mi.arch == name and mi.num_classes == 7
    assert mi.bcos == name.startswith("bcos_")
    assert mi.in_channels == (6 if mi.bcos else 3)
    assert mi.explainer == ("bcos" if mi.bcos else "gradcam")
    if mi.gradcam_layer is not None:
        assert isinstance(get_submodule(model, mi.gradcam_layer), nn.Module)
    else:
        assert "vit" in name

    size = input_size(name)
    n = 1 if "vit" in name else 2
    x = to_model_input(mi, image(n, size))
    assert x.shape == (n, mi.in_channels, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (n, 7) and torch.isfinite(out).all()

    if mi.bcos:
        from bcos.modules import LogitLayer

        biases = [m.logit_bias for m in model.modules() if isinstance(m, LogitLayer)]
        assert len(biases) == 1 and biases[0] == pytest.approx(-math.log(6))
        with pytest.raises(RuntimeError):  # a 3-channel image is not a B-cos input
            model(image(1, size))
    else:
        assert not any(type(m).__name__ == "LogitLayer" for m in model.modules())


def test_model_input_specs():
    x = image(2, 8)
    b = to_model_input(info(build_model("bcos_cifar_resnet20", 3)), x)
    torch.testing.assert_close(b, torch.cat([x, 1 - x], 1))
    s = to_model_input(info(build_model("cifar_resnet20", 3)), x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(s, (x - mean) / std)


# ------------------------------------------------------------------------------------------------ released formats
def _variants(state: dict[str, torch.Tensor]) -> dict[str, object]:
    return {
        "plain": state,
        "wrapped": {"model": state, "epoch": torch.tensor(3)},
        "ddp_prefix": {f"module.{k}": v for k, v in state.items()},
    }


@pytest.fixture(scope="module")
def bcos_reference():
    import bcos.models.pretrained as pretrained

    torch.manual_seed(1)
    return perturb_(pretrained.resnet18(pretrained=False, progress=False), seed=2, in_channels=6, size=64)


@pytest.mark.parametrize("variant", ["plain", "wrapped", "ddp_prefix"])
def test_load_released_bcos_v2_state_dict(tmp_path, bcos_reference, variant):
    ref = bcos_reference
    state = ref.state_dict()
    assert "fc.linear.weight" in state and "bn1.running_var" in state  # the released key layout
    path = tmp_path / f"resnet_18-{variant}.pth"
    torch.save(_variants(state)[variant], path)

    model = build_model("bcos_resnet18", 1000, weights=str(path)).eval()
    x = to_model_input(info(model), image(2, 64, seed=3))
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert torch.equal(got, expected)
    fresh = build_model("bcos_resnet18", 1000).eval()
    with torch.no_grad():
        assert (fresh(x) - expected).abs().max() > 1e-2  # the weights really were loaded (and matter)
    # load_model with an explicit arch infers the class count from the (metadata-free) .pth
    loaded = load_model(str(path), arch="bcos_resnet18").eval()
    assert info(loaded).num_classes == 1000
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("variant", ["plain", "wrapped", "ddp_prefix"])
def test_load_torchvision_state_dict(tmp_path, variant):
    import torchvision

    torch.manual_seed(4)
    ref = perturb_(torchvision.models.resnet18(), seed=5, in_channels=3, size=64)
    path = tmp_path / "resnet18.pth"
    torch.save(_variants(ref.state_dict())[variant], path)
    model = build_model("resnet18", 1000, weights=str(path)).eval()
    x = to_model_input(info(model), image(2, 64, seed=6))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert (build_model("resnet18", 1000).eval()(x) - ref(x)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ safetensors
def test_safetensors_round_trip_with_metadata(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(7)
    model = perturb_(build_model("bcos_cifar_resnet20", 5), seed=8, in_channels=6, size=32)
    path = tmp_path / "model.safetensors"
    save_model(model, path, method="e2kd", teacher="bcos_resnet34")
    assert not (tmp_path / "model.safetensors.tmp").exists()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "bcos_cifar_resnet20" and meta["num_classes"] == "5"
    assert meta["method"] == "e2kd" and meta["teacher"] == "bcos_resnet34"
    assert json.loads(meta["input_spec"])["bcos"] is True

    loaded = load_model(str(path)).eval()
    assert info(loaded) == info(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = to_model_input(info(model), image(2, 32, seed=9))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_wrong_class_count_on_load_is_refused(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_model(build_model("bcos_cifar_resnet20", 3), path)
    with pytest.raises(GteError, match="3 classes"):
        build_model("bcos_cifar_resnet20", 4, weights=str(path))
    with pytest.raises(GteError):
        load_model(str(path), num_classes=4)


def test_wrong_class_count_in_pth_is_a_gte_error(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # 1000 classes, no metadata
    with pytest.raises(GteError):
        build_model("resnet18", 10, weights=str(path))


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(build_model("cifar_resnet20", 4), path)
    with pytest.raises(GteError, match="does not fit"):
        build_model("bcos_cifar_resnet20", 4, weights=str(path))


# ------------------------------------------------------------------------------------------------ unsafe / bad files
class Payload:
    """Unpickling this creates ``marker`` (stands for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Custom:
    def __init__(self):
        self.value = 3


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "extra": Payload(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(GteError):
        build_model("cifar_resnet20", 4, weights=str(evil))
    with pytest.raises(GteError):
        load_model(str(evil), arch="cifar_resnet20")
    assert not marker.exists(), "unpickling ran code from the checkpoint"

    custom = tmp_path / "custom.pth"
    torch.save({"conv.weight": torch.zeros(1), "obj": Custom()}, custom)
    with pytest.raises(GteError):
        build_model("cifar_resnet20", 4, weights=str(custom))


def test_bad_weight_files(tmp_path):
    with pytest.raises(GteError, match="not found"):
        build_model("cifar_resnet20", 4, weights=str(tmp_path / "missing.pth"))
    ints = tmp_path / "ints.pth"
    torch.save({"a": 1, "b": [1, 2]}, ints)  # loads with weights_only=True but is no state dict
    with pytest.raises(GteError, match="state dict"):
        build_model("cifar_resnet20", 4, weights=str(ints))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(GteError):
        build_model("cifar_resnet20", 4, weights=str(junk))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(GteError):
        build_model("cifar_resnet20", 4, weights=str(text))
    with pytest.raises(GteError, match="not found"):
        load_model(str(tmp_path / "nothing.safetensors"))


def test_corrupt_safetensors_in_load_model_is_a_gte_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(GteError):
        load_model(str(junk))


# ------------------------------------------------------------------------------------------------ misc
def test_freeze():
    model = build_model("bcos_cifar_resnet20", 4).train()
    assert model.training and all(p.requires_grad for p in model.parameters())
    out = freeze(model)
    assert out is model
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(GteError, match="bcos_resnet18") as e:
        build_model("bcos_resnet81", 4)
    assert "bcos_resnet81" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(GteError, match="known"):
        build_model("xyz", 4)


def test_too_few_classes():
    with pytest.raises(GteError, match="num_classes"):
        build_model("cifar_resnet20", 1)


def test_load_weights_needs_a_gte_model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(build_model("cifar_resnet20", 4), path)
    with pytest.raises(GteError, match="gte_info"):
        load_weights(nn.Linear(2, 2), str(path))
