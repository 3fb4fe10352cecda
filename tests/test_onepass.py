"""One student forward for KD logits and W(x) (gte.onepass) against the two-pass formulation built on bcos' own
explanation mode: same logits, same maps, same parameter gradients, same running statistics."""

import copy

import pytest
import torch
import torch.nn as nn
from bcos.common import explanation_mode
from bcos.modules.bcosconv2d import BcosConv2d
from bcos.modules.logitlayer import LogitLayer
from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import (
    BatchNormUncentered2d,
)

from gte.config import DistillConfig
from gte.losses import explanation_loss, kd_loss
from gte.methods.e2kd import E2KD, running_stats_frozen
from gte.models import build_model, info, to_model_input
from gte.onepass import fused_layers, logits_and_explanation, supports_one_pass

pytestmark = pytest.mark.usefixtures("one_thread")


class OddBcos(nn.Sequential):
    """The BcosConv2d branches gte's registry models do not use: b = 1.5 with max-out, b = 1, no BN bias/weight."""

    def __init__(self):
        super().__init__(
            BcosConv2d(6, 8, 3, padding=1, b=1.5, max_out=2), BatchNormUncentered2d(8, affine=False),
            BcosConv2d(8, 8, 3, stride=2, padding=1, b=1), BatchNormUncentered2d(8),
            BcosConv2d(8, 10, 1, b=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), LogitLayer(logit_bias=-2.0))


def _models(arch: str):
    if arch == "odd":
        model = OddBcos()
    else:
        model = build_model(arch, 10)
    model = model.double().train()
    with torch.no_grad():  # non-trivial running statistics, so an extra or missing update shows
        for m in model.modules():
            if isinstance(m, BatchNormUncentered2d):
                m.running_var.uniform_(0.5, 2.0)
    return model, copy.deepcopy(model)


def _two_pass(model, x, classes, t_logits, t_maps, lam):
    logits = model(x)
    xe = x.clone().requires_grad_(True)
    with running_stats_frozen(model), explanation_mode(model):
        (maps,) = torch.autograd.grad(model(xe).gather(1, classes[:, None]).sum(), xe, create_graph=True)
    (kd_loss(logits, t_logits, 2.0) + lam * explanation_loss(maps, t_maps)).backward()
    return logits, maps


@pytest.mark.parametrize("arch,size", [("bcos_cifar_resnet20", 16), ("bcos_resnet18", 48), ("odd", 12)])
@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_one_pass_equals_normal_forward_plus_explanation_mode_pass(arch, size, lam):
    torch.manual_seed(0)
    ref, fast = _models(arch)
    assert supports_one_pass(fast)
    x = torch.rand(4, 6, size, size, dtype=torch.float64)
    t_logits = torch.randn(4, 10, dtype=torch.float64)
    t_maps = torch.randn_like(x)
    classes = t_logits.argmax(1)

    logits, maps = _two_pass(ref, x, classes, t_logits, t_maps, lam)
    f_logits, f_maps = logits_and_explanation(fast, x, classes)
    (kd_loss(f_logits, t_logits, 2.0) + lam * explanation_loss(f_maps, t_maps)).backward()

    torch.testing.assert_close(f_logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_maps, maps, rtol=1e-10, atol=1e-14)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-13, msg=name)
    for (name, b), c in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=1e-15, msg=name)  # updated exactly once, identically
    # nothing left patched on the modules
    assert not any("forward" in vars(m) or "forward_impl" in vars(m) for m in fast.modules())


def test_maps_equal_bcos_explanation_mode_and_logit_identity():
    torch.manual_seed(1)
    model, _ = _models("bcos_resnet18")
    model.eval()
    x = to_model_input(info(model), torch.rand(3, 3, 40, 40, dtype=torch.float64))
    classes = torch.tensor([0, 5, 9])
    logits, maps = logits_and_explanation(model, x, classes)
    with explanation_mode(model):
        xe = x.clone().requires_grad_(True)
        out = model(xe)
        (want,) = torch.autograd.grad(out.gather(1, classes[:, None]).sum(), xe)
    torch.testing.assert_close(maps, want, rtol=1e-10, atol=1e-14)
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


def test_e2kd_uses_one_pass_for_bcos_cnns_only():
    cnn = build_model("bcos_cifar_resnet20", 10)
    vit = build_model("bcos_vit_ti_patch16_224", 10)
    assert supports_one_pass(cnn) and not supports_one_pass(vit)
    assert not supports_one_pass(build_model("cifar_resnet20", 10))  # not a B-cos model: nothing to fuse
    assert E2KD(DistillConfig(method="e2kd"), cnn, None).one_pass
    assert not E2KD(DistillConfig(method="e2kd"), vit, None).one_pass
    assert not E2KD(DistillConfig(method="e2kd", explainer="gradcam"), cnn, None).one_pass


@pytest.mark.parametrize("arch,size", [("bcos_resnet18", 48), ("odd", 12)])
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


def test_e2kd_loss_one_pass_and_two_pass_fallback_agree():
    """The method's one-pass path and its two-pass fallback (used for the ViT) train identically."""
    torch.manual_seed(4)
    student, twin = _models("bcos_cifar_resnet20")
    teacher = build_model("bcos_cifar_resnet20", 10).double().eval()
    images = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,))
    grads = []
    for model, one_pass in ((student, True), (twin, False)):
        method = E2KD(DistillConfig(method="e2kd", lambda_exp=2.0, temperature=3.0), model, teacher)
        method.one_pass = one_pass
        loss, _ = method.loss(images, labels, 0)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_one_pass_under_bf16_autocast_is_as_close_to_fp32_as_bcos():
    """Autocast: the fused layers cast what they save; their bf16 gradient is as close to the fp32 one as bcos' own
    two-pass formulation under the same autocast (bf16 alone moves this random network's gradient by ~5 %)."""
    torch.manual_seed(5)
    ref, fast = _models("bcos_resnet18")
    ref, fast = ref.float(), fast.float()
    stock = copy.deepcopy(ref)
    x = torch.rand(4, 6, 32, 32)
    t_logits, t_maps = torch.randn(4, 10), torch.randn_like(x)
    classes = t_logits.argmax(1)
    _two_pass(ref, x, classes, t_logits, t_maps, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _two_pass(stock, x, classes, t_logits, t_maps, 1.0)
        logits, maps = logits_and_explanation(fast, x, classes)
        loss = kd_loss(logits.float(), t_logits, 2.0) + explanation_loss(maps.float(), t_maps)
    loss.backward()

    def cos_to_fp32(model):
        grads = [torch.cat([p.grad.float().flatten() for p in m.parameters()]) for m in (ref, model)]
        return torch.nn.functional.cosine_similarity(*grads, dim=0).item()

    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())
    assert cos_to_fp32(fast) > max(0.9, cos_to_fp32(stock) - 0.05)
