"""The student's e2KD gradient against two independent oracles, in float64.

(a) Central finite differences of L(θ + h·v) along random parameter directions v: the KD term and the explanation
    term separately, for a CIFAR B-cos ResNet, a B-cos ResNet-18, a B-cos DenseNet and the B-cos ViT.
(b) The official GoodTeachersExplain formulation, written here from its description (not from gte's code; B-cos
    CNNs, and the ViT as the official ViT computes it — attention weights as the dynamic factor): every
    dynamic factor enters through a multiplication that saves the factor *with its graph* and reads an explanation
    flag at backward time; W(x) is taken with ``create_graph=True`` and the flag on, the final backward with it off.
(c) The mutation: the dynamic factors detached in the outer derivative (``exp_grad="detached"``, pip bcos'
    explanation mode) fails (a).

B-cos networks are piecewise smooth (|ŵ·x| has a kink at 0, the explanation term sees it in first order), so a finite
difference is only valid when no kink lies within ±h: each direction is tried with h = 1e-7, 1e-8, 1e-9 and the best
agreement counts (a wrong gradient is far off at every h).
"""

import contextlib
import copy

import pytest
import torch
from bcos.models.vit import Attention
from bcos.modules.bcosconv2d import BcosConv2d
from bcos.modules.bcoslinear import BcosLinear
from bcos.modules.norms.centered_norms import DetachableLayerNorm
from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import BatchNormUncentered2d

from gte.config import DistillConfig
from gte.explain import explain_with_logits
from gte.losses import explanation_loss, kd_loss
from gte.methods import Batch
from gte.methods.e2kd import E2KD
from gte.models import build_model, info, to_model_input
from gte.onepass import logits_and_explanation
from tests.test_onepass import TEST_NETS

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("bcos_cifar_resnet20", 16), ("bcos_resnet18", 32), ("bcos_densenet121", 32), ("pooled", 20),
         ("bcos_vit_ti_patch16_224", 32)]


def _setup(arch: str, size: int, seed: int = 0):
    torch.manual_seed(seed)
    model = (TEST_NETS[arch]() if arch in TEST_NETS else build_model(arch, 10)).double().train()
    x = torch.rand(3, 6, size, size, dtype=torch.float64)
    t_logits = torch.randn(3, 10, dtype=torch.float64)
    t_maps = torch.randn_like(x)
    return model, x, t_logits, t_maps, t_logits.argmax(1)


def _terms(model, x, t_logits, t_maps, classes, exp_grad="exact"):
    logits, maps = logits_and_explanation(model, x, classes, exp_grad)
    return kd_loss(logits, t_logits, 2.0), explanation_loss(maps, t_maps)


def _fd_errors(model, x, t_logits, t_maps, classes, grads, term: int, n_dirs: int = 2,
               hs: tuple[float, ...] = (1e-7, 1e-8, 1e-9)) -> list[float]:
    """Per direction: min over h in ``hs`` of |<grad, v> − FD| / |FD|."""
    params = [p for p in model.parameters()]
    base = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(123)
    errors = []
    for _ in range(n_dirs):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grads, v)).item()
        best = float("inf")
        for h in hs:
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    for p, b, d in zip(params, base, v):
                        p.copy_(b + sign * h * d)
                values.append(_terms(model, x, t_logits, t_maps, classes)[term].item())
            fd = (values[0] - values[1]) / (2 * h)
            best = min(best, abs(analytic - fd) / max(abs(fd), 1e-12))
        errors.append(best)
    with torch.no_grad():
        for p, b in zip(params, base):
            p.copy_(b)
    return errors


def _grads(model, loss) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@pytest.mark.parametrize("arch,size", CASES)
def test_kd_and_explanation_gradients_equal_finite_differences(arch, size):
    model, x, t_logits, t_maps, classes = _setup(arch, size)
    kd, exp = _terms(model, x, t_logits, t_maps, classes)
    g_kd = _grads(model, kd)
    kd, exp = _terms(model, x, t_logits, t_maps, classes)
    g_exp = _grads(model, exp)
    assert max(_fd_errors(model, x, t_logits, t_maps, classes, g_kd, term=0)) <= 1e-5
    assert max(_fd_errors(model, x, t_logits, t_maps, classes, g_exp, term=1)) <= 1e-5


@pytest.mark.parametrize("arch,size", [("bcos_cifar_resnet20", 16), ("bcos_vit_ti_patch16_224", 32)])
def test_mutation_detached_outer_derivative_fails_finite_differences(arch, size):
    """The gradient gte computed before (and pip bcos' explanation mode gives) is not the derivative of the loss."""
    model, x, t_logits, t_maps, classes = _setup(arch, size)
    _, exp = _terms(model, x, t_logits, t_maps, classes, exp_grad="detached")
    errors = _fd_errors(model, x, t_logits, t_maps, classes, _grads(model, exp), term=1)
    assert min(errors) > 1e-3  # 100× the tolerance the exact gradient meets (measured: 7e-3 to 1 here)


# ------------------------------------------------------------------ (b) the official formulation, written here
class _DynamicMultiplication(torch.autograd.Function):
    """``weight · input``; in explanation mode (read at backward time) ``weight`` gets no gradient — but it is saved
    with its graph, so a double backward still differentiates it."""

    @staticmethod
    def forward(ctx, weight, input, state):
        ctx.state = state
        ctx.save_for_backward(weight, input)
        return weight * input

    @staticmethod
    def backward(ctx, g):
        weight, input = ctx.saved_tensors
        if ctx.state["fixed_weights"]:
            return None, g * weight, None
        return g * input, g * weight, None  # autograd sums a broadcast factor's gradient to its shape


def _official_conv(m: BcosConv2d, state, x):
    out = m.linear(x)
    if m.max_out > 1:
        out = out.unflatten(1, (m.out_channels, m.max_out)).max(dim=2).values
    if m.b == 1:
        return out
    norm = m.calc_patch_norms(x)
    scale = out.abs() / norm if m.b == 2 else ((out / norm).abs() + 1e-6).pow(m.b - 1)
    return _DynamicMultiplication.apply(scale, out, state)


def _official_bn(m: BatchNormUncentered2d, state, x):
    if m.training:
        var = x.var(dim=(0, 2, 3), unbiased=False)
        m.num_batches_tracked.add_(1)
        m.running_var.copy_((1 - m.momentum) * m.running_var + m.momentum * var.detach())
    else:
        var = m.running_var
    y = _DynamicMultiplication.apply(1 / (var + m.eps).sqrt()[None, :, None, None], x, state)
    if m.weight is not None:
        y = m.weight[None, :, None, None] * y
    return y if m.bias is None else y + m.bias[None, :, None, None]


def _official_linear(m: BcosLinear, state, x):
    out = m.linear(x)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-12
    return _DynamicMultiplication.apply(out.abs() / norm, out, state)


def _official_layer_norm(m: DetachableLayerNorm, state, x):
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
    y = _DynamicMultiplication.apply(1 / (var + m.eps).sqrt(), x - mean, state)
    y = y if m.weight is None else m.weight * y
    return y if m.bias is None else y + m.bias


def _official_attention(m: Attention, state, x):
    x = m.norm(x)
    q, k, v = (t.reshape(t.shape[0], t.shape[1], m.heads, -1).permute(0, 2, 1, 3)
               for t in m.to_qkv(x).chunk(3, dim=-1))
    attn = (q @ k.transpose(-1, -2) * m.scale).softmax(dim=-1)
    out = _DynamicMultiplication.apply(attn[..., None], v.unsqueeze(2), state).sum(-2)  # as the official ViT
    return m.to_out(out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1))


_OFFICIAL = {BcosConv2d: _official_conv, BatchNormUncentered2d: _official_bn, BcosLinear: _official_linear,
             DetachableLayerNorm: _official_layer_norm, Attention: _official_attention}


@contextlib.contextmanager
def _official(model):
    state = {"fixed_weights": False}
    patched = []
    for m in model.modules():
        if type(m) in _OFFICIAL:
            m.forward = lambda x, m=m, f=_OFFICIAL[type(m)]: f(m, state, x)
            patched.append(m)
    try:
        yield state
    finally:
        for m in patched:
            del m.forward


def official_e2kd_backward(model, x, classes, t_logits, t_maps, lam):
    """The official step: forward and W(x) in explanation mode, the final backward with it off."""
    with _official(model) as state:
        x = x.clone().requires_grad_(True)
        state["fixed_weights"] = True
        logits = model(x)
        (maps,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x, create_graph=True)
        state["fixed_weights"] = False
        (kd_loss(logits, t_logits, 2.0) + lam * explanation_loss(maps, t_maps)).backward()
    return logits, maps


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float, name: str) -> None:
    """max |got − want| ≤ rel · max |want| (elementwise rtol would judge round-off on near-zero entries)."""
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"{name}: max error {err:.3g}, scale {want.abs().max().item():.3g}"


@pytest.mark.parametrize("arch,size", [("bcos_cifar_resnet20", 16), ("bcos_resnet18", 32),
                                       ("bcos_densenet121", 32), ("odd", 12), ("pooled", 20),
                                       ("bcos_vit_ti_patch16_224", 32)])
def test_one_pass_equals_the_official_formulation(arch, size):
    model, x, t_logits, t_maps, classes = _setup(arch, size, seed=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNormUncentered2d):
                m.running_var.uniform_(0.5, 2.0)
    assert_one_pass_equals_official(model, x, t_logits, t_maps, classes)


def assert_one_pass_equals_official(model, x, t_logits, t_maps, classes, grad_rel: float = 1e-9,
                                    buffer_rtol: float = 1e-12, value_rtol: float = 1e-10) -> None:
    """One e2KD backward (λ = 3, T = 2) through the one pass and through the official formulation on a copy: the same
    logits and maps (to ``value_rtol``), parameter gradients (to ``grad_rel`` of their scale) and running
    statistics."""
    ref = copy.deepcopy(model)
    logits, maps = official_e2kd_backward(ref, x, classes, t_logits, t_maps, 3.0)
    f_logits, f_maps = logits_and_explanation(model, x, classes)
    (kd_loss(f_logits, t_logits, 2.0) + 3.0 * explanation_loss(f_maps, t_maps)).backward()
    torch.testing.assert_close(f_logits, logits, rtol=value_rtol, atol=1e-12 * value_rtol / 1e-10)
    torch.testing.assert_close(f_maps, maps, rtol=10 * value_rtol, atol=1e-13 * value_rtol / 1e-10)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        _assert_close_to_scale(q.grad, p.grad, grad_rel, name)
    for (name, b), c in zip(ref.named_buffers(), model.buffers()):
        torch.testing.assert_close(c, b, rtol=buffer_rtol, atol=1e-15, msg=name)  # running statistics updated once


def test_e2kd_method_step_equals_the_official_formulation():
    """Through the method (teacher W(x) of its top-1 class, input spec, λ, T): the official gradient."""
    torch.manual_seed(4)
    student = build_model("bcos_cifar_resnet20", 10).double().train()
    ref = copy.deepcopy(student)
    teacher = build_model("bcos_cifar_resnet20", 10).double().eval()
    images = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    method = E2KD(DistillConfig(method="e2kd", lambda_exp=2.0, temperature=2.0), student, teacher)
    loss, logs = method.loss(Batch(images, torch.randint(0, 10, (4,))))
    loss.backward()
    xs = to_model_input(info(student), images)
    t_maps, t_logits = explain_with_logits(teacher, to_model_input(info(teacher), images), None, "bcos")
    official_e2kd_backward(ref, xs, t_logits.argmax(1), t_logits, t_maps, 2.0)
    for (name, p), q in zip(ref.named_parameters(), student.parameters()):
        _assert_close_to_scale(q.grad, p.grad, 1e-9, name)


def test_one_pass_under_bf16_autocast_is_as_close_to_fp32_as_the_official_formulation():
    """Autocast: the fused layers cast what they save; their bf16 gradient is as close to the fp32 one as the official
    formulation under the same autocast (bf16 alone moves this random network's gradient by a few %)."""
    torch.manual_seed(5)
    model = build_model("bcos_resnet18", 10).float().train()
    ref, stock, fast = model, copy.deepcopy(model), copy.deepcopy(model)
    x = torch.rand(4, 6, 32, 32)
    t_logits, t_maps = torch.randn(4, 10), torch.randn_like(x)
    classes = t_logits.argmax(1)
    official_e2kd_backward(ref, x, classes, t_logits, t_maps, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        official_e2kd_backward(stock, x, classes, t_logits, t_maps, 1.0)
        logits, maps = logits_and_explanation(fast, x, classes)
        loss = kd_loss(logits.float(), t_logits, 2.0) + explanation_loss(maps.float(), t_maps)
    loss.backward()

    def cos_to_fp32(m):
        grads = [torch.cat([p.grad.float().flatten() for p in n.parameters()]) for n in (ref, m)]
        return torch.nn.functional.cosine_similarity(*grads, dim=0).item()

    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())
    assert cos_to_fp32(fast) > max(0.9, cos_to_fp32(stock) - 0.05)


def test_e2kd_options_beyond_the_paper_add_the_terms_they_name():
    """exp_topk / exp_student_top1 average the explanation terms of the extra classes (teacher and student explain
    the same class); exp_norm_weight adds μ·(log‖W_S‖ − log‖W_T‖)². Checked against the terms assembled here."""
    from gte.losses import log_norm_gap
    from gte.onepass import OnePass

    torch.manual_seed(6)
    student = build_model("bcos_cifar_resnet20", 10).double().train()
    teacher = build_model("bcos_cifar_resnet20", 10).double().eval()
    images = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    cfg = DistillConfig(method="e2kd", lambda_exp=2.0, exp_topk=2, exp_student_top1=True, exp_norm_weight=0.5)
    method = E2KD(cfg, student, teacher)
    loss, logs = method.loss(Batch(images, labels))

    state = copy.deepcopy(student.state_dict())
    xt, xs = to_model_input(info(teacher), images), to_model_input(info(student), images)
    t_maps, t_logits = explain_with_logits(teacher, xt, None, "bcos")
    student.load_state_dict(state)
    one = OnePass(copy.deepcopy(student), xs)
    classes = [t_logits.topk(2, dim=1).indices[:, 0], t_logits.topk(2, dim=1).indices[:, 1],
               one.logits.detach().argmax(1)]
    pairs = [(one.explain(c), explain_with_logits(teacher, xt, c, "bcos")[0]) for c in classes]
    exp = sum(explanation_loss(s, t) for s, t in pairs) / 3
    gap = sum(log_norm_gap(s, t) for s, t in pairs) / 3
    want = kd_loss(one.logits, t_logits, 1.0) + 2.0 * exp + 0.5 * gap
    assert torch.allclose(loss, want, rtol=1e-10) and torch.allclose(logs["exp_norm"], gap, rtol=1e-10)
    assert torch.allclose(pairs[0][1], t_maps)
