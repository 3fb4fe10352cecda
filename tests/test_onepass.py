"""One student forward for KD logits and W(x) (gte.onepass): the maps equal bcos' own explanation mode, the fused
layers train like bcos' modules, and the ``detached`` ablation equals the two-pass formulation built on bcos'
explanation mode (same logits, maps, parameter gradients, running statistics). The exact (default) gradient is tested
against finite differences and the official formulation in ``test_exact_gradient.py``."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from bcos.common import explanation_mode
from bcos.models.resnet import BasicBlock
from bcos.modules.bcosconv2d import BcosConv2d
from bcos.modules.logitlayer import LogitLayer
from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import (
    BatchNormUncentered2d,
)

from gte.config import DistillConfig
from gte.losses import explanation_loss, kd_loss
from gte.methods.e2kd import E2KD
from gte.models import build_model, info, to_model_input
from gte.onepass import fused_layers, is_bcos_cnn, logits_and_explanation, supports_one_pass

pytestmark = pytest.mark.usefixtures("one_thread")


class OddBcos(nn.Sequential):
    """The BcosConv2d branches gte's registry models do not use: b = 1.5 with max-out, b = 1, no BN bias/weight."""

    def __init__(self):
        super().__init__(
            BcosConv2d(6, 8, 3, padding=1, b=1.5, max_out=2), BatchNormUncentered2d(8, affine=False),
            BcosConv2d(8, 8, 3, stride=2, padding=1, b=1), BatchNormUncentered2d(8),
            BcosConv2d(8, 10, 1, b=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), LogitLayer(logit_bias=-2.0))


class PooledBcos(nn.Sequential):
    """The average pools of gte's registry CNNs around B-cos layers: a b = 2 layer whose batch norm (affine or not)
    a pool follows, a pool between a b = 2 layer and its batch norm, residual blocks (one with a strided shortcut)."""

    def __init__(self, width: int = 8):
        w = width
        super().__init__(
            BcosConv2d(6, w, 3, padding=1), BatchNormUncentered2d(w, affine=False), nn.AvgPool2d(3, 2, 1),
            BcosConv2d(w, w, 3, padding=1), nn.AvgPool2d(2), BatchNormUncentered2d(w),
            BasicBlock(w, w, norm_layer=BatchNormUncentered2d),
            BasicBlock(w, 16, 2, nn.Sequential(BcosConv2d(w, 16, 1, stride=2), BatchNormUncentered2d(16)),
                       norm_layer=BatchNormUncentered2d),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _models(arch: str):
    if arch in TEST_NETS:
        model = TEST_NETS[arch]()
    else:
        model = build_model(arch, 10)
    model = model.double().train()
    with torch.no_grad():  # non-trivial running statistics, so an extra or missing update shows
        for m in model.modules():
            if isinstance(m, BatchNormUncentered2d):
                m.running_var.uniform_(0.5, 2.0)
    return model, copy.deepcopy(model)


@contextlib.contextmanager
def running_stats_frozen(model):
    """Batch norms keep normalising with batch statistics but do not update their running estimates."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


TEST_NETS = {"odd": OddBcos, "pooled": PooledBcos}


def _two_pass(model, x, classes, t_logits, t_maps, lam):
    logits = model(x)
    xe = x.clone().requires_grad_(True)
    with running_stats_frozen(model), explanation_mode(model):
        (maps,) = torch.autograd.grad(model(xe).gather(1, classes[:, None]).sum(), xe, create_graph=True)
    (kd_loss(logits, t_logits, 2.0) + lam * explanation_loss(maps, t_maps)).backward()
    return logits, maps


@pytest.mark.parametrize("arch,size", [("bcos_cifar_resnet20", 16), ("bcos_resnet18", 48), ("odd", 12),
                                       ("pooled", 20), ("bcos_vit_ti_patch16_224", 32)])
@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_detached_ablation_equals_normal_forward_plus_explanation_mode_pass(arch, size, lam):
    torch.manual_seed(0)
    ref, fast = _models(arch)
    assert supports_one_pass(fast)
    x = torch.rand(4, 6, size, size, dtype=torch.float64)
    t_logits = torch.randn(4, 10, dtype=torch.float64)
    t_maps = torch.randn_like(x)
    classes = t_logits.argmax(1)

    logits, maps = _two_pass(ref, x, classes, t_logits, t_maps, lam)
    f_logits, f_maps = logits_and_explanation(fast, x, classes, "detached")
    (kd_loss(f_logits, t_logits, 2.0) + lam * explanation_loss(f_maps, t_maps)).backward()

    torch.testing.assert_close(f_logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_maps, maps, rtol=1e-10, atol=1e-14)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-13, msg=name)
    for (name, b), c in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=1e-15, msg=name)  # updated exactly once, identically
    # nothing left patched on the modules
    assert not any("forward" in vars(m) or "forward_impl" in vars(m) for m in fast.modules())


@pytest.mark.parametrize("arch", ["bcos_resnet18", "bcos_vit_ti_patch16_224"])
def test_maps_equal_bcos_explanation_mode_and_logit_identity(arch):
    torch.manual_seed(1)
    model, _ = _models(arch)
    model.eval()
    x = to_model_input(info(model), torch.rand(3, 3, 48, 48, dtype=torch.float64))  # 3×3 ViT patches
    classes = torch.tensor([0, 5, 9])
    logits, maps = logits_and_explanation(model, x, classes)
    with explanation_mode(model):
        xe = x.clone().requires_grad_(True)
        out = model(xe)
        (want,) = torch.autograd.grad(out.gather(1, classes[:, None]).sum(), xe)
    torch.testing.assert_close(maps, want, rtol=1e-10, atol=1e-14)
    if arch.startswith("bcos_vit"):  # the ViT's positional embedding is an input-independent term: no identity
        return
    # dynamic linearity: Σ x·W(x) + logit bias == the explained logit
    (bias,) = [m.logit_bias for m in model.modules() if isinstance(m, LogitLayer)]
    torch.testing.assert_close((x * maps).sum((1, 2, 3)) + bias, logits.gather(1, classes[:, None])[:, 0],
                               rtol=1e-10, atol=1e-10)


def test_kd_through_explanation_mode_logits_has_another_gradient():
    """What the gate is for: KD back-propagated through explanation-mode logits is not the KD gradient."""
    torch.manual_seed(2)
    ref, other = _models("bcos_cifar_resnet20")
    x = torch.rand(4, 6, 16, 16, dtype=torch.float64)
    t_logits = torch.randn(4, 10, dtype=torch.float64)
    kd_loss(ref(x), t_logits, 2.0).backward()
    with other.explanation_mode():
        kd_loss(other(x), t_logits, 2.0).backward()
    diff = max(((p.grad - q.grad).abs().max() / p.grad.abs().max()).item()
               for p, q in zip(ref.parameters(), other.parameters()))
    assert diff > 1e-2


def test_every_bcos_model_has_the_one_pass_and_cnns_the_fused_layers():
    cnn = build_model("bcos_cifar_resnet20", 10)
    vit = build_model("bcos_vit_ti_patch16_224", 10)
    assert supports_one_pass(cnn) and supports_one_pass(vit)
    assert is_bcos_cnn(cnn) and not is_bcos_cnn(vit)  # CE/KD of a ViT keep bcos' own modules
    assert not supports_one_pass(build_model("cifar_resnet20", 10))  # not a B-cos model: nothing to gate
    assert E2KD(DistillConfig(method="e2kd"), vit, None).explanation.explainer == "bcos"


@pytest.mark.parametrize("arch,size", [("bcos_resnet18", 48), ("odd", 12), ("pooled", 20)])
def test_fused_layers_match_bcos_in_training(arch, size):
    """CE/KD steps run the student through the fused layers: same logits, gradients and running statistics."""
    torch.manual_seed(3)
    ref, fast = _models(arch)
    x = torch.rand(4, 6, size, size, dtype=torch.float64)
    t_logits = torch.randn(4, 10, dtype=torch.float64)
    logits = ref(x)
    kd_loss(logits, t_logits, 1.0).backward()
    with fused_layers(fast):
        f_logits = fast(x)
    kd_loss(f_logits, t_logits, 1.0).backward()
    torch.testing.assert_close(f_logits, logits, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-13, msg=name)
    for (name, b), c in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=1e-15, msg=name)
    with pytest.raises(RuntimeError, match="second-order"):  # refused, not silently wrong
        with fused_layers(fast):
            out = fast(x.clone().requires_grad_(True))
        torch.autograd.grad(out.sum(), fast.parameters(), create_graph=True)
