"""Every shipped recipe parses and dry-runs (data and weights pointed at small local files)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from gte.config import load_recipe, recipe_path, shipped_recipes
from gte.data.synthetic import write_synthetic_split
from gte.models import build_model, check_arch, save_model

PAPER = [name for name in shipped_recipes() if not name.startswith(("demo", "table"))]
TABLES = [name for name in shipped_recipes() if name.startswith("table")]


def test_recipes_are_listed_with_a_summary():
    listed = shipped_recipes()
    assert {"demo", "demo-colour", "imagenet", "imagenet-fewshot", "imagenet-fewshot-200", "imagenet-fewshot-std", "imagenet-vit",
            "waterbirds", "voc"} <= set(listed)
    assert all(len(summary) > 20 for summary in listed.values())


@pytest.mark.parametrize("name", PAPER)
def test_recipe_is_complete(name):
    r = load_recipe(name)
    check_arch(r.student.arch)  # gte's names, or timm/… (own-teacher)
    check_arch(r.teacher.arch)
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


@pytest.mark.parametrize("name", TABLES)
def test_table_recipes_extend_a_paper_recipe_with_one_method(name, local):
    """The paper's Table 1/2 rows: each a paper recipe plus one method (and its +e2KD twin), checked like a dry run."""
    from gte.methods import parse_method
    from gte.validate import problems

    root, spec, teacher = local
    r = load_recipe(name, [f"data.train={spec}", f"data.val={spec}", f"data.test={spec}",
                           f"teacher.weights={teacher}"])
    cls, explanation = parse_method(r.distill.method)
    table, method, *plus = name.split("-")
    assert cls.name.replace("_", "") == ("e2kd" if method == "kd" and plus else method) and explanation == bool(plus)
    assert r.student.arch == ("resnet18" if table == "table1" else "bcos_resnet18")
    assert r.teacher.arch == ("resnet34" if table == "table1" else "bcos_resnet34")
    assert r.optim.epochs == 250 and r.optim.batch_size == 32 and r.run.out == f"runs/{name}"
    assert r.distill.ce_weight == -1  # the method's own label-loss weight
    assert problems(r) == []
    header = recipe_path(name).read_text().splitlines()[0]
    assert f"paper Table {table[-1]}" in header


def test_extends_overrides_section_by_section_and_refuses_loops(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "imagenet-fewshot-std"\n[distill]\nmethod = "dkd"\n'
                                     '[optim]\nepochs = 3\n')
    r = load_recipe(str(tmp_path / "a.toml"))
    assert r.distill.method == "dkd" and r.distill.explainer == "gradcam" and r.optim.epochs == 3
    assert r.optim.name == "adamw" and r.student.arch == "resnet18"
    (tmp_path / "b.toml").write_text('extends = "c.toml"\n')
    (tmp_path / "c.toml").write_text('extends = "b.toml"\n')
    from gte.errors import GteError

    with pytest.raises(GteError, match="in a loop"):
        load_recipe(str(tmp_path / "b.toml"))


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
