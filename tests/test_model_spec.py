"""The model spec travels with the model: input size, eval resize (crop fraction), interpolation, mean/std, explanation
layer and class names are written into ``model.safetensors`` and read back by ``load_model`` / ``build_model`` and so
by eval, explain and precompute; ``explain_layer`` overrides; the teacher's own resize; ``.pth`` weights in timm's
key format; bad specs and layers are one line, exit 2. Tiny inputs, one thread."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from _fixtures import one_line_exit_2, run_main, write_jpeg_shards
from gte.config import DistillConfig
from gte.errors import GteError
from gte.methods import Batch, Context, build_method
from gte.methods.passes import teacher_pass
from gte.models import (build_model, eval_geometry, freeze, info, load_model, resized, save_model,
                        to_model_input, with_spec)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spec_round_trips_through_model_safetensors(tmp_path):
    torch.manual_seed(0)
    model = with_spec(build_model("timm/resnet18", 3), input_size=40, crop_pct=0.8, interpolation="bicubic",
                      mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25), gradcam_layer="layer3", class_names=["a", "b", "c"])
    save_model(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        spec = json.loads(f.metadata()["input_spec"])  # plain JSON other tools can read
    assert spec["input_size"] == 40 and spec["gradcam_layer"] == "layer3" and spec["interpolation"] == "bicubic"
    back = load_model(str(tmp_path / "m.safetensors"))
    assert info(back) == info(model)
    assert eval_geometry(back) == (40, 50) and eval_geometry(back, 32) == (32, 0)  # flags win
    x = torch.rand(2, 3, 40, 40)
    torch.testing.assert_close(back.eval()(to_model_input(info(back), x)), model.eval()(to_model_input(info(model), x)))
    # the file's mean/std are used (not timm's): the spec is the model's input contract
    assert info(back).mean == (0.5, 0.4, 0.3)
    # build_model with the file as weights (a recipe's teacher.weights) reads the same spec
    assert info(build_model("timm/resnet18", 3, weights=str(tmp_path / "m.safetensors"))) == info(model)


def test_architecture_defaults():
    assert (info(build_model("cifar_resnet20", 2)).input_size, info(build_model("resnet18", 2)).input_size) == (32, 224)
    vit = info(build_model("timm/vit_tiny_patch16_224", 2))
    assert vit.fixed_input_size and vit.interpolation == "bicubic" and vit.crop_pct == 0.9
    eff = info(build_model("torchvision/efficientnet_b0", 2))  # torchvision's weight transforms: 256 → 224, bicubic
    assert (eff.input_size, eff.eval_resize, eff.interpolation) == (224, 256, "bicubic")


@pytest.mark.parametrize("change, needle", [
    ({"gradcam_layer": "layer9"}, "no layer 'layer9'"), ({"input_size": 0}, "input_size"),
    ({"crop_pct": 2.0}, "crop_pct"), ({"interpolation": "lanczos"}, "interpolation"),
    ({"std": (1.0, 0.0, 1.0)}, "std"), ({"class_names": ["a"]}, "1 class names for 2 classes"),
])
def test_bad_specs_are_one_line(change, needle):
    with pytest.raises(GteError, match=needle):
        with_spec(build_model("cifar_resnet20", 2), **change)


def test_a_corrupt_spec_in_a_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from gte.models import model_metadata

    model = build_model("cifar_resnet20", 2)
    meta = model_metadata(model)
    meta["input_spec"] = json.dumps({**json.loads(meta["input_spec"]), "input_size": -3})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(GteError, match="bad.safetensors: cifar_resnet20: input_size -3"):
        load_model(str(tmp_path / "bad.safetensors"))


def test_eval_and_explain_use_the_saved_spec(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = with_spec(build_model("cifar_resnet20", 4), input_size=24, crop_pct=0.75, class_names=list("wxyz"))
    save_model(model, tmp_path / "m.safetensors")
    spec, _ = write_jpeg_shards(tmp_path / "shards", [6], width=40, height=36)
    code, out, err = run_main(["eval", str(tmp_path / "m.safetensors"), "--data", spec, "--json", "-"],
                              monkeypatch, capsys)
    assert code == 0, err
    m = json.loads(out)
    assert (m["image_size"], m["eval_resize"]) == (24, 32)
    from PIL import Image

    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "x.png")
    code, out, err = run_main(["explain", str(tmp_path / "x.png"), "--model", str(tmp_path / "m.safetensors"),
                               "--out", str(tmp_path / "e.png")], monkeypatch, capsys)
    assert code == 0, err
    assert all(n in out for n in "wxyz")  # the spec's class names, no --classes


def test_explain_layer_override_in_training_and_its_errors(tmp_path, monkeypatch, capsys):
    from gte.config import load_recipe
    from gte.engine import build_models

    teacher = tmp_path / "t.safetensors"
    save_model(build_model("resnet18", 4), teacher)
    sets = ["--set", "student.arch=resnet18", "--set", "teacher.arch=resnet18", "--set", f"teacher.weights={teacher}",
            "--set", "data.num_classes=4"]
    r = load_recipe("table1-kd-e2kd", [*sets[1::2], "student.explain_layer=layer3", "teacher.explain_layer=layer3"])
    student, t = build_models(r)
    assert info(student).gradcam_layer == info(t).gradcam_layer == "layer3"
    assert info(student).input_size == 224 and info(student).eval_resize == 256  # the run's geometry
    monkeypatch.chdir(tmp_path)
    one_line_exit_2(["distill", "--recipe", "table1-kd-e2kd", *sets, "--set", "student.explain_layer=layer9"],
                    monkeypatch, capsys, "student.explain_layer", "no layer 'layer9'", "did you mean")
    one_line_exit_2(["distill", "--recipe", "table1-kd-e2kd", *sets, "--set", "student.arch=torchvision/vit_b_16"],
                    monkeypatch, capsys, "has no GradCAM layer", "student.explain_layer")


def test_a_vit_without_a_square_grid_is_one_line():
    import timm

    from gte.explain import explain

    model = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=(32, 48))  # a 2×3 patch grid
    model.gte_info = info(build_model("timm/vit_tiny_patch16_224", 2))

    x = torch.rand(1, 3, 32, 48)  # 2×3 patches: no square grid
    with pytest.raises(GteError, match="do not form a square grid"):
        explain(model.eval(), to_model_input(info(model), x), torch.tensor([0]), "gradcam")


def test_timm_pth_in_its_own_key_format(tmp_path, monkeypatch, capsys):
    import timm

    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=3).eval()  # a timm user's own checkpoint
    torch.save({"state_dict": plain.state_dict()}, tmp_path / "mine.pth")
    model = build_model("timm/resnet18", 3, weights=str(tmp_path / "mine.pth")).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(to_model_input(info(model), x)), plain(to_model_input(info(model), x)))
    # the weights of another architecture: one line, exit 2
    one_line_exit_2(["convert", str(tmp_path / "mine.pth"), "--arch", "timm/mobilenetv3_small_050", "--out",
                     str(tmp_path / "x.safetensors")], monkeypatch, capsys, "does not fit timm/mobilenetv3_small_050")
    code, _, err = run_main(["convert", str(tmp_path / "mine.pth"), "--arch", "timm/resnet18", "--out",
                             str(tmp_path / "mine.safetensors"), "--input-size", "48", "--classes",
                             str(_names(tmp_path, 3))], monkeypatch, capsys)
    assert code == 0, err
    assert info(load_model(str(tmp_path / "mine.safetensors"))).input_size == 48


def _names(tmp_path, n):
    path = tmp_path / "names.json"
    path.write_text(json.dumps([f"n{k}" for k in range(n)]))
    return path


def test_teacher_sees_the_batch_at_its_own_size():
    """``teacher.image_size``: the teacher's logits are those of the resized batch; its GradCAM map comes back at the
    batch's size; the student is untouched."""
    torch.manual_seed(0)
    teacher = freeze(build_model("timm/resnet18", 3))
    images = torch.rand(2, 3, 32, 32)
    t = teacher_pass(teacher, images, [], "gradcam", None, 3, size=48)
    big = resized(images, 48, info(teacher).interpolation)
    assert big.shape[-1] == 48 and 0 <= big.min() and big.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(t.logits, teacher(to_model_input(info(teacher), big)))
    assert t.maps.shape == (2, 1, 32, 32)
    student = build_model("timm/resnet18", 3)
    method = build_method(DistillConfig(method="e2kd", explainer="gradcam"), student, teacher,
                          Context(image_size=32, teacher_size=48))
    loss, logs = method.loss(Batch(images, torch.tensor([0, 1])))
    assert torch.isfinite(loss) and "exp" in logs


def test_eval_runs_the_teacher_at_its_own_size(tmp_path):
    """``gte eval --teacher-image-size``: the teacher's metrics are those of the resized images (as in training with
    ``teacher.image_size``); agreement and explanation similarity compare at the student's size."""
    from gte.config import DataConfig
    from gte.data.loader import make_loader
    from gte.evaluate import EvalOptions, run_eval

    torch.manual_seed(0)
    student, teacher = build_model("cifar_resnet20", 4).eval(), freeze(build_model("timm/resnet18", 4))
    spec, _ = write_jpeg_shards(tmp_path / "shards", [8], width=40, height=36)
    data = DataConfig(image_size=32, num_workers=0)
    m = run_eval(student, spec, data=data, teacher=teacher, options=EvalOptions(teacher_size=48)).metrics
    assert info(teacher).interpolation == "bicubic" and m["teacher_image_size"] == 48 and -1 <= m["explanation_similarity"] <= 1
    (batch,) = list(make_loader(spec, train=False, image_size=32, batch_size=8))
    with torch.no_grad():
        top1 = teacher(to_model_input(info(teacher), resized(batch["image"], 48, "bicubic"))).argmax(1)  # its own
    assert m["teacher"]["acc1"] == pytest.approx(float((top1 == batch["label"]).float().mean()))


def test_a_file_without_a_spec_takes_the_geometry_of_the_recipe_beside_it(tmp_path):
    """Files written before the spec existed (or by other tools): the ``[data]`` of the recipe.toml gte wrote next to
    the model, else the architecture's own size."""
    from safetensors.torch import save_file

    model = build_model("cifar_resnet20", 2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "old.safetensors"), {"arch": "cifar_resnet20", "num_classes": "2"})
    assert eval_geometry(load_model(str(tmp_path / "old.safetensors"))) == (32, 37)  # the architecture's
    (tmp_path / "recipe.toml").write_text('[data]\nimage_size = 40\neval_resize = 48\n')
    assert eval_geometry(load_model(str(tmp_path / "old.safetensors"))) == (40, 48)
