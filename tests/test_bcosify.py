"""B-cosification (gte.models.bcosify) against independent oracles, in float64 on tiny random networks:

- completeness: ``logit = Σ W(x)·x + logit bias`` with no bias left anywhere (explanation mode and the one-pass W(x));
- B = 1 on a network without biases computes the original network (torchvision/timm forward) up to the input remap;
- torchvision ResNet-18 / DenseNet-121 equal the conversion written here from the paper's description (functional
  code on the original's weights: ``[x, 1 − x]`` normalised by (μ, 1 − μ)/(σ, σ), ``cat(W, −W)/2``,
  ``(w·x)|w·x|/‖x‖``, ``γx/σ``, AvgPool(3, 2, 1), the classifier as a 1×1 conv before the pooling, −log(C − 1));
- the e2KD gradient of a B-cosified student: central finite differences (KD and explanation terms separately) and
  the official formulation (flag read at backward time), as tests/test_exact_gradient.py does for B-cos networks;
- the model file round trip and ``gte bcosify`` / ``gte eval``; refusals of what has no B-cos form.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bcos.modules.norms.uncentered_norms.batchnorm_uncentered import BatchNormUncentered2d

from gte.config import DistillConfig
from gte.errors import GteError
from gte.explain import explain_with_logits
from gte.methods import Batch
from gte.methods.e2kd import E2KD
from gte.models import bcosify, build_model, info, load_model, save_model, to_model_input, with_spec
from gte.models.external import facts
from gte.models.registry import external_info
from gte.onepass import OnePass, supports_one_pass
from tests._fixtures import one_line_exit_2
from tests.test_exact_gradient import (_assert_close_to_scale, _fd_errors, _grads, _setup, _terms,
                                       assert_one_pass_equals_official, official_e2kd_backward)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_vgg(num_classes: int = 10) -> nn.Module:
    """torchvision's VGG class (features with max pooling, adaptive 7×7 pooling, a 3-layer classifier), narrow."""
    import torchvision

    with torch.device("meta"):  # VGG's own classifier is 120 M parameters: built on meta, then replaced
        net = torchvision.models.VGG(torchvision.models.vgg.make_layers([8, "M", 16, "M"], batch_norm=True))
    net.features = torchvision.models.vgg.make_layers([8, "M", 16, "M"], batch_norm=True)
    net.classifier = nn.Sequential(nn.Linear(16 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                   nn.ReLU(True), nn.Dropout(), nn.Linear(32, num_classes))
    net.gte_info = external_info("torchvision/vgg11_bn", num_classes, facts(net, "torchvision/vgg11_bn"))
    return net


def original(arch: str, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    net = small_vgg(num_classes) if arch == "vgg" else build_model(arch, num_classes)
    with torch.no_grad():  # pretrained-like statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return net.double().eval()


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The uncentered norms' running variances set to this batch's (B-cos activations have their own scale)."""
    for m in model.modules():
        if isinstance(m, BatchNormUncentered2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


CONVERTED = ["cifar_resnet20", "resnet18", "torchvision/densenet121", "torchvision/mobilenet_v2", "vgg",
             "timm/tf_efficientnet_lite0", "timm/densenet121"]


@pytest.mark.parametrize("arch", CONVERTED)
def test_logit_is_the_sum_of_contributions_and_no_bias_is_left(arch):
    net = original(arch)
    model = bcosify(net)
    mi = info(model)
    assert (mi.bcos, mi.bcosified, mi.explainer, mi.arch) == (True, True, "bcos", f"bcosify/{info(net).arch}")
    assert (mi.mean, mi.std, mi.input_size) == (info(net).mean, info(net).std, info(net).input_size)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert all(getattr(m, "bias", None) in (None, False) for m in model.modules())
    assert supports_one_pass(model)
    assert not any(isinstance(m, (nn.ReLU6, nn.MaxPool2d, nn.Linear, nn.BatchNorm2d)) and
                   not isinstance(m, BatchNormUncentered2d) for m in model.modules())
    x = to_model_input(mi, torch.rand(3, 3, 32, 32, dtype=torch.float64))
    calibrated(model, x)
    classes = torch.tensor([0, 3, 7])
    maps, logits = explain_with_logits(model, x, classes, "bcos")
    want = logits.gather(1, classes[:, None])[:, 0] - model.logit_bias
    assert want.abs().max() > 1e-6  # a network whose logits carry signal, not the bias alone
    torch.testing.assert_close((maps * x).sum((1, 2, 3)), want, rtol=1e-9, atol=1e-14)
    assert model.logit_bias == pytest.approx(-math.log(9))
    one = OnePass(model.train(), x)  # training mode (batch statistics), W(x) from the one-pass student forward
    torch.testing.assert_close((one.explain(classes) * x).sum((1, 2, 3)) + model.logit_bias,
                               one.logits.gather(1, classes[:, None])[:, 0], rtol=1e-9, atol=1e-12)


def _bias_free(net: nn.Module) -> nn.Module:
    """``net`` with every bias, BN β and running mean zero, ReLU6 → ReLU and max pooling → average pooling of the
    same geometry: the function B = 1 must keep."""
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.ReLU())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return net


@pytest.mark.parametrize("arch", ["cifar_resnet20", "resnet18", "torchvision/densenet121", "vgg",
                                  "timm/tf_efficientnet_lite0", "timm/resnet18"])
def test_b1_without_biases_computes_the_original_function(arch):
    net = _bias_free(original(arch))
    model = bcosify(net, b=1).eval()
    assert info(model).arch == f"bcosify-b1/{info(net).arch}"
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = net(to_model_input(info(net), images))
        got = model(to_model_input(info(model), images)) - model.logit_bias
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


# ------------------------------------------------------------ the conversion written here from the paper
def _bconv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """B = 2 with the weight as it is: (w·x)·|w·x| / √(Σ_patch x² + 1e-6)."""
    a = F.conv2d(x, w, None, stride, padding)
    ones = torch.ones(1, x.shape[1], *w.shape[2:], dtype=x.dtype)
    return a * a.abs() / (F.conv2d(x * x, ones, None, stride, padding) + 1e-6).sqrt()


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, mode: str) -> torch.Tensor:
    """Uncentered: γ·x/√(var + ε), no β, no mean; ``mode`` "calibrate" stores the batch variance as running_var."""
    if mode == "eval":
        var = bn.running_var
    else:
        var = x.var((0, 2, 3), unbiased=False)
        if mode == "calibrate":
            bn.running_var.copy_(var)
    return x * (bn.weight / (var + bn.eps).sqrt())[None, :, None, None]


def _six(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w, -w], dim=1) / 2


def _head(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    return _bconv(x, fc.weight[:, :, None, None]).mean((2, 3)) - math.log(fc.out_features - 1)


def paper_resnet(net: nn.Module, z: torch.Tensor, mode: str) -> torch.Tensor:
    x = F.avg_pool2d(F.relu(_bn(_bconv(z, _six(net.conv1.weight), 2, 3), net.bn1, mode)), 3, 2, 1)
    for block in (*net.layer1, *net.layer2, *net.layer3, *net.layer4):
        out = F.relu(_bn(_bconv(x, block.conv1.weight, block.stride, 1), block.bn1, mode))
        out = _bn(_bconv(out, block.conv2.weight, 1, 1), block.bn2, mode)
        if block.downsample is not None:
            x = _bn(_bconv(x, block.downsample[0].weight, block.stride), block.downsample[1], mode)
        x = F.relu(out + x)
    return _head(x, net.fc)


def paper_densenet(net: nn.Module, z: torch.Tensor, mode: str) -> torch.Tensor:
    f = net.features
    x = F.avg_pool2d(F.relu(_bn(_bconv(z, _six(f.conv0.weight), 2, 3), f.norm0, mode)), 3, 2, 1)
    for i in range(1, 5):
        feats = [x]
        for layer in f.get_submodule(f"denseblock{i}").values():
            h = _bconv(F.relu(_bn(torch.cat(feats, 1), layer.norm1, mode)), layer.conv1.weight)
            feats.append(_bconv(F.relu(_bn(h, layer.norm2, mode)), layer.conv2.weight, 1, 1))
        x = torch.cat(feats, 1)
        if i < 4:
            t = f.get_submodule(f"transition{i}")
            x = F.avg_pool2d(_bconv(F.relu(_bn(x, t.norm, mode)), t.conv.weight), 2, 2)
    return _head(F.relu(_bn(x, f.norm5, mode)), net.classifier)


@pytest.mark.parametrize("arch,paper", [("resnet18", paper_resnet), ("torchvision/densenet121", paper_densenet)])
def test_torchvision_conversion_equals_the_paper_written_here(arch, paper):
    net = original(arch)
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    mean, std = torch.tensor(info(net).mean, dtype=torch.float64), torch.tensor(info(net).std, dtype=torch.float64)
    z = (torch.cat([images, 1 - images], 1) - torch.cat([mean, 1 - mean])[:, None, None]) / \
        torch.cat([std, std])[:, None, None]
    with torch.no_grad():
        paper(net, z, "calibrate")  # the original's running variances: the B-cos activations' own scale
        model = bcosify(net)
        x = to_model_input(info(model), images)
        torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-12)
        for mode in ("eval", "train"):
            want = paper(net, z, mode)
            got = model.train(mode == "train")(x)
            assert (want + math.log(9)).abs().max() > 1e-3
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------ the e2KD gradient of a B-cosified student
STUDENTS = [("bcosify/cifar_resnet20", 16), ("bcosify/timm/tf_efficientnet_lite0", 32),
            ("bcosify/torchvision/densenet121", 32)]


@pytest.mark.parametrize("arch,size", STUDENTS[:2])  # the DenseNet: through the official formulation below
def test_kd_and_explanation_gradients_equal_finite_differences(arch, size):
    """Smaller steps than for B-cos networks from scratch: ReLU is a kink in the first order (B-cos' a·|a| is C¹)
    and these students' directional derivatives reach ~1e4, so for h ≥ 1e-8 some ReLU input crosses 0 within ±h
    (measured on the DenseNet: the FD converges to the analytic value as h shrinks, 2e-2 at 1e-8, 8e-6 at 1e-10)."""
    model, x, t_logits, t_maps, classes = _setup(arch, size)
    g_kd = _grads(model, _terms(model, x, t_logits, t_maps, classes)[0])
    g_exp = _grads(model, _terms(model, x, t_logits, t_maps, classes)[1])
    fd = dict(hs=(1e-9, 1e-10, 1e-11), n_dirs=2 if "cifar" in arch else 1)  # one direction: 6 s for the larger
    assert max(_fd_errors(model, x, t_logits, t_maps, classes, g_kd, term=0, **fd)) <= 1e-5
    assert max(_fd_errors(model, x, t_logits, t_maps, classes, g_exp, term=1, **fd)) <= 1e-5


@pytest.mark.parametrize("arch,size", STUDENTS)
def test_one_pass_equals_the_official_formulation(arch, size):
    """To float64 round-off, which these deep ReLU networks amplify more than B-cos networks from scratch (measured:
    parameter gradients 1.1e-9 of their scale on the DenseNet, running variances 1.5e-12 and logits 1.5e-10 on the
    EfficientNet, whose batch variances gte computes in two passes and the official modules with ``Tensor.var``)."""
    assert_one_pass_equals_official(*_setup(arch, size, seed=1), grad_rel=1e-8, buffer_rtol=1e-10, value_rtol=1e-9)


def test_e2kd_step_between_bcosified_models_equals_the_official_formulation():
    """Through the method: a B-cosified teacher's W(x) of its top-1 class (its own normalised input), a B-cosified
    student with another mean/std — the official gradient."""
    torch.manual_seed(4)
    student = build_model("bcosify/cifar_resnet20", 10).double().train()
    with_spec(student, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    ref = copy.deepcopy(student)
    teacher = calibrated(build_model("bcosify/cifar_resnet20", 10).double(), torch.rand(8, 6, 16, 16,
                                                                                          dtype=torch.float64))
    images = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    method = E2KD(DistillConfig(method="e2kd", lambda_exp=2.0, temperature=2.0), student, teacher)
    loss, _ = method.loss(Batch(images, torch.randint(0, 10, (4,))))
    loss.backward()
    t_maps, t_logits = explain_with_logits(teacher, to_model_input(info(teacher), images), None, "bcos")
    official_e2kd_backward(ref, to_model_input(info(student), images), t_logits.argmax(1), t_logits, t_maps, 2.0)
    for (name, p), q in zip(ref.named_parameters(), student.parameters()):
        _assert_close_to_scale(q.grad, p.grad, 1e-9, name)


# ------------------------------------------------------------ files, commands, refusals
def test_model_file_round_trip_and_cli(tmp_path, monkeypatch, capsys):
    from test_readme_flows import gte

    net = original("cifar_resnet20", 4).float()
    with_spec(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), class_names=["a", "b", "c", "d"])
    save_model(net, tmp_path / "std.safetensors")
    out = gte(["bcosify", str(tmp_path / "std.safetensors"), "--out", str(tmp_path / "b.safetensors")])
    assert "bcosify/cifar_resnet20" in out and "biases dropped" in out
    model = load_model(str(tmp_path / "b.safetensors")).eval()
    mi = info(model)
    assert (mi.arch, mi.bcos, mi.bcosified, mi.explainer, mi.class_names, mi.mean, mi.std) == (
        "bcosify/cifar_resnet20", True, True, "bcos", ("a", "b", "c", "d"), (0.5,) * 3, (0.25,) * 3)
    images = torch.rand(2, 3, 32, 32)
    direct = bcosify(net).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(to_model_input(mi, images)), direct(to_model_input(info(direct), images)))
    code = one_line_exit_2(["bcosify", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "c.safetensors")],
                           monkeypatch, capsys, "bcosify/cifar_resnet20 is a B-cos network already")
    assert code


def test_recipe_fine_tunes_with_the_paper_optimiser_and_the_original_as_kd_teacher(tmp_path, monkeypatch, capsys):
    import tomllib

    from gte.data.synthetic import write_synthetic_split
    from test_readme_flows import gte

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GTE_HOME", str(tmp_path / "home"))
    spec = write_synthetic_split(tmp_path, "test", 16, image_size=32, num_classes=4)
    torch.manual_seed(0)
    save_model(build_model("cifar_resnet20", 4), tmp_path / "std.safetensors")
    (tmp_path / "r.toml").write_text(f'[data]\ntrain = "{spec}"\nnum_classes = 4\nimage_size = 32\nnum_workers = 0\n'
                                     '[student]\narch = "cifar_resnet20"\n[optim]\nlr = 0.1\nepochs = 1\n'
                                     'batch_size = 8\n[run]\nout = "run"\n')
    one_line_exit_2(["bcosify", "std.safetensors", "--out", "b.safetensors", "--set", "distill.method=kd"],
                    monkeypatch, capsys, "--set changes the fine-tuning recipe: give --recipe as well")
    gte(["bcosify", "std.safetensors", "--out", "b.safetensors", "--recipe", "r.toml", "--set", "distill.method=kd"])
    r = tomllib.loads((tmp_path / "run" / "recipe.toml").read_text())
    assert (r["student"]["arch"], r["student"]["weights"]) == ("bcosify/cifar_resnet20", "b.safetensors")
    assert (r["teacher"]["arch"], r["teacher"]["weights"], r["distill"]["method"]) == (
        "cifar_resnet20", "std.safetensors", "kd")
    assert (r["optim"]["name"], r["optim"]["lr"], r["optim"]["warmup_epochs"], r["optim"]["clip"]) == (
        "adam", 1e-4, 0.0, "agc")
    mi = info(load_model("run/model.safetensors"))
    assert (mi.arch, mi.bcos, mi.bcosified) == ("bcosify/cifar_resnet20", True, True)


def test_eval_compares_bcosified_explanations(tmp_path):
    from gte.config import DataConfig
    from gte.data.synthetic import write_synthetic_split
    from gte.evaluate import evaluate

    spec = write_synthetic_split(tmp_path, "test", 8, image_size=32, num_classes=4)
    torch.manual_seed(0)
    save_model(bcosify(build_model("cifar_resnet20", 4)), tmp_path / "b.safetensors")
    model = load_model(str(tmp_path / "b.safetensors"))
    metrics = evaluate(model, spec, data=DataConfig(image_size=32, eval_resize=32, num_workers=0), teacher=model,
                       batch_size=4)
    assert metrics["explanation_similarity"] == pytest.approx(1.0) and 0.0 <= metrics["epg"] <= 1.0


@pytest.mark.parametrize("arch,needle", [("timm/efficientnet_b0", "SiLU"), ("timm/seresnet18", "SEModule"),
                                         ("timm/convnext_atto", "ConvNeXt"),
                                         ("torchvision/mobilenet_v3_small", "MobileNetV3")])
def test_what_has_no_bcos_form_is_refused_in_one_line(arch, needle):
    with pytest.raises(GteError) as e:
        bcosify(build_model(arch, 4))
    line = str(e.value)
    assert "\n" not in line and needle in line and line.startswith(f"cannot B-cosify {arch}: ")


def test_cli_refusal_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    torch.save(build_model("timm/efficientnet_b0", 4).state_dict(), tmp_path / "b0.pth")
    one_line_exit_2(["bcosify", str(tmp_path / "b0.pth"), "--arch", "timm/efficientnet_b0", "--out",
                     str(tmp_path / "x.safetensors")], monkeypatch, capsys, "cannot B-cosify timm/efficientnet_b0",
                    "SiLU")
    assert not (tmp_path / "x.safetensors").exists()


def test_bcosify_names_are_architectures():
    from gte.models import check_arch, is_bcos

    assert is_bcos("bcosify/resnet18") and is_bcos("bcosify/timm/tf_efficientnet_lite0")
    with pytest.raises(GteError, match="unknown model 'resnet1'"):
        check_arch("bcosify/resnet1")
    with pytest.raises(GteError, match="bcosify/<arch>"):
        check_arch("bcosify-bx/resnet18")
