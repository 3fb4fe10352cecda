"""The README's paper flows, run as written: its own `gte data …`, `gte distill --recipe …` and `gte eval` lines, read
from README.md, on miniature datasets the tests write. Only scale is overridden (classes, image size, architectures,
epochs, batch) — never a data path: the shipped recipes must find what `gte data` writes.

The teacher is the one exception to "as written": the paper's teachers are downloads (`gte fetch-teachers`), so a
small random one of the same family stands in (`teacher.arch`, `teacher.weights`).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _fixtures import jpeg_bytes, write_imagefolder
from gte.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["--set", "data.image_size=32", "--set", "data.eval_resize=0", "--set", "data.num_workers=0",
         "--set", "optim.epochs=1", "--set", "optim.batch_size=4", "--set", "optim.warmup_epochs=0",
         "--set", "run.mixed_precision=no", "--set", "run.log_every=1"]


def readme_command(start: str, **replace: str) -> list[str]:
    """The README line that starts with ``start`` (comment dropped) as argv without ``gte``; ``replace`` swaps the
    values of options (``--shots``) or the argument given by its README text (``~/imagenet/train``)."""
    lines = [x.strip() for x in README.read_text().splitlines() if x.strip().startswith(start)]
    assert lines, f"README has no command starting with {start!r}"
    argv = shlex.split(lines[0].split("  #")[0])[1:]
    for old, new in replace.items():
        if old.startswith("--"):
            argv[argv.index(old) + 1] = new
        else:
            argv[argv.index(old)] = new
    return argv


def gte(argv: list[str]) -> str:
    """Run ``gte argv`` in this process (as the console script does) and return its output."""
    result = CliRunner().invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


@pytest.fixture()
def workdir(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GTE_HOME", str(tmp_path / "home"))
    return tmp_path


def teacher(path: Path, arch: str, num_classes: int) -> list[str]:
    """A random stand-in for the downloaded teacher, as ``--set`` overrides."""
    import torch

    from gte.models import build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(arch, num_classes), path)
    return ["--set", f"teacher.arch={arch}", "--set", f"teacher.weights={path}"]


def test_imagenet_fewshot_flow(workdir):
    write_imagefolder(workdir / "imagenet" / "train", {f"n0{i}": 9 for i in range(4)}, seed=1)
    write_imagefolder(workdir / "imagenet" / "val", {f"n0{i}": 3 for i in range(4)}, seed=2)
    gte(readme_command("gte data shard imagefolder ~/imagenet/train", **{"~/imagenet/train": "imagenet/train"}))
    gte(readme_command("gte data shard imagefolder ~/imagenet/val", **{"~/imagenet/val": "imagenet/val"}))
    gte(readme_command("gte data fewshot", **{"--shots": "5", "--holdout": "2"}))
    assert sorted(p.name for p in Path("data/imagenet-50shot").glob("*.tar")) == ["train-000000.tar",
                                                                                 "val-000000.tar"]
    arch = "bcos_cifar_resnet20"
    out = gte(["distill", "--recipe", "imagenet-fewshot", "--set", "data.num_classes=4", "--set", f"student.arch={arch}",
               *teacher(workdir / "t.safetensors", arch, 4), *SMALL])
    # every few-shot sample is read each epoch: 4 classes × 5 shots = 5 steps × 4
    assert "data.train: 1 shard(s), 20 samples; 5 steps/epoch × 4 = 20 samples per epoch" in out
    assert "data.val: 1 shard(s), 8 samples" in out and "data.test: 1 shard(s), 12 samples" in out
    run = Path("runs/imagenet-fewshot-d169-r18")
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"time_s"' in x]
    assert len(epochs) == 1 and epochs[0]["step"] == 5 and "val_acc1" in epochs[0]
    from safetensors import safe_open

    with safe_open(str(run / "model-best.safetensors"), framework="pt") as f:  # kept by validation acc@1
        assert float(f.metadata()["val_acc1"]) == pytest.approx(epochs[0]["val_acc1"], abs=1e-6)
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:  # the data's class names travel along
        assert json.loads(f.metadata()["class_names"]) == ["n00", "n01", "n02", "n03"]
    gte(["eval", str(run / "model.safetensors"), "--data", "data/imagenet/*val*.tar", "--json", "m.json"])
    assert json.loads(Path("m.json").read_text())["n"] == 12


def _waterbirds(root: Path, per_split: dict[int, int]) -> None:
    """metadata.csv + images in the layout of the official Waterbirds release."""
    rng = np.random.default_rng(5)
    rows, i = [], 0
    for split, n in per_split.items():
        for k in range(n):
            y, place = k % 2, (k // 2) % 2
            fn = f"{1 + y:03d}.{'Albatross' if y else 'Sparrow'}/bird_{i}.jpg"
            (root / fn).parent.mkdir(parents=True, exist_ok=True)
            (root / fn).write_bytes(jpeg_bytes(rng, 40, 36))
            rows.append(f"{i},{fn},{y},{split},{place},/x/y.jpg")
            i += 1
    (root / "metadata.csv").write_text("img_id,img_filename,y,split,place,place_filename\n" + "\n".join(rows) + "\n")


def test_waterbirds_flow(workdir):
    _waterbirds(workdir / "wb", {0: 16, 1: 8, 2: 8})
    gte(readme_command("gte data shard waterbirds", **{"~/waterbird_complete95_forest2water2": "wb"}))
    arch = "cifar_resnet20"  # the recipe's standard ResNets, small: GradCAM explanations
    out = gte(["distill", "--recipe", "waterbirds", "--set", f"student.arch={arch}",
               *teacher(workdir / "t.safetensors", arch, 2), *SMALL])
    assert "data.train: 1 shard(s), 16 samples" in out
    run = Path("runs/waterbirds-r50-r18")
    gte(["eval", str(run / "model.safetensors"), "--data", "data/waterbirds/test-*.tar", "--waterbirds",
         "--json", "m.json"])
    m = json.loads(Path("m.json").read_text())
    assert m["n"] == 8 and set(m["groups"]) == {"0", "1", "2", "3"} and "worst_group_acc" in m
    assert m["group_names"] == {"0": "landbird-on-land", "1": "landbird-on-water", "2": "waterbird-on-land",
                                "3": "waterbird-on-water"}


def _voc(root: Path, n_trainval: int, n_test: int) -> None:
    rng = np.random.default_rng(6)
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True)
    names = ("aeroplane", "bicycle", "bird", "boat", "bottle")
    ids = [f"{i:06d}" for i in range(n_trainval + n_test)]
    for i, image_id in enumerate(ids):
        objs = "".join(f"<object><name>{names[(i + j) % 5]}</name><difficult>0</difficult><bndbox><xmin>{2 + j}"
                       f"</xmin><ymin>2</ymin><xmax>{20 + j}</xmax><ymax>18</ymax></bndbox></object>"
                       for j in range(1 + i % 2))
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>32</width><height>24</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg_bytes(rng, 32, 24))
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:n_trainval]) + "\n")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids[n_trainval:]) + "\n")


def test_voc_flow(workdir):
    _voc(workdir / "VOC2007", 8, 4)
    gte(readme_command("gte data shard voc", **{"~/VOCdevkit/VOC2007": "VOC2007"}))
    arch = "bcos_cifar_resnet20"
    out = gte(["distill", "--recipe", "voc", "--set", f"student.arch={arch}",
               *teacher(workdir / "t.safetensors", arch, 20), *SMALL])
    assert "data.train: 1 shard(s), 8 samples" in out and "data.test: 1 shard(s), 4 samples" in out
    gte(["eval", "runs/voc-r50-r18/model.safetensors", "--data", "data/voc/test-*.tar", "--json", "m.json"])
    m = json.loads(Path("m.json").read_text())
    assert m["n"] == 4 and "f1" in m and "epg" in m


def test_frozen_teaching_flow(workdir):
    """README "Frozen e2KD": its `gte precompute` and `gte distill … distill.frozen=true` lines as written, on a
    recipe (the README's my.toml) whose teacher exists only for precompute."""
    import tomli_w

    from gte.data.synthetic import write_synthetic_split

    spec = write_synthetic_split(workdir / "data", "distill", 16, image_size=32, num_classes=4)
    arch = "bcos_cifar_resnet20"
    teacher(workdir / "t.safetensors", arch, 4)
    recipe = {"data": {"train": spec, "num_classes": 4}, "teacher": {"arch": arch, "weights": "t.safetensors"},
              "student": {"arch": arch}, "distill": {"method": "e2kd"}, "run": {"out": "runs/frozen"}}
    Path("my.toml").write_text(tomli_w.dumps(recipe))
    gte(readme_command("gte precompute --recipe my.toml") + SMALL)
    assert [p.name for p in Path("shards/frozen").glob("*.tar")] == ["distill-000000.tar"]
    assert Path("shards/frozen/gte-frozen.json").is_file()
    Path("t.safetensors").unlink()  # frozen teaching needs no teacher: the stored logits and maps stand in
    out = gte(readme_command("gte distill --recipe my.toml --set distill.frozen=true") + SMALL)
    assert "data.train: 1 shard(s), 16 samples" in out
    epochs = [json.loads(x) for x in Path("runs/frozen/metrics.jsonl").read_text().splitlines() if '"time_s"' in x]
    assert len(epochs) == 1 and epochs[0]["step"] == 4 and Path("runs/frozen/model.safetensors").is_file()


def test_demo_seeds_compare_and_shortcut_flow(workdir):
    """The demo section's lines as written: `gte distill --seeds` (2 seeds here, the demo at miniature size), the
    `gte compare` line over its runs, and the `gte eval --shortcut background` line on seed 0's student, with the
    shell's work (the cache variable, the globs) done here."""
    import glob
    import os

    tiny = ["--set", "demo.n_teacher=64", "--set", "demo.n_distill=32", "--set", "demo.n_test=32",
            "--set", "demo.teacher_epochs=1", "--set", "optim.epochs=1", "--set", "optim.batch_size=16"]
    gte(readme_command("gte distill --seeds", **{"--seeds": "0,1"}) + tiny)
    runs = sorted(glob.glob("runs/demo3/seed-*/*/"))
    assert len(runs) == 4  # kd and e2kd for each seed
    argv = readme_command("gte compare runs/demo3/seed-*/*/")
    at = argv.index("runs/demo3/seed-*/*/")
    out = gte(argv[:at] + runs + argv[at + 1:] + ["--json", "compare.json"])
    assert "e2kd" in out and "McNemar" in out
    result = json.loads(Path("compare.json").read_text())
    assert sorted(result["methods"]) == ["e2kd", "kd"]
    assert all(m["seeds"] == [0, 1] for m in result["methods"].values())
    assert (Path("runs/demo3/compare") / "report.html").is_file()

    cache = os.environ["GTE_HOME"] + "/demo"  # H="${GTE_HOME:-$HOME/.cache/gte}"/demo
    readme_command('H="${GTE_HOME:-$HOME/.cache/gte}"/demo')
    argv = readme_command("gte eval runs/demo3/seed-0/e2kd/model.safetensors")
    argv = [a.replace("$H", cache) for a in argv]
    argv = [(glob.glob(a) or [a])[0] if "teacher.safetensors" in a else a for a in argv]
    out = gte(argv + ["--json", "shortcut.json"])
    shortcut = json.loads(Path("shortcut.json").read_text())["shortcuts"]
    assert "background" in json.dumps(shortcut) and "shortcut" in out
