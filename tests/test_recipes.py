"""Every shipped recipe parses and dry-runs (data and weights pointed at small local files)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from gte.config import load_recipe, shipped_recipes
from gte.data.synthetic import write_synthetic_split
from gte.models import REGISTRY, build_model, save_model

PAPER = [name for name in shipped_recipes() if not name.startswith("demo")]


def test_recipes_are_listed_with_a_summary():
    listed = shipped_recipes()
    assert {"demo", "demo-colour", "imagenet", "imagenet-fewshot", "imagenet-fewshot-200", "imagenet-fewshot-std", "imagenet-vit",
            "waterbirds", "voc"} <= set(listed)
    assert all(len(summary) > 20 for summary in listed.values())


@pytest.mark.parametrize("name", PAPER)
def test_recipe_is_complete(name):
    r = load_recipe(name)
    assert r.student.arch in REGISTRY and r.teacher.arch in REGISTRY
    assert r.distill.method == "e2kd" and r.data.train and r.teacher.weights
    bcos_pair = r.student.arch.startswith("bcos_")
    assert r.distill.explainer == ("bcos" if bcos_pair else "gradcam")
    assert r.optim.clip == ("agc" if bcos_pair else "norm")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    spec = write_synthetic_split(root, "test", 20, image_size=32, num_classes=4)
    teacher = root / "teacher.safetensors"
    save_model(build_model("cifar_resnet20", 4), teacher)
    return root, spec, teacher


@pytest.mark.parametrize("name", PAPER)
def test_recipe_dry_runs(name, local):
    root, spec, teacher = local
    sets = [f"data.train={spec}", f"data.val={spec}", f"data.test={spec}", f"teacher.weights={teacher}"]
    cmd = [sys.executable, "-m", "gte", "distill", "--recipe", name, "--dry-run", "--out", str(root / name)]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GTE_HOME": str(root)}, timeout=120)
    assert res.returncode == 0, res.stderr
    resolved = tomllib.loads(res.stdout)
    assert resolved["data"]["train"] == spec and resolved["teacher"]["weights"] == str(teacher)
    assert not (root / name).exists()  # a dry run writes nothing


def test_dry_run_catches_missing_data_and_teacher(local):
    root, spec, teacher = local
    base = [sys.executable, "-m", "gte", "distill", "--recipe", "imagenet-fewshot", "--dry-run"]
    env = {**os.environ, "GTE_HOME": str(root)}
    res = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "gte fetch-teachers bcos_densenet169" in res.stderr
    assert "matches no files: data/imagenet-50shot/train-*.tar" in res.stderr  # every problem, not the first only
    res = subprocess.run(base + ["--set", f"teacher.weights={teacher}"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and "shard pattern matches no files" in res.stderr
    assert "fetch-teachers" not in res.stderr
