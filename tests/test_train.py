"""End-to-end training on real shards: artifacts, logged terms, guided interval, gte eval on the result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from gte.config import from_dict
from gte.data.synthetic import write_synthetic_split
from gte.models import load_model
from gte.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {"train": write_synthetic_split(root, "distill", 96, image_size=32, num_classes=4, samples_per_shard=40),
            "test": write_synthetic_split(root, "test", 64, image_size=32, num_classes=4)}


def _recipe(tmp_path, shards, teacher_path, **distill):
    return from_dict({
        "data": {"train": shards["train"], "test": shards["test"], "num_classes": 4, "image_size": 32,
                 "eval_resize": 32, "crop_scale": [0.6, 1.0], "num_workers": 0},
        "teacher": {"arch": "bcos_cifar_resnet20", "weights": str(teacher_path)},
        "student": {"arch": "bcos_cifar_resnet20"},
        "distill": {"method": "e2kd", **distill},
        "optim": {"epochs": 2, "batch_size": 16, "warmup_epochs": 1},
        "run": {"out": str(tmp_path / "run"), "seed": 1, "log_every": 1},
    })


def test_e2kd_run_writes_artifacts_and_logs_both_terms(tmp_path, shards, teacher_path):
    recipe = _recipe(tmp_path, shards, teacher_path, guided_every=2)
    result = train(recipe)
    out = result.out
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "bcos_cifar_resnet20" and meta["num_classes"] == "4"
    assert meta["recipe_digest"] == recipe.digest() and meta["method"] == "e2kd"
    assert "distill" in (out / "recipe.toml").read_text()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in steps if "loss" in r]
    assert len(step_rows) == 2 * (96 // 16)  # one line per step at log_every=1
    for r in step_rows:
        # the explanation term exists exactly on guided steps (global step index before increment is even)
        assert ("exp" in r) == ((r["step"] - 1) % 2 == 0)
        assert "kd" in r
    # the saved student reloads with identical weights
    reloaded = load_model(str(out / "model.safetensors"))
    for (k, a), b in zip(result.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    # data.test is evaluated once at the end, against the run's teacher, into OUT/test.json
    test = json.loads((out / "test.json").read_text())
    assert test == result.test and test["n"] == 64 and {"acc1", "agreement", "explanation_similarity"} <= set(test)
    from gte.evaluate import evaluate

    teacher = load_model(str(teacher_path))  # in train mode: evaluate puts it in eval mode itself
    again = evaluate(reloaded, recipe.data.test, data=recipe.data, teacher=teacher)
    assert again["acc1"] == test["acc1"] and again["agreement"] == test["agreement"]
    assert abs(again["explanation_similarity"] - test["explanation_similarity"]) < 1e-6


def test_lr_schedule_in_metrics(tmp_path, shards, teacher_path):
    recipe = _recipe(tmp_path, shards, teacher_path)
    recipe.distill.method = "kd"
    train(recipe)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in x]
    peak = max(lrs)
    assert lrs.index(peak) == 96 // 16 - 1  # linear warm-up over the first epoch, then cosine decay
    assert lrs[-1] < 0.1 * peak and lrs[0] < 0.3 * peak


def test_gte_eval_cli_json(tmp_path, shards, teacher_path):
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "gte", "eval", str(teacher_path), "--data", shards["test"], "--teacher",
           str(teacher_path), "--image-size", "32", "--eval-resize", "32", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    m = json.loads(out.read_text())
    assert m["n"] == 64
    assert m["agreement"] == 1.0  # a model agrees with itself
    assert m["explanation_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert set(m["groups"]) == {"0", "1"} and m["worst_group_acc"] == min(m["groups"].values())
    assert m["group_names"] == {"0": "aligned", "1": "conflicting"}  # the synthetic writer's groups.json


def test_channels_last_trains_like_nchw_and_saves(tmp_path, shards, teacher_path):
    """run.channels_last: same training (up to convolution-algorithm rounding), checkpoints and model still save."""
    results = []
    for cl in (False, True):
        recipe = _recipe(tmp_path / str(cl), shards, teacher_path, guided_every=1)
        recipe.optim.epochs, recipe.run.channels_last, recipe.run.checkpoint_every = 1, cl, 2
        results.append(train(recipe))
    nchw, nhwc = results
    assert next(nhwc.model.parameters()).ndim == 4 and \
        next(nhwc.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    reloaded = load_model(str(nhwc.out / "model.safetensors"))
    for (k, a), b, c in zip(nhwc.model.state_dict().items(), reloaded.state_dict().values(),
                            nchw.model.state_dict().values()):
        assert torch.equal(a, b), k
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
def test_compiled_teacher_trains_like_eager(tmp_path, shards, teacher_path):
    """run.compile_teacher: torch.compile'd teacher (its KD forward and its W(x)), same training up to rounding."""
    results = []
    for compiled in (False, True):
        recipe = _recipe(tmp_path / str(compiled), shards, teacher_path, guided_every=2)
        recipe.optim.epochs, recipe.run.compile_teacher = 1, compiled
        recipe.data.test = ""  # the weights are compared; a test pass would compile the teacher for its batch too
        results.append(train(recipe))
    for (k, a), b in zip(results[0].model.state_dict().items(), results[1].model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=k)


def test_compiled_teacher_refused_with_gradcam(tmp_path, shards, teacher_path):
    from gte.errors import GteError
    from gte.validate import validate

    recipe = _recipe(tmp_path, shards, teacher_path)
    recipe.run.compile_teacher = True
    validate(recipe)  # B-cos explanations: fine
    recipe.distill.explainer = "gradcam"
    with pytest.raises(GteError, match="compile_teacher needs B-cos"):
        validate(recipe)


def test_checkpoints_of_another_recipe_are_refused_before_anything_is_loaded(tmp_path, shards, teacher_path):
    """A different recipe's checkpoint (here: another method, whose state would not even fit) is named as such."""
    from gte import checkpoint
    from gte.errors import GteError

    recipe = _recipe(tmp_path, shards, teacher_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save(tmp_path / "run" / "checkpoints", model=model, optimizer=opt,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                    position={"step": 3, "epoch": 0, "batch": 3, "digest": "another"}, rng=[], keep=2,
                    method_state={"state.memory_s": torch.zeros(2, 2)})
    with pytest.raises(GteError, match="holds checkpoints of a different recipe"):
        train(recipe)


def test_raising_epochs_extends_a_run_and_other_changes_say_the_way_forward(tmp_path, shards, teacher_path):
    """optim.epochs 1 → 2 in the same OUT resumes at the first run's last step with a note; a change of any other
    training key (or fewer epochs) is refused naming the key and a new run from the checkpoint's weights."""
    from rich.console import Console

    from gte.errors import GteError

    recipe = _recipe(tmp_path, shards, teacher_path, method="kd")
    recipe.optim.epochs = 1
    train(recipe)
    steps = 96 // 16
    longer = _recipe(tmp_path, shards, teacher_path, method="kd")
    longer.optim.epochs, longer.run.log_every = 2, 3  # logging cadence may change too
    console = Console(stderr=True, record=True, width=200)
    train(longer, console)
    text = console.export_text()
    assert f"extending the run from 1 to 2 epochs" in text and f"resuming from" in text and f"(step {steps})" in text
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"lr"' in x]
    assert logged == list(range(1, steps + 1)) + [9, 12]  # the first run's steps, then the second epoch's

    other = _recipe(tmp_path, shards, teacher_path, method="kd")
    other.optim.epochs, other.optim.lr = 3, 0.01
    with pytest.raises(GteError, match=r"changed: optim\.epochs 2 → 3, optim\.lr 0\.001 → 0\.01\).*"
                                       r"--set student\.weights=.*step-00000012/model\.safetensors --out"):
        train(other)
    fewer = _recipe(tmp_path, shards, teacher_path, method="kd")
    fewer.optim.epochs = 1
    with pytest.raises(GteError, match=r"changed: optim\.epochs 2 → 1\)"):
        train(fewer)


def test_a_checkpoint_of_an_older_gte_resumes_under_the_settings_it_trained_with(tmp_path, shards, teacher_path):
    """A checkpoint whose recorded recipe predates data.reduced_decode / data.decode_margin trained with full-size
    decoding: it resumes under a recipe that says so (``reduced_decode = false``), and the default recipe's refusal
    names the key and the value to set, not an unexplained "different recipe"."""
    from gte import checkpoint
    from gte.train import check_resumable, training_dict

    recipe = _recipe(tmp_path, shards, teacher_path, method="kd")
    older = training_dict(recipe)
    del older["data"]["reduced_decode"], older["data"]["decode_margin"]
    position = {"step": 3, "epoch": 0, "batch": 3, "digest": "written-by-an-older-gte", "training": older}
    recipe.data.reduced_decode = False
    assert check_resumable(position, recipe, tmp_path) is None
    recipe.data.decode_margin = 1.0  # a setting that is not how it trained
    with pytest.raises(checkpoint.OtherRecipe, match=r"changed: data\.decode_margin 2\.0 → 1\.0\)"):
        check_resumable(position, recipe, tmp_path)
    default = _recipe(tmp_path, shards, teacher_path, method="kd")  # reduced-scale decoding: not how it trained
    with pytest.raises(checkpoint.OtherRecipe, match=r"changed: data\.reduced_decode false → true\)"):
        check_resumable(position, default, tmp_path)


@pytest.mark.parametrize("every", [1e-9, 0])
def test_progress_lines_without_a_terminal(tmp_path, shards, teacher_path, every):
    """Batch jobs (stderr not a terminal): a plain progress line per run.progress_every seconds, on log steps, with
    step, epoch, loss terms, img/s and an ETA; 0 turns them off."""
    import io
    import re

    from rich.console import Console

    recipe = _recipe(tmp_path, shards, teacher_path, method="kd")
    recipe.optim.epochs, recipe.run.log_every, recipe.run.progress_every = 1, 2, every
    buffer = io.StringIO()
    train(recipe, Console(file=buffer, width=300))
    lines = [x for x in buffer.getvalue().splitlines() if x.startswith("step ")]
    if every == 0:
        assert lines == []
        return
    assert [int(x.split()[1].split("/")[0]) for x in lines] == [2, 4, 6]
    for line in lines:
        assert re.fullmatch(r"step \d/6 ep 1/1 loss [\d.]+ kd [\d.]+ \d+ img/s ETA \d:\d\d:\d\d", line), line


def test_a_pair_distill_accepts_is_one_eval_accepts_with_the_same_explainer(tmp_path, shards, monkeypatch, capsys):
    """A B-cos student trained by GradCAM against a standard teacher (what the dry-run suggests for that pair): the
    student's spec records 'gradcam', `gte eval --teacher` compares by it (was: refused as a mixed pair), and
    `--explainer bcos` on that pair is one line."""
    from _fixtures import run_main

    from gte.models import build_model, info, save_model

    torch.manual_seed(0)
    teacher = tmp_path / "std-teacher.safetensors"
    save_model(build_model("cifar_resnet20", 4), teacher)
    recipe = _recipe(tmp_path, shards, teacher, explainer="gradcam")
    recipe.teacher.arch, recipe.optim.epochs = "cifar_resnet20", 1
    result = train(recipe)
    assert info(result.model).trained_explainer == "gradcam" and result.test["explainer"] == "gradcam"
    student = result.out / "model.safetensors"
    assert info(load_model(str(student))).trained_explainer == "gradcam"  # the spec travels in the file
    code, out, err = run_main(["eval", str(student), "--data", shards["test"], "--teacher", str(teacher), "--json",
                               "-"], monkeypatch, capsys)
    assert code == 0, err
    m = json.loads(out)
    assert m["explainer"] == "gradcam" and m["explanation_similarity"] == pytest.approx(
        result.test["explanation_similarity"], abs=1e-5)
    code, _, err = run_main(["eval", str(student), "--data", shards["test"], "--teacher", str(teacher),
                             "--explainer", "bcos"], monkeypatch, capsys)
    assert code == 2 and "the teacher cifar_resnet20 is not one (use gradcam)" in err and err.count("\n") == 1


def test_labels_that_are_not_the_models_classes_are_marked_and_validation_follows_agreement(
        tmp_path, monkeypatch, capsys):
    """Own photos in folders (classes.json: 'circle', 'square', …) under a teacher whose classes are others
    ('tench', …): the run says so, validation compares with the teacher and model-best follows agreement;
    OUT/test.json and `gte eval` mark accuracy as not meaningful. Matching names mark nothing."""
    from _fixtures import run_main

    from gte.models import build_model, save_model, with_spec

    data = tmp_path / "data"
    split = {s: write_synthetic_split(data, s, n, image_size=32, num_classes=4) for s, n in (("distill", 64),
                                                                                             ("test", 32))}
    split["val"] = split["test"]
    (data / "classes.json").write_text(json.dumps(["circle", "square", "triangle", "plus"]))
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    save_model(with_spec(build_model("bcos_cifar_resnet20", 4), class_names=["tench", "goldfish", "shark", "ray"]),
               teacher)
    recipe = _recipe(tmp_path, {"train": split["distill"], "test": split["val"]}, teacher)
    recipe.data.val, recipe.optim.epochs = split["val"], 1
    from rich.console import Console

    console = Console(stderr=True, record=True, width=300)
    result = train(recipe, console)
    assert "note: the data's classes (circle, square, triangle, … 4 in all) are not the model's (tench, goldfish, " \
           "shark, … 4 in all)" in console.export_text()
    epoch = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines() if "val_acc1" in x][0]
    with safe_open(str(result.out / "model-best.safetensors"), framework="pt") as f:
        assert float(f.metadata()["val_agreement"]) == pytest.approx(epoch["val_agreement"], abs=1e-6)
    test = json.loads((result.out / "test.json").read_text())
    assert test["labels_meaningful"] is False and "not meaningful" in test["labels_note"]
    code, out, err = run_main(["eval", str(result.out / "model.safetensors"), "--data", split["val"], "--teacher",
                               str(teacher), "--json", "-"], monkeypatch, capsys)
    assert code == 0 and "note: the data's classes" in err, (out, err)
    assert json.loads(out)["labels_meaningful"] is False
    # the teacher's own names: nothing to mark
    (data / "classes.json").write_text(json.dumps(["tench", "goldfish", "shark", "ray"]))
    code, out, err = run_main(["eval", str(result.out / "model.safetensors"), "--data", split["val"], "--teacher",
                               str(teacher), "--json", "-"], monkeypatch, capsys)
    assert code == 0 and "note:" not in err and "labels_meaningful" not in json.loads(out)
