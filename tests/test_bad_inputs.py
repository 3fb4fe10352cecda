"""Bad input, case by case: one line on stderr and exit code 2 (nothing lost), or — a malformed sample — skipped and
counted. Commands run in this process through ``gte.cli.main`` (the console script's entry point), so each case costs
milliseconds to a few seconds, not an interpreter start."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from _fixtures import jpeg_bytes, one_line_exit_2, run_main, write_jpeg_shards
from gte.data.images import to_rgb
from gte.data.transforms import BadSample, SampleTransform
from gte.data.writers.core import atomic_tar


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.epochs=0", "optim.epochs"),
    ("optim.name=lbfgs", "optim.name"),
    ("run.log_every=0", "run.log_every"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints"),
    ("data.crop_scale=[1]", "data.crop_scale"),
    ("data.image_size=0", "data.image_size"),
    ("distill.temperature=0", "distill.temperature"),
    ("data.image_size=64", "eval_resize"),  # the demo's eval_resize 32 would pad the 64-px crop with black
])
def test_out_of_range_values_are_refused_when_the_recipe_loads(override, needle, tmp_path, monkeypatch, capsys):
    # data.train names no shards: a recipe that got past loading would fail on that instead, with another line
    one_line_exit_2(["distill", "--set", override, "--set", f"data.train={tmp_path}/none-*.tar"], monkeypatch, capsys,
                    needle)


def test_a_dry_run_lists_every_value_out_of_range(monkeypatch, capsys):
    code, out, err = run_main(["distill", "--set", "optim.lr=-1", "--set", "optim.epochs=0", "--dry-run"],
                              monkeypatch, capsys)
    problems = [x for x in err.splitlines() if x.startswith("gte: problem: ")]
    assert code == 2 and "[optim]" in out  # the resolved recipe is printed too
    assert len(problems) == 2 and "optim.lr" in problems[0] and "optim.epochs" in problems[1], err


def test_dry_run_lists_every_problem_and_prints_the_recipe(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[student]\narch = "bcos_cifar_resnet20"\n[teacher]\narch = "cifar_resnet20"\n'
                      f'weights = "{tmp_path / "none.safetensors"}"\n[data]\ntrain = "{tmp_path}/missing-*.tar"\n')
    code, out, err = run_main(["distill", "--recipe", str(recipe), "--dry-run"], monkeypatch, capsys)
    assert code == 2
    assert "[student]" in out and 'arch = "bcos_cifar_resnet20"' in out  # the resolved recipe, on stdout
    assert "[demo]" not in out  # only the demo recipe runs the demo
    problems = [x for x in err.splitlines() if x.startswith("gte: problem: ")]
    assert len(problems) == 3, err
    assert any("teacher.weights" in p for p in problems)
    assert any("B-cos teacher" in p for p in problems)  # a B-cos student cannot match a standard teacher's W(x)
    assert any("missing-*.tar" in p for p in problems)


def test_an_empty_recipe_names_what_is_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.toml").write_text("")
    line = one_line_exit_2(["distill", "--recipe", str(tmp_path / "empty.toml")], monkeypatch, capsys)
    assert "student.arch is not set" in line


def test_the_demo_recipe_as_a_template_runs_as_an_ordinary_recipe(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(["distill", "--set", f"data.train={tmp_path}/x-*.tar", "--dry-run"], monkeypatch,
                            capsys)
    assert code == 2 and "ordinary distillation" in err
    assert "num_classes must be in" not in err and "teacher.arch is not set" in err  # no demo generator involved


def test_the_demo_dry_run_checks_the_demo(monkeypatch, capsys):
    code, _, err = run_main(["distill", "--set", "data.num_classes=9", "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "demo draws" in err
    code, out, err = run_main(["distill", "--dry-run"], monkeypatch, capsys)
    assert code == 0 and "valid" in err and "[demo]" in out


@pytest.fixture()
def model_file(tmp_path):
    from gte.models import build_model, save_model

    path = tmp_path / "m.safetensors"
    save_model(build_model("cifar_resnet20", 4), path)
    return path


def test_json_into_a_missing_directory_fails_before_the_evaluation(tmp_path, model_file, monkeypatch, capsys):
    one_line_exit_2(["eval", str(model_file), "--data", str(tmp_path / "none.tar"), "--json",
                     str(tmp_path / "no" / "such" / "m.json")], monkeypatch, capsys, "does not exist")


def test_corrupt_num_classes_metadata_is_refused_before_building(tmp_path, model_file, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(model_file)), str(tmp_path / "bad.safetensors"), metadata={**meta,
                                                                                       "num_classes": "999999999999"})
    one_line_exit_2(["eval", str(tmp_path / "bad.safetensors"), "--data", "x.tar"], monkeypatch, capsys,
                    "num_classes")


def test_an_existing_file_as_output_directory_is_one_line(tmp_path, monkeypatch, capsys):
    from gte.data.synthetic import write_synthetic_split

    spec = write_synthetic_split(tmp_path / "d", "test", 8, image_size=32, num_classes=4)
    (tmp_path / "taken").write_text("a file")
    one_line_exit_2(["train", "--recipe", "demo", "--set", f"data.train={spec}", "--set", "optim.batch_size=4",
                     "--set", "data.num_workers=0", "--out", str(tmp_path / "taken")], monkeypatch, capsys,
                    str(tmp_path / "taken"))


def test_worker_counts_that_are_not_numbers(monkeypatch, capsys):
    one_line_exit_2(["data", "bench", "--workers", "a,b"], monkeypatch, capsys, "--workers")
    one_line_exit_2(["data", "bench", "--sizes", "500x"], monkeypatch, capsys, "--sizes")
    one_line_exit_2(["data", "bench", "--transform", "test"], monkeypatch, capsys, "--transform")


def _sample(**over) -> dict:
    s = {"__key__": "k", "jpg": jpeg_bytes(np.random.default_rng(0)), "cls": b"1", "json": b"{}"}
    s.update({k: (v if isinstance(v, bytes) else json.dumps(v).encode()) for k, v in over.items()})
    return s


@pytest.mark.parametrize("over", [
    {"json": {"group": "abc"}}, {"json": b'{"group": NaN}'}, {"json": {"group": 1e30}}, {"json": {"group": [1]}},
    {"json": {"boxes": [[1, 2]]}}, {"json": {"labels": [-1]}}, {"json": {"labels": "1"}},
    {"json": {"box_labels": [0.5]}}, {"json": b"[" * 100000 + b"]" * 100000},
    {"cls": b"99999999999999999999999"}, {"cls": b"-1"},
])
def test_malformed_sample_metadata_is_a_bad_sample(over):
    with pytest.raises(BadSample):
        SampleTransform(False, 16)(_sample(**over))
    SampleTransform(False, 16)(_sample())  # the same sample, well-formed, passes


def test_malformed_samples_are_skipped_and_counted_by_the_loader(tmp_path):
    from gte.data.loader import make_loader

    bad = [{"json": {"group": "abc"}}, {"json": {"boxes": [[1, 2]]}}, {"cls": b"-1"}]
    with atomic_tar(tmp_path / "d-000000.tar") as sink:
        for i, over in enumerate([{}, *bad, {}]):
            sink.write({**_sample(**over), "__key__": f"{i:04d}"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(make_loader(str(tmp_path / "d-000000.tar"), train=False, image_size=16, batch_size=8,
                                   max_bad_fraction=1.0))
    assert sum(len(b["key"]) for b in batches) == 2 and sum(int(b["skipped"]) for b in batches) == 3


def test_sixteen_bit_images_are_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(a)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_one_pixel_limit_for_loader_and_explain(tmp_path, monkeypatch):
    from gte.errors import GteError
    from gte.render import load_image

    monkeypatch.setenv("GTE_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(BadSample, match="pixels"):
        SampleTransform(False, 16)(_sample())  # 24×20 > 100
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(np.random.default_rng(0)))
    with pytest.raises(GteError, match="pixels"):
        load_image(tmp_path / "a.jpg")


def test_os_errors_become_one_line():
    from gte.cli import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/x/y"))
    assert "No space left on device: /x/y" in line and "disk is full" in line
    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "/r")) == "Permission denied: /r"


def test_fetches_of_one_teacher_take_turns(tmp_path):
    from rich.console import Console

    from gte import hub

    src, dest = tmp_path / "mirror", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    data = b"weights"
    name = f"tiny-{hashlib.sha256(data).hexdigest()[:10]}.pth"
    (src / name).write_bytes(data)
    t = hub.Teacher("tiny", "cifar_resnet20", f"http://127.0.0.1:9/{name}", 1.0, "test")
    calls = []

    def convert(teacher, pth, out, sha):
        calls.append(pth.read_bytes())
        out.write_bytes(b"converted")

    held = os.open(dest, os.O_RDONLY)  # another process is fetching into this cache: it holds the directory's lock
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        log = Console(record=True, width=200)
        th = threading.Thread(target=hub.fetch, args=(t, convert, dest, str(src), log))
        th.start()
        th.join(timeout=1.0)
        assert th.is_alive() and "waiting" in log.export_text()
        (dest / "tiny.safetensors").write_bytes(b"done by the other")  # it finishes
    finally:
        os.close(held)  # releases the lock
    th.join(timeout=10)
    assert not th.is_alive() and calls == []  # nothing fetched twice
    assert (dest / "tiny.safetensors").read_bytes() == b"done by the other"


def test_a_corrupt_frozen_info_is_one_line(tmp_path):
    from gte.errors import GteError
    from gte.frozen import INFO, read_info

    (tmp_path / INFO).write_text("{not json")
    with pytest.raises(GteError, match="corrupt"):
        read_info(tmp_path)
    assert read_info(tmp_path / "none") is None


def test_eval_refuses_labels_the_model_does_not_have(tmp_path, model_file, monkeypatch, capsys):
    spec, _ = write_jpeg_shards(tmp_path / "d", [12], num_classes=6)  # cls = i % 6: labels up to 5
    # a 4-class model: labels 4 and 5 would be silently counted as wrong
    one_line_exit_2(["eval", str(model_file), "--data", spec, "--image-size", "32"], monkeypatch, capsys,
                    "4 classes")


def test_imagefolder_skips_fifos_devices_and_symlink_loops(tmp_path):
    from _fixtures import write_imagefolder
    from gte.data.writers.imagefolder import imagefolder_items

    root = tmp_path / "tree"
    write_imagefolder(root, {"a": 2, "b": 3})
    os.mkfifo(root / "a" / "pipe.jpg")                     # would hang a read
    os.symlink("/dev/zero", root / "a" / "zero.jpg")       # would never end
    os.symlink(root / "a", root / "a" / "loop")            # a loop
    os.symlink(root / "b", root / "a" / "other")           # another class's folder
    items, classes = imagefolder_items(root)
    keys = sorted(i.key for i in items if "pipe" not in i.key and "zero" not in i.key)
    assert [i.cls for i in items if not any(x in i.key for x in ("pipe", "zero"))].count(1) == 3
    assert len(keys) == 5  # 2 + 3 images, each once, under its own class
    from gte.data.writers.core import load_image_item

    for item in items:
        if "pipe" in item.key or "zero" in item.key:
            sample, why = load_image_item(item, "none")
            assert sample is None and "not a regular file" in why


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, one_thread):
    import torch

    from gte.checkpoint import checkpoints
    from gte.config import from_dict
    from gte.data.synthetic import write_synthetic_split
    from gte.train import train

    spec = write_synthetic_split(tmp_path / "d", "teacher", 16, image_size=32, num_classes=4)

    def recipe(out):
        return from_dict({"data": {"train": spec, "num_classes": 4, "image_size": 32, "eval_resize": 32,
                                   "num_workers": 0}, "student": {"arch": "bcos_cifar_resnet20"},
                          "distill": {"method": "ce"}, "optim": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0},
                          "run": {"out": str(out), "seed": 3, "keep_checkpoints": 2}})

    straight = train(recipe(tmp_path / "a")).model.state_dict()
    train(recipe(tmp_path / "b"))
    newest = checkpoints(tmp_path / "b" / "checkpoints")[-1]
    (newest / "state.pt").write_bytes(b"not a checkpoint")  # e.g. a disk error
    resumed = train(recipe(tmp_path / "b")).model.state_dict()  # epoch 2 again, from the epoch-1 checkpoint
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, msg=k)


@pytest.mark.parametrize("command", ["data info {}", "distill --dry-run --set data.train={}"])
def test_an_unreadable_shard_is_permission_denied_not_missing(command, tmp_path, monkeypatch, capsys):
    from _fixtures import unreadable_file

    path = unreadable_file(tmp_path)
    if path is None:
        pytest.skip("running as root (file modes do not stop it) and no write-only sysfs attribute to read instead")
    code, _, err = run_main(command.format(path).split(), monkeypatch, capsys)
    assert code == 2 and "permission denied" in err.lower() and str(path) in err, err
    assert "not found" not in err and "No such file" not in err, err
