"""Any timm or torchvision classifier by name (``timm/<name>``, ``torchvision/<name>``): built, run, explained with
GradCAM at the automatically found layer (a different class per sample), and distilled with e2KD — one step whose
finite gradient reaches the student only. Tiny inputs, one thread. (GradCAM of these models equals pytorch-grad-cam's:
tests/test_explain.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gte.config import DistillConfig
from gte.errors import GteError
from gte.explain import explain
from gte.methods import Batch, build_method
from gte.models import build_model, check_arch, freeze, info, load_model, save_model, to_model_input

CNNS = {  # name -> (input size, the layer GradCAM must find: the map global pooling sees)
    "timm/resnet18": (64, "layer4"),
    "timm/mobilenetv3_small_050": (64, "blocks"),
    "timm/tf_efficientnet_lite0": (64, "bn2"),
    "timm/convnext_atto": (64, "stages"),
    "torchvision/resnet18": (64, "layer4"),
    "torchvision/mobilenet_v3_small": (64, "features"),
    "torchvision/efficientnet_b0": (64, "features"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", list(CNNS))
def test_a_cnn_by_name_builds_explains_and_distils(name):
    size, layer = CNNS[name]
    torch.manual_seed(0)
    student = build_model(name, 4).train()
    assert info(student).gradcam_layer == layer and not info(student).bcos
    images = torch.rand(3, 3, size, size)
    x = to_model_input(info(student), images)
    assert student(x).shape == (3, 4)
    classes = torch.tensor([0, 2, 3])
    maps = explain(student.eval(), x, classes, "gradcam")
    assert maps.shape == (3, 1, size, size) and torch.isfinite(maps).all()
    alone = explain(student, x[1:2], classes[1:2], "gradcam")  # one sample's map is its own class's
    torch.testing.assert_close(maps[1:2], alone, rtol=1e-4, atol=1e-6)
    student.train()
    teacher = freeze(build_model(name, 4))
    method = build_method(DistillConfig(method="e2kd", explainer="gradcam", lambda_exp=5.0), student, teacher)
    loss, logs = method.loss(Batch(images, torch.tensor([0, 1, 2])))
    assert torch.isfinite(loss) and "exp" in logs
    loss.backward()  # through GradCAM's create_graph: double backward of depthwise convs, SiLU/GELU/ReLU6, LayerNorm
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_external_model_round_trips_through_model_safetensors(tmp_path):
    torch.manual_seed(1)
    model = build_model("timm/tf_efficientnet_lite0", 4).eval()
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(str(tmp_path / "m.safetensors")).eval()
    assert info(again).arch == "timm/tf_efficientnet_lite0" and info(again).mean == (0.5, 0.5, 0.5)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(again(to_model_input(info(again), x)), model(to_model_input(info(model), x)))


def test_a_vit_student_distils_with_e2kd_through_attention():
    """DeiT-Tiny as an e2KD student of a CNN teacher: GradCAM on its patch grid, double backward through attention
    (timm's fused attention is switched off for the explained forward: it has no double backward), GELU, LayerNorm."""
    torch.manual_seed(2)
    vit = build_model("timm/deit_tiny_patch16_224", 4).train()
    teacher = freeze(build_model("timm/resnet18", 4))
    method = build_method(DistillConfig(method="e2kd", explainer="gradcam"), vit, teacher)
    loss, logs = method.loss(Batch(torch.rand(2, 3, 224, 224), torch.tensor([0, 3])))
    loss.backward()
    assert "exp" in logs and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vit.parameters() if p.requires_grad)
    assert all(getattr(m, "fused_attn", True) for m in vit.modules())  # restored after the forward


def test_a_token_model_without_a_found_layer_refuses_gradcam_in_one_line():
    vit = build_model("torchvision/vit_b_16", 4)  # torchvision's ViT: no layer found automatically
    assert info(vit).gradcam_layer is None
    with pytest.raises(GteError, match="no GradCAM layer"):
        build_method(DistillConfig(method="e2kd", explainer="gradcam"), vit, freeze(build_model("timm/resnet18", 4)))


def test_torchvision_swin_map_is_channels_last():
    swin = build_model("torchvision/swin_t", 4).eval()
    assert info(swin).gradcam_layer == "features" and info(swin).map_nhwc
    x = to_model_input(info(swin), torch.rand(1, 3, 64, 64))
    maps = explain(swin, x, torch.tensor([1]), "gradcam")
    assert maps.shape == (1, 1, 64, 64) and torch.isfinite(maps).all()


@pytest.mark.parametrize("name, hint", [("timm/resnet_18", "timm/resnet18"), ("torchvision/resnet19",
                                                                             "torchvision/resnet18"),
                                        ("convnext_tiny", "convnext_tiny")])
def test_unknown_names_suggest_from_every_source(name, hint):
    with pytest.raises(GteError, match=f"unknown model '{name}'.*did you mean.*{hint}"):
        check_arch(name)


def test_cli_names_an_unknown_timm_model_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "gte", "distill", "--recipe", "demo", "--set", "data.train=x-*.tar",
                          "--set", "student.arch=timm/resnet_18", "--dry-run"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown model 'timm/resnet_18'; did you mean timm/resnet18" in res.stderr


@pytest.mark.parametrize("method", ["at", "cat_kd", "crd", "reviewkd", "dkd+e2kd"])
def test_every_feature_method_runs_on_a_timm_pair(method):
    """EfficientNet-Lite0 student, ResNet-18 teacher (timm): stages from feature_info, the pooled map at bn2 (what
    the classifier reads, not the last block), trainable parts sized from a probe."""
    from gte.methods import Context

    torch.manual_seed(3)
    student = build_model("timm/tf_efficientnet_lite0", 4).train()
    teacher = freeze(build_model("timm/resnet18", 4))
    cfg = DistillConfig(method=method, explainer="gradcam", options={"nce_k": 8} if method == "crd" else {})
    m = build_method(cfg, student, teacher, Context(n_data=16, image_size=64))
    loss, _ = m.loss(Batch(torch.rand(2, 3, 64, 64), torch.tensor([0, 3]), indices=torch.tensor([1, 9])))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_cat_kd_refuses_a_head_that_does_not_read_the_last_map():
    student = build_model("timm/mobilenetv3_small_050", 4)  # global pool, then a 1×1 conv, then the classifier
    with pytest.raises(GteError, match="classifier reads 1024 channels"):
        build_method(DistillConfig(method="cat_kd"), student, freeze(build_model("timm/resnet18", 4)))
