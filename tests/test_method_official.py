"""Methods equal to their official code by default (issue 20 A): the settings and the loss each method builds from a
recipe that names only the method, against formulas written in the tests from the official repositories (file and
line cited in each test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gte.config import from_dict, load_recipe
from gte.methods import METHODS, Batch, Context, build_method
from gte.models import build_model, info, to_model_input

from _fixtures import run_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
C = 5


def _models(arch: str = "cifar_resnet20", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    student, teacher = build_model(arch, C).to(dtype).train(), build_model(arch, C).to(dtype)
    teacher.eval().requires_grad_(False)
    return student, teacher


def _batch(seed: int = 1, size: int = 16, dtype=torch.float32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(4, 3, size, size, generator=g).to(dtype), torch.randint(0, C, (4,), generator=g),
                 epoch=0.5, indices=torch.arange(4))


def _logits(model, images):
    """The model's logits as the method's passes compute them (student in train mode: same BN batch statistics)."""
    with torch.no_grad():
        return model(to_model_input(info(model), images))


# ------------------------------------------------------------------------------------------------ A1 logit_std
def _official_normalize(logit):
    """github:sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py l. 7-10."""
    return (logit - logit.mean(dim=-1, keepdim=True)) / (1e-7 + logit.std(dim=-1, keepdim=True))


def _official_kd(s, t, temperature):
    """KD.py l. 12-19 (logit_stand on)."""
    log_ps = F.log_softmax(_official_normalize(s) / temperature, dim=1)
    pt = F.softmax(_official_normalize(t) / temperature, dim=1)
    return F.kl_div(log_ps, pt, reduction="none").sum(1).mean() * temperature ** 2


def _official_dkd(s, t, target, alpha, beta, temperature):
    """DKD.py l. 12-58 (logit_stand on): TCKD on [p_t, Σ_other p] and NCKD with the −1000 gt mask."""
    s, t = _official_normalize(s), _official_normalize(t)
    gt = torch.zeros_like(s).scatter_(1, target[:, None], 1).bool()
    ps, pt = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], 1)  # noqa: E731
    tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction="sum") * temperature ** 2 / len(target)
    pt2 = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    log_ps2 = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_ps2, pt2, reduction="sum") * temperature ** 2 / len(target)
    return alpha * tckd + beta * nckd


def test_logit_std_alone_is_the_papers_imagenet_kd_setting():
    """``--logit-stand --base-temp 2 --kd-weight 9`` on configs/imagenet/r34_r18/kd.yaml (README l. 119): tools/train.py
    l. 102-114 set KD.TEMPERATURE 2 and KD.LOSS.KD_WEIGHT 9; kd.yaml l. 26 keeps CE_WEIGHT 1.0; the loss is
    KD.py l. 38-41: CE_WEIGHT · CE + KD_WEIGHT · kd_loss."""
    student, teacher = _models()
    cfg = from_dict({"distill": {"method": "kd", "logit_std": True}}).distill
    method = build_method(cfg, student, teacher)
    assert (method.cfg.temperature, method.options.weight, method.ce_weight) == (2.0, 9.0, 1.0)
    batch = _batch()
    loss, _ = method.loss(batch)
    s, t = _logits(student, batch.images), _logits(teacher, batch.images)
    expected = 1.0 * F.cross_entropy(s, batch.labels) + 9.0 * _official_kd(s, t, 2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_logit_std_alone_is_the_papers_imagenet_dkd_setting():
    """tools/train.py l. 115-118: DKD.ALPHA and DKD.BETA times KD weight 9, DKD.T = 2; configs/imagenet/r34_r18/dkd.yaml
    l. 27-30 (CE 1, BETA 0.5, WARMUP 1) and mdistiller/engine/cfg.py l. 165 (ALPHA 1.0): α 9, β 4.5; DKD.py l. 79-88
    adds CE_WEIGHT · CE and the ramp min(epoch / WARMUP, 1) (1 in the first epoch, counted from 1)."""
    student, teacher = _models()
    method = build_method(from_dict({"distill": {"method": "dkd", "logit_std": True}}).distill, student, teacher)
    o = method.options
    assert (method.cfg.temperature, o.alpha, o.beta, method.ce_weight) == (2.0, 9.0, 4.5, 1.0)
    batch = _batch()
    loss, _ = method.loss(batch)
    s, t = _logits(student, batch.images), _logits(teacher, batch.images)
    expected = F.cross_entropy(s, batch.labels) + _official_dkd(s, t, batch.labels, 9.0, 4.5, 2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_keys_a_recipe_sets_keep_their_values_through_extends_and_set(tmp_path):
    """A key given in the file, in the recipe it extends or by --set is not replaced by the paper setting."""
    (tmp_path / "base.toml").write_text('[distill]\nmethod = "kd"\ntemperature = 1.0\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[distill]\nlogit_std = true\n'
                                         '[distill.options]\nweight = 3.0\n')
    student, teacher = _models()
    m = build_method(load_recipe(str(tmp_path / "child.toml")).distill, student, teacher)
    assert (m.cfg.temperature, m.options.weight, m.ce_weight) == (1.0, 3.0, 1.0)
    m = build_method(load_recipe(str(tmp_path / "child.toml"), ["distill.ce_weight=0.0"]).distill, student, teacher)
    assert (m.cfg.temperature, m.ce_weight) == (1.0, 0.0)
    m = build_method(from_dict({"distill": {"method": "kd"}}).distill, student, teacher)  # no logit_std: as before
    assert (m.cfg.temperature, m.options.weight, m.ce_weight) == (1.0, 1.0, 0.0)


def test_dry_run_shows_the_resolved_logit_std_setting(tmp_path, monkeypatch, capsys):
    (tmp_path / "r.toml").write_text('[distill]\nmethod = "kd"\n')
    _, out, _ = run_main(["distill", "--recipe", str(tmp_path / "r.toml"), "--set", "distill.logit_std=true",
                          "--dry-run"], monkeypatch, capsys)
    assert "temperature = 2.0" in out and "ce_weight = 1.0" in out, out
    assert "weight = 9.0" in out.split("[distill.options]")[1], out


# ------------------------------------------------------------------------------------------------ A2 cat_kd
def _official_cams(model, images):
    """github:GzyAftermath/CAT-KD mdistiller/models/imagenet/resnet.py l. 207 and 269: the CAMs are a bias-free 1×1
    convolution (the classifier's weight) of ReLU(the last stage's map); l. 271-272: the logits are their average."""
    feats = {}
    handle = model.get_submodule(info(model).gradcam_layer).register_forward_hook(
        lambda m, i, o: feats.__setitem__("last", o))
    try:
        model(to_model_input(info(model), images))
    finally:
        handle.remove()
    w = model.get_submodule(info(model).head).weight
    return F.conv2d(F.relu(feats["last"]), w[:, :, None, None])


def test_cat_kd_student_logits_are_the_mean_of_its_cams_and_the_loss_is_the_officials():
    """Logits = spatial mean of the CAMs (no bias), and L = CE + β·CAT_loss with CAT_loss the MSE of the 4×4-pooled
    maps (CAT_KD.py l. 54-60 and l. 77-81; configs/imagenet/CAT-KD/r34_r18.yaml: β 0.5, P 4, no normalisation)."""
    student, teacher = _models()
    method = build_method(from_dict({"distill": {"method": "cat_kd"}}).distill, student, teacher)
    batch = _batch(size=32)
    loss, _ = method.loss(batch)
    with torch.no_grad():
        cams_s, cams_t = _official_cams(student, batch.images), _official_cams(teacher, batch.images)
        logits = student(to_model_input(info(student), batch.images))
    torch.testing.assert_close(logits, cams_s.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    pool = lambda c: F.adaptive_avg_pool2d(c, (4, 4))  # noqa: E731
    expected = F.cross_entropy(cams_s.mean(dim=(2, 3)), batch.labels) + 0.5 * F.mse_loss(pool(cams_s), pool(cams_t))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.fc.bias.grad is None and not student.fc.bias.any()  # stays bias-free while training
    kept = build_method(from_dict({"distill": {"method": "cat_kd", "options": {"head_bias": True}}}).distill,
                        *_models(seed=1))
    assert kept.student.fc.bias.requires_grad and kept.student.fc.bias.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ A3 reviewkd
def test_reviewkd_taps_post_relu_stage_outputs_by_default_as_the_authors_imagenet_code():
    """github:dvlab-research/ReviewKD ImageNet/models/resnet.py l. 217-227: ``x2 = self.relu(x1)`` with an in-place ReLU
    (l. 155) overwrites each kept stage feature, so the distilled features are the stages' outputs after a ReLU; the
    last one is the average pool of the ReLU'd last map (l. 229). ``taps = "pre_relu"`` gives the features before the
    last block's ReLU (mdistiller's ``preact_feats``)."""
    from gte.methods.passes import StudentPass

    student, teacher = _models()
    batch = _batch()
    stages = list(info(student).stages)

    def run(options: dict) -> tuple[list[torch.Tensor], dict]:
        method = build_method(from_dict({"distill": {"method": "reviewkd", "options": options}}).distill, student,
                              teacher)
        outs = {}
        handles = [student.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: outs.__setitem__(n, o.clone())) for n in stages]
        try:
            return StudentPass(student, batch.images, method.student_layers, None).features, outs
        finally:
            for h in handles:
                h.remove()

    post, outs = run({})
    assert len(post) == len(stages) + 1
    for got, name in zip(post, stages):
        torch.testing.assert_close(got, F.relu(outs[name]), rtol=0, atol=0)  # the official x1…x4
    torch.testing.assert_close(post[-1].mean(dim=(2, 3)), F.relu(outs[stages[-1]]).mean(dim=(2, 3)))
    pre, _ = run({"taps": "pre_relu"})
    for before, got in zip(pre, post[:-1]):
        torch.testing.assert_close(F.relu(before), got, rtol=0, atol=0)
        assert (before < 0).any()  # pre_relu really is before the ReLU


# ------------------------------------------------------------------------------------------------ A4 float64
FEATURE_METHODS = [name for name, cls in METHODS.items() if cls.needs.student_features or cls.needs.teacher_features]


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_feature_methods_build_and_train_on_float64_models(name):
    """The shape probe and the trainable parts follow the models' dtype (a float32 probe met float64 weights)."""
    assert {"at", "cat_kd", "reviewkd", "crd"} <= set(FEATURE_METHODS)
    student, teacher = _models(dtype=torch.float64)
    options = {"nce_k": 8} if name == "crd" else {}
    method = build_method(from_dict({"distill": {"method": name, "options": options}}).distill, student, teacher,
                          Context(n_data=8, image_size=16))
    loss, _ = method.loss(_batch(dtype=torch.float64))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float64 and torch.isfinite(p.grad).all())
               for p in student.parameters())
    if method.parts is not None:
        assert all(p.dtype == torch.float64 for p in method.parts.parameters())


# ------------------------------------------------------------------------------------------------ B11-B13
@pytest.mark.parametrize("method, option, value, what", [
    ("crd", "feat_dim", 0, ">= 1"), ("crd", "nce_k", 0, ">= 1"), ("crd", "nce_t", 0.0, "> 0"),
    ("crd", "nce_m", 1.0, "in [0, 1)"), ("crd", "nce_m", -0.1, "in [0, 1)"), ("crd", "negatives", "all", "'uniform'"),
    ("crd", "weight", -1.0, ">= 0"), ("cat_kd", "pool_size", 0, ">= 1"), ("cat_kd", "weight", -0.5, ">= 0"),
    ("reviewkd", "mid_channel", -1, ">= 0"), ("reviewkd", "warmup_epochs", -5.0, ">= 0"),
    ("reviewkd", "taps", "both", "'pre_relu'"), ("kd", "weight", -1.0, ">= 0"), ("e2kd", "weight", -1.0, ">= 0"),
    ("dist", "weight", -2.0, ">= 0"), ("dist", "beta", -1.0, ">= 0"), ("dist", "gamma", -1.0, ">= 0"),
    ("dkd", "alpha", -1.0, ">= 0"), ("dkd", "beta", -1.0, ">= 0"), ("dkd", "warmup_epochs", -1.0, ">= 0"),
    ("at", "p", 0.0, "> 0"), ("at", "weight", -1.0, ">= 0"),
    ("at", "p", float("nan"), "finite"), ("kd", "weight", float("inf"), "finite"),
    ("crd", "nce_t", float("nan"), "finite"),
])
def test_method_options_out_of_range_are_one_line(method, option, value, what):
    """Each Options field declares its range beside it (gte.methods.base.option); parse_options checks them all."""
    from gte.errors import GteError
    from gte.validate import problems

    recipe = from_dict({"distill": {"method": method, "options": {option: value}}})
    found = [p for p in problems(recipe) if "distill.options" in p]
    assert len(found) == 1 and f"distill.options.{option}" in found[0] and what in found[0], found
    with pytest.raises(GteError, match=f"distill.options.{option}"):
        build_method(recipe.distill, *_models(), Context(n_data=8, image_size=16))


def test_a_negative_reviewkd_warmup_is_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    from _fixtures import one_line_exit_2

    (tmp_path / "r.toml").write_text('[distill]\nmethod = "reviewkd"\n[distill.options]\nwarmup_epochs = -5.0\n'
                                     '[student]\narch = "cifar_resnet20"\n')
    one_line_exit_2(["distill", "--recipe", str(tmp_path / "r.toml")], monkeypatch, capsys,
                    "distill.options.warmup_epochs", ">= 0", "-5.0")
    code, _, err = run_main(["distill", "--recipe", str(tmp_path / "r.toml"), "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "distill.options.warmup_epochs" in err and "Traceback" not in err


def test_a_tapped_layer_without_a_spatial_map_is_one_line():
    from gte.errors import GteError

    student, teacher = _models()
    cfg = from_dict({"distill": {"method": "at", "student_layers": ["layer1", "fc"],
                                 "teacher_layers": ["layer1", "layer3"]}}).distill
    with pytest.raises(GteError, match=r"at needs a spatial map .* student layer 'fc' gives N×5") as e:
        build_method(cfg, student, teacher, Context(image_size=16))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["at", "crd", "reviewkd"])
@pytest.mark.parametrize("layer", [":in", "stem:in"])
def test_taps_of_the_input_image_are_refused(method, layer):
    """``"<module>:in"`` taps a module's input: of the model itself, or of its first convolution, that is the image."""
    from gte.errors import GteError

    student, teacher = _models()
    n = 1 if method == "crd" else 3
    layers = [layer] + ["layer2", "layer3"][: n - 1]
    cfg = from_dict({"distill": {"method": method, "student_layers": layers, "teacher_layers": ["layer1", "layer2",
                                                                                              "layer3"][:n],
                                 "options": {"nce_k": 8} if method == "crd" else {}}}).distill
    with pytest.raises(GteError, match=f"'{layer}' taps the student's input image"):
        build_method(cfg, student, teacher, Context(n_data=8, image_size=16))


# ------------------------------------------------------------------------------------------------ A5 GradCAM layer
MOBILENET = "torchvision/mobilenet_v3_small"
SE_LAYER = "features.8"  # a block whose successors gate with hard-sigmoid squeeze-excitation


def test_a_gradcam_layer_without_a_second_derivative_is_one_line_at_setup():
    """PyTorch has no derivative of hardsigmoid_backward: GradCAM at a MobileNetV3 block before an SE gate cannot be
    trained through; the architecture's own layer ('features', after the last SE) can."""
    from gte.errors import GteError
    from gte.models import with_spec

    torch.manual_seed(0)
    student, teacher = build_model(MOBILENET, C), build_model(MOBILENET, C).eval().requires_grad_(False)
    with_spec(student, gradcam_layer=SE_LAYER)
    cfg = from_dict({"distill": {"method": "e2kd", "explainer": "gradcam"}}).distill
    with pytest.raises(GteError) as e:
        build_method(cfg, student, teacher, Context(image_size=32))
    line = str(e.value)
    assert "\n" not in line and f"'{SE_LAYER}'" in line and "hardsigmoid" in line
    assert 'student.explain_layer = "features"' in line
    with_spec(student, gradcam_layer="features")
    method = build_method(cfg, student, teacher, Context(image_size=32))
    loss, _ = method.loss(_batch(size=32))
    loss.backward()  # the suggested layer does train


def test_dry_run_names_a_gradcam_layer_without_a_second_derivative(tmp_path, monkeypatch, capsys):
    from gte.validate import problems

    text = (f'[student]\narch = "{MOBILENET}"\nexplain_layer = "{SE_LAYER}"\n[teacher]\narch = "{MOBILENET}"\n'
            f'[data]\nnum_classes = {C}\n[distill]\nmethod = "e2kd"\n')
    (tmp_path / "r.toml").write_text(text)
    assert any(f"'{SE_LAYER}'" in p and "hardsigmoid" in p for p in problems(load_recipe(str(tmp_path / "r.toml"))))
    code, _, err = run_main(["distill", "--recipe", str(tmp_path / "r.toml"), "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    hits = [x for x in err.splitlines() if "hardsigmoid" in x]
    assert len(hits) == 1 and f"'{SE_LAYER}'" in hits[0] and 'explain_layer = "features"' in hits[0], err
