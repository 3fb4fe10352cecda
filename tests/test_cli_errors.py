"""The real ``gte`` console script: user errors are one line on stderr, exit code 2, never a traceback.

All invocations run once, concurrently, in a module fixture (each is a fresh Python process that imports torch);
the tests then inspect their results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


def gte_executable() -> str:
    candidate = Path(sys.executable).parent / "gte"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("gte")
    assert found, "the gte console script is not installed"
    return found


GTE = gte_executable()


def run_gte(args: list[str], home: Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GTE_DEBUG"}
    env.update(GTE_HOME=str(home), OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1")
    return subprocess.run([GTE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import tomli_w

    from gte.data.synthetic import write_synthetic_split
    from gte.models import build_model, save_model

    root = tmp_path_factory.mktemp("cli")
    spec = write_synthetic_split(root, "distill", 64, image_size=32, num_classes=4)
    assert Path(spec).is_file()
    save_model(build_model("bcos_cifar_resnet20", 3), root / "teacher3.safetensors")
    import torch

    torch.save(build_model("bcos_cifar_resnet20", 3).state_dict(), root / "teacher3.pth")
    (root / "junk.safetensors").write_bytes(b"\x00\x01 not safetensors")
    (root / "notes.txt").write_text("hello")

    recipe = {
        "data": {"train": spec, "num_classes": 4, "image_size": 32, "eval_resize": 32, "num_workers": 0,
                 "shuffle_buffer": 10},
        "teacher": {"arch": "bcos_cifar_resnet20", "weights": str(root / "teacher3.safetensors")},
        "student": {"arch": "bcos_cifar_resnet20"},
        "distill": {"method": "kd"},
        "optim": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
        "run": {"out": str(root / "run")},
    }
    (root / "recipe.toml").write_text(tomli_w.dumps(recipe))
    return root, spec


def cases(root: Path, spec: str) -> dict[str, list[str]]:
    r = str(root / "recipe.toml")
    return {
        "unknown_key": ["distill", "-r", r, "--set", "optim.lrr=0.1"],
        "unknown_section": ["distill", "-r", r, "--set", "optimizer.lr=0.1"],
        "wrong_type": ["distill", "-r", r, "--set", "optim.epochs=many"],
        "unknown_model": ["distill", "-r", r, "--set", "student.arch=bcos_resnet81"],
        "class_mismatch": ["distill", "-r", r],  # teacher has 3 classes, the recipe 4
        "missing_shards": ["distill", "-r", r, "--set", f"data.train={root}/missing-{{000000..000003}}.tar"],
        "non_toml": ["distill", "-r", spec],  # a tar shard given as the recipe
        "text_not_toml": ["distill", "-r", str(root / "notes.txt")],
        "missing_recipe": ["distill", "-r", "no-such-recipe"],
        "ce_in_distill": ["distill", "-r", r, "--set", "distill.method=ce"],
        "no_teacher_weights": ["distill", "-r", r, "--set", "teacher.weights="],
        "explain": ["explain", str(root / "notes.txt"), "--model", str(root / "x.safetensors")],
        "fetch_teachers": ["fetch-teachers", "bcos_resnet43"],
        "eval_pth_without_arch": ["eval", str(root / "teacher3.pth"), "--data", spec],
        "pth_class_mismatch": ["distill", "-r", r, "--set", f"teacher.weights={root}/teacher3.pth"],
        "labels_out_of_range": ["train", "-r", r, "--set", "data.num_classes=3"],
        "eval_corrupt_safetensors": ["eval", str(root / "junk.safetensors"), "--data", spec],
        "bad_exp_grad": ["distill", "-r", r, "--set", "distill.exp_grad=approx"],
        "frozen_topk": ["distill", "-r", r, "--set", "distill.exp_topk=2", "--set", "distill.frozen=true"],
        "bad_demo_background": ["distill", "--set", "demo.background=plaid"],
    }


@pytest.fixture(scope="module")
def results(workspace):
    root, spec = workspace
    todo = cases(root, spec)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_gte, args, root, root) for name, args in todo.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    # A run that fails mid-training has printed its data summary first (progress goes to stderr): the error itself
    # is the last line and the only one.
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("data.")]
    report = f"rc={res.returncode}\nstderr:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, report
    assert res.returncode == 2, report
    assert len(lines) == 1, report
    line = lines[0]
    assert line.startswith("gte: error: "), report
    for needle in needles:
        assert needle in line, report
    return line


@pytest.mark.parametrize(
    "case,needles",
    [
        ("unknown_key", ["optim.lrr"]),
        ("unknown_section", ["optimizer"]),
        ("wrong_type", ["optim.epochs"]),
        ("unknown_model", ["bcos_resnet81", "bcos_resnet18"]),
        ("class_mismatch", ["classes"]),
        ("missing_shards", ["missing-000000.tar"]),
        ("non_toml", ["TOML"]),
        ("text_not_toml", ["TOML"]),
        ("missing_recipe", ["no-such-recipe"]),
        ("ce_in_distill", ["gte train"]),
        ("no_teacher_weights", ["teacher.weights"]),
        ("explain", ["not an image"]),
        ("fetch_teachers", ["unknown teacher"]),
        ("eval_pth_without_arch", ["--arch"]),
        ("pth_class_mismatch", ["classes"]),
        ("labels_out_of_range", ["data.num_classes"]),
        ("eval_corrupt_safetensors", ["safetensors"]),
        ("bad_exp_grad", ["distill.exp_grad", "exact"]),
        ("frozen_topk", ["exp_topk", "frozen"]),
        ("bad_demo_background", ["demo.background", "stripes"]),
    ],
)
def test_user_error_is_one_line_exit_2(results, case, needles):
    assert_one_line_error(results[case], *needles)


def test_class_mismatch_starts_no_training(results, workspace):
    root, _ = workspace
    assert not (root / "run" / "model.safetensors").exists()


def test_help_lists_commands(tmp_path):
    res = run_gte(["--help"], tmp_path, tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    for command in ("distill", "train", "eval", "explain", "fetch-teachers"):
        assert command in res.stdout
    assert "Traceback" not in res.stderr


def test_a_recipe_error_answers_without_importing_torch(tmp_path):
    """A mistyped key or a missing recipe is the commonest error: it is said before torch's ~3 s import."""
    code = ("import sys; from gte.cli import main; sys.argv = ['gte', 'distill', '--set', 'optim.lrr=1']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.stdout.split() == ["2", "False"], (res.stdout, res.stderr)
    assert "optim.lrr" in res.stderr


def test_no_arguments_shows_help(tmp_path):
    res = run_gte([], tmp_path, tmp_path, timeout=60)
    assert res.returncode in (0, 2)
    assert "distill" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command", [["distill"], ["data", "shard", "imagefolder"], ["eval"]])
def test_help_shows_flags_as_flags(command, tmp_path):
    res = run_gte([*command, "--help"], tmp_path, tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "<bool>" not in res.stdout and "BOOLEAN" not in res.stdout, res.stdout
    assert "<str>" in res.stdout or "<path>" in res.stdout  # options that take a value still say what value


def test_accelerate_launch_of_two_cpu_processes_is_one_line(workspace):
    """Without --multi_gpu, `accelerate launch --num_processes 2` starts one process on a CPU machine: gte refuses it
    in one line, and the launcher, which would print its own traceback for any failing child, is ended quietly."""
    root, spec = workspace
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.is_file():
        pytest.skip("accelerate's console script is not installed beside this Python")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: accelerate starts the processes asked for")
    env = {k: v for k, v in os.environ.items() if k != "GTE_DEBUG"}
    env.update(GTE_HOME=str(root), OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1")
    res = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gte", "train", "-r",
                          str(root / "recipe.toml"), "--out", str(root / "accelerate-run")],
                         capture_output=True, text=True, env=env, cwd=root, timeout=180)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    report = f"rc={res.returncode}\n{res.stderr[-3000:]}"
    assert res.returncode != 0 and "Traceback" not in res.stderr, report
    assert len(lines) == 1 and lines[0].startswith("gte: error: ") and "--multi_gpu" in lines[0], report


def _leaf_commands(group, path=()):
    import typer.main

    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_every_command_help_ends_with_an_example():
    """Every leaf command's --help shows a runnable example (the `gte data` family included)."""
    from gte.cli import app

    leaves = list(_leaf_commands(app))
    assert len(leaves) >= 15
    missing = [" ".join(p) for p, cmd in leaves if not (cmd.epilog or "").startswith("Example: gte ")]
    assert not missing, missing
