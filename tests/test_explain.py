"""Oracle tests for gte.explain: B-cos dynamic linear weights and positive GradCAM.

Oracles: the input gradient taken here by hand (one sample at a time), the bcos package's own ``model.explain``, the
exact B-cos identity ``sum(x * W(x)) + logit_bias == logit``, and pytorch-grad-cam's ``GradCAM``. All models are real
(random init) at tiny resolutions; batch-norm running statistics are first calibrated on a random batch so that
logits and maps have realistic, non-degenerate magnitudes (a fresh B-cos net has logits ≈ bias ± 1e-5, which would
make the identity check vacuous).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from gte.explain import contribution_map, explain, explain_with_logits
from gte.losses import explanation_loss
from gte.models import build_model, freeze, get_submodule, info, to_model_input

NUM_CLASSES = 10
CLASSES = torch.tensor([1, 4, 7])  # a different class for every sample


pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(name: str, size: int, seed: int = 0) -> nn.Module:
    """A gte model whose BN running stats are the statistics of one random batch (momentum 1), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, NUM_CLASSES)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(to_model_input(info(model), torch.rand(8, 3, size, size)))
    for m, mom in zip(norms, saved):
        m.momentum = mom
    return model.eval()


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def logit_bias(model: nn.Module) -> float:
    from bcos.modules import LogitLayer

    (bias,) = [m.logit_bias for m in model.modules() if isinstance(m, LogitLayer)]
    return float(bias)


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{attr} left on module '{name}'"


def assert_no_grads(model: nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert not bad, f"explain populated .grad on {bad[:3]}"


def in_explanation_mode(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "detach", False) is True]


BCOS_CASES = [("bcos_cifar_resnet20", 32), ("bcos_resnet18", 64), ("bcos_densenet121", 32)]


@pytest.fixture(scope="module", params=BCOS_CASES, ids=[c[0] for c in BCOS_CASES])
def bcos_case(request):
    """float64 (the maps are checked to ~1e-9 relative; in float32 batched vs single-sample summation order alone
    gives up to 5e-4 relative differences on the DenseNet's many concatenated features)."""
    name, size = request.param
    model = calibrated(name, size).double()
    x = to_model_input(info(model), images(len(CLASSES), size)).double()
    return model, x


# ------------------------------------------------------------------------------------------------ B-cos W(x)
def test_bcos_maps_equal_per_sample_input_gradient_and_bcos_explain(bcos_case):
    model, x = bcos_case
    model.eval()
    maps = explain(model, x, CLASSES, "bcos")
    assert maps.shape == x.shape and maps.shape[1] == 6
    assert not maps.requires_grad

    for i, c in enumerate(CLASSES.tolist()):
        # Oracle 1: our own input gradient, one sample alone, in the bcos explanation mode.
        xi = x[i : i + 1].clone().requires_grad_(True)
        with model.explanation_mode():
            out = model(xi)
        (ref,) = torch.autograd.grad(out[0, c], xi)
        # Batched vs single-sample convolutions sum in a different order; in float64 that is ~1e-13 relative to the
        # map's largest entry. A wrong class or a gradient outside explanation mode differs at O(1) of that scale.
        scale = ref.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(maps[i : i + 1], ref, rtol=1e-8, atol=1e-9 * scale)

        # Oracle 2: the bcos package's own explain() (batch size 1, explicit class index).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = model.explain(x[i : i + 1].clone(), idx=c)["dynamic_linear_weights"]
        torch.testing.assert_close(theirs, ref, rtol=1e-8, atol=1e-9 * scale)
        torch.testing.assert_close(maps[i : i + 1], theirs, rtol=1e-8, atol=1e-9 * scale)

    # The class of each sample matters: explaining class 1 for every sample changes samples 1 and 2 by O(scale).
    same = explain(model, x, torch.full_like(CLASSES, int(CLASSES[0])), "bcos")
    torch.testing.assert_close(same[0], maps[0], rtol=1e-8, atol=1e-9 * maps[0].abs().max().item())
    for i in (1, 2):
        assert (same[i] - maps[i]).abs().max() > 1e-2 * maps[i].abs().max()
    assert in_explanation_mode(model) == [], "explain left the model in explanation mode"


def test_bcos_default_class_is_top1(bcos_case):
    model, x = bcos_case
    model.eval()
    maps, logits = explain_with_logits(model, x, None, "bcos")
    with torch.no_grad():
        top1 = model(x).argmax(1)
    assert torch.equal(logits.argmax(1), top1)
    torch.testing.assert_close(maps, explain(model, x, top1, "bcos"), rtol=1e-10, atol=1e-10 * maps.abs().max().item())


@pytest.mark.parametrize("name,size", [("bcos_cifar_resnet20", 32), ("bcos_resnet18", 64)])
def test_bcos_contributions_plus_bias_equal_logit(name, size):
    # float64, so that the identity can be checked to ~1e-12 while the dynamic-linear part of the logit is ~1e-3..1e-1.
    model = calibrated(name, size).double()
    x = to_model_input(info(model), images(3, size, seed=2)).double()
    maps, logits = explain_with_logits(model, x, CLASSES, "bcos")
    with torch.no_grad():
        plain = model(x).gather(1, CLASSES[:, None])[:, 0]  # a normal (not explanation-mode) eval forward
    b = logit_bias(model)
    assert b == pytest.approx(-math.log(NUM_CLASSES - 1))
    contrib = contribution_map(x, maps).sum((1, 2))
    assert contrib.shape == (3,)
    # Non-vacuous: the dynamic-linear part of the logit is far larger than the tolerance.
    assert (plain - b).abs().min() > 1e-5
    torch.testing.assert_close(contrib + b, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.gather(1, CLASSES[:, None])[:, 0], plain, rtol=0, atol=1e-12)


def test_bcos_train_mode_batch_maps_equal_per_sample_gradients():
    """In explanation mode the B-cos BN detaches its batch statistics, so samples are independent even in train mode:
    the gradient of the batched sum of selected logits is, per sample, the gradient of that sample's logit alone."""
    model = build_model("bcos_cifar_resnet20", NUM_CLASSES).train()
    torch.manual_seed(3)
    x = to_model_input(info(model), images(4, 16, seed=3))
    classes = torch.tensor([0, 5, 2, 9])
    maps = explain(model, x, classes, "bcos")
    assert model.training and all(m.training for m in model.modules()), "explain changed train/eval mode"

    xr = x.clone().requires_grad_(True)
    with model.explanation_mode():
        out = model(xr)
    for i, c in enumerate(classes.tolist()):
        (g,) = torch.autograd.grad(out[i, c], xr, retain_graph=True)
        others = torch.cat([g[:i], g[i + 1 :]])
        assert others.abs().max() == 0, "one sample's logit depends on another sample in explanation mode"
        scale = g[i].abs().max().item()
        assert scale > 0
        torch.testing.assert_close(maps[i], g[i], rtol=1e-5, atol=1e-5 * scale)

    # Sanity: outside explanation mode train-mode BN does couple the samples, so the check above can fail.
    out = model(xr)
    (g,) = torch.autograd.grad(out[0, 0], xr)
    assert g[1:].abs().max() > 0


# ------------------------------------------------------------------------------------------------ GradCAM
GRADCAM_CASES = [("resnet18", 64), ("cifar_resnet20", 32), ("timm/tf_efficientnet_lite0", 64), ("timm/convnext_atto", 96),
                 ("torchvision/mobilenet_v3_small", 128)]


@pytest.mark.parametrize("name,size", GRADCAM_CASES)
def test_gradcam_matches_pytorch_grad_cam(name, size):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = calibrated(name, size)
    x = to_model_input(info(model), images(4, size, seed=4))
    classes = torch.tensor([0, 3, 5, 9])
    ours = explain(model, x, classes, "gradcam")
    assert ours.shape == (4, 1, size, size)
    assert ours.min() >= 0, "positive GradCAM must be non-negative"

    layer = model.get_submodule(info(model).gradcam_layer)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    assert_no_hooks(model)
    ref = torch.from_numpy(ref)
    assert ref.shape == (4, size, size)

    o = ours[:, 0]
    lo = o.flatten(1).min(1).values[:, None, None]
    hi = o.flatten(1).max(1).values[:, None, None]
    # Precondition: every map is non-degenerate (a random net can have an all-zero positive CAM for some class).
    assert (hi - lo).min() > 1e-4, (hi - lo).flatten()
    normed = (o - lo) / (hi - lo)
    # pytorch-grad-cam returns minmax(cv2_bilinear_resize(minmax(ReLU(cam)))), each minmax being
    # (x - min) / (max + 1e-7). Bilinear resizing is a convex combination of pixels, so it commutes with min-max
    # scaling, and the outer minmax cancels the inner one's scale (and its eps). What remains is the outer eps
    # (1e-7 on a range of ~1) and float32 rounding in cv2's interpolation (~1e-6); observed < 1e-6. Errors this test
    # exists for (wrong layer, no ReLU, wrong class, nearest or align_corners=True resizing) are >= 1e-2.
    torch.testing.assert_close(normed, ref, rtol=0, atol=1e-5)


def test_vit_gradcam_matches_pytorch_grad_cam_with_its_reshape_transform():
    """timm DeiT: tokens of the last block's norm1, class token dropped, on the 14×14 patch grid — pytorch-grad-cam's
    documented ViT recipe (reshape_transform) is the oracle."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = build_model("timm/deit_tiny_patch16_224", NUM_CLASSES).eval()
    assert info(model).gradcam_layer == "blocks.11.norm1" and info(model).token_prefix == 1
    x = to_model_input(info(model), images(2, 224, seed=6))
    classes = torch.tensor([1, 7])
    ours = explain(model, x, classes, "gradcam")[:, 0]

    def reshape_transform(t, h=14, w=14):
        return t[:, 1:, :].reshape(t.size(0), h, w, t.size(2)).permute(0, 3, 1, 2)

    with GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape_transform) as cam:
        ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes]))
    lo = ours.flatten(1).min(1).values[:, None, None]
    hi = ours.flatten(1).max(1).values[:, None, None]
    assert (hi - lo).min() > 1e-6
    torch.testing.assert_close((ours - lo) / (hi - lo), ref, rtol=0, atol=1e-4)


def test_swin_gradcam_matches_pytorch_grad_cam_on_its_channels_last_map():
    """timm Swin: its final norm's N×H×W×C map (what forward_features returns), channels moved first — pytorch-grad-cam
    with the permuting reshape_transform is the oracle; a layout mix-up (channels read as width) is far off."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = build_model("timm/swin_tiny_patch4_window7_224", NUM_CLASSES).eval()
    assert info(model).gradcam_layer == "norm" and info(model).map_nhwc and info(model).fixed_input_size
    x = to_model_input(info(model), images(2, 224, seed=7))
    classes = torch.tensor([2, 5])
    ours = explain(model, x, classes, "gradcam")[:, 0]
    with GradCAM(model=model, target_layers=[model.norm], reshape_transform=lambda t: t.permute(0, 3, 1, 2)) as cam:
        ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes]))
    lo = ours.flatten(1).min(1).values[:, None, None]
    hi = ours.flatten(1).max(1).values[:, None, None]
    assert (hi - lo).min() > 1e-6
    torch.testing.assert_close((ours - lo) / (hi - lo), ref, rtol=0, atol=1e-4)


def test_gradcam_train_mode_matches_own_hook_per_sample():
    """Own GradCAM oracle (forward hook, grad of each sample's logit alone) on the same train-mode batch."""
    torch.manual_seed(0)  # a random net can have an all-zero positive CAM for some class: fix which net
    model = build_model("cifar_resnet20", NUM_CLASSES).train()
    x = to_model_input(info(model), images(3, 16, seed=5))
    maps = explain(model, x, CLASSES, "gradcam")
    assert model.training

    acts = []
    h = get_submodule(model, "layer3").register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        out = model(x)
    finally:
        h.remove()
    a = acts[0]
    for i, c in enumerate(CLASSES.tolist()):
        (g,) = torch.autograd.grad(out[i, c], a, retain_graph=True)
        weights = g[i].mean((1, 2), keepdim=True)
        cam = torch.relu((weights * a[i]).sum(0, keepdim=True))[None]
        ref = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
        scale = ref.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(maps[i], ref.detach(), rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------ side effects
@pytest.mark.parametrize("name,method,size", [("bcos_cifar_resnet20", "bcos", 16), ("cifar_resnet20", "gradcam", 16)])
@pytest.mark.parametrize("create_graph", [False, True])
def test_no_hooks_no_grads_mode_kept(name, method, size, create_graph):
    model = build_model(name, NUM_CLASSES)
    for training in (True, False):
        model.train(training)
        x = to_model_input(info(model), images(2, size)).requires_grad_(True)
        maps = explain(model, x, torch.tensor([1, 2]), method, create_graph=create_graph)
        assert maps.requires_grad == create_graph
        assert_no_hooks(model)
        assert_no_grads(model)
        assert x.grad is None
        assert model.training == training and all(m.training == training for m in model.modules())
        assert in_explanation_mode(model) == []
        if create_graph:
            maps.sum().backward()  # the graph is usable...
            assert any(p.grad is not None for p in model.parameters())
            model.zero_grad(set_to_none=True)
            assert x.grad is None  # ...and still does not reach the caller's tensor (explain detaches its input)


@pytest.mark.parametrize("name,method", [("bcos_cifar_resnet20", "bcos"), ("cifar_resnet20", "gradcam")])
def test_hooks_and_mode_restored_when_forward_fails(name, method):
    model = build_model(name, NUM_CLASSES).eval()
    bad = torch.rand(2, 5, 16, 16)  # wrong channel count: the first conv raises
    with pytest.raises(RuntimeError):
        explain(model, bad, None, method)
    assert_no_hooks(model)
    assert in_explanation_mode(model) == []


# ------------------------------------------------------------------------------------------------ double backprop
@pytest.mark.parametrize("name,method", [("bcos_cifar_resnet20", "bcos"), ("cifar_resnet20", "gradcam")])
def test_explanation_loss_backprops_into_student_never_teacher(name, method):
    torch.manual_seed(6)
    student = build_model(name, NUM_CLASSES).train()
    torch.manual_seed(7)
    teacher = freeze(build_model(name, NUM_CLASSES))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = to_model_input(info(student), images(3, 16, seed=6))

    t_maps, t_logits = explain_with_logits(teacher, x, None, method)
    assert not t_maps.requires_grad and not t_logits.requires_grad
    classes = t_logits.argmax(1)
    s_maps = explain(student, x, classes, method, create_graph=True)
    assert s_maps.requires_grad
    loss = explanation_loss(s_maps, t_maps)
    assert 0 < loss.item() < 2
    loss.backward()

    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the frozen teacher"
    grads = {n: p.grad for n, p in student.named_parameters()}
    with_grad = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    first_conv = next(n for n, p in student.named_parameters() if p.ndim == 4)
    assert first_conv in with_grad, "no gradient through the explanation into the first conv"
    assert len(with_grad) >= len(grads) // 2, f"only {len(with_grad)}/{len(grads)} student params got gradient"


def test_gradcam_double_backprop_matches_finite_difference():
    """The create_graph gradient of a GradCAM explanation loss is the true derivative (GradCAM detaches nothing):
    a directional derivative over all student parameters, float64, central differences."""
    torch.manual_seed(8)
    student = build_model("cifar_resnet20", NUM_CLASSES).double().eval()
    x = to_model_input(info(student), images(2, 16, seed=8)).double()
    target = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    classes = torch.tensor([3, 6])
    params = list(student.parameters())

    def loss64() -> torch.Tensor:  # explanation_loss computes in float32; the same cosine, in float64
        s = explain(student, x, classes, "gradcam", create_graph=True).flatten(1)
        t = target.flatten(1)
        return (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))).mean()

    loss = loss64()
    assert loss.item() == pytest.approx(explanation_loss(explain(student, x, classes, "gradcam"), target).item(),
                                        abs=1e-6)
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # fc.bias does not change d logit / d A
    grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
    g = torch.Generator().manual_seed(10)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((d * d).sum() for d in direction))
    direction = [d / norm for d in direction]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()

    def shifted(eps: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
        try:
            return loss64().item()
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(eps * d)

    eps = 1e-5  # unit direction: small enough to cross no ReLU kink, large enough for float64 (observed agreement 1e-10)
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-4
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_unknown_explainer_and_wrong_model_kind():
    from gte.errors import GteError

    std = build_model("cifar_resnet20", NUM_CLASSES)
    with pytest.raises(GteError, match="B-cos"):
        explain(std, torch.rand(1, 3, 16, 16), None, "bcos")
    with pytest.raises(GteError, match="unknown explainer"):
        explain(std, torch.rand(1, 3, 16, 16), None, "lime")
