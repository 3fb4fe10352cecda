"""Output that cannot be written: a read-only destination for each command, and a disk that fills up while sharding
and while checkpointing. Each is one line on stderr with exit code 2, and nothing written before is lost.

Read-only: a directory of mode 555, or, as root (whom file modes do not stop), a read-only bind mount of it. Full
disk: a shard's temporary file linked to /dev/full (the kernel answers ENOSPC to every write), and a training run
on a 5 MiB tmpfs mounted in a private mount namespace (``unshare``), which disappears with the process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import tomli_w

from _fixtures import run_main, write_imagefolder


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture()
def read_only_dir(tmp_path):
    """A directory holding ``earlier.txt`` in which this process cannot create files."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "earlier.txt").write_text("written before")
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if shutil.which("mount") is None or not _mount("--bind", str(d), str(d)):
        pytest.skip("running as root, where file modes do not stop writes, without the right to mount read-only")
    try:
        if not _mount("-o", "remount,bind,ro", str(d)):
            pytest.skip("running as root, where file modes do not stop writes, and a read-only remount is refused")
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, teacher_path):
    """Shards, a 4-class model, an image tree and a distillation recipe."""
    from gte.data.synthetic import write_synthetic_split

    root = tmp_path_factory.mktemp("inputs")
    spec = write_synthetic_split(root / "d", "test", 16, image_size=32, num_classes=4)
    write_imagefolder(root / "tree", {"a": 2, "b": 2})
    recipe = {"data": {"train": spec, "num_classes": 4, "image_size": 32, "eval_resize": 32, "num_workers": 0},
              "teacher": {"arch": "bcos_cifar_resnet20", "weights": str(teacher_path)},
              "student": {"arch": "bcos_cifar_resnet20"}, "distill": {"method": "kd"},
              "optim": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}}
    (root / "kd.toml").write_text(tomli_w.dumps(recipe))
    return {"spec": spec, "model": str(teacher_path), "tree": str(root / "tree"), "recipe": str(root / "kd.toml"),
            "image": str(root / "tree" / "a" / "img_0.jpg")}


@pytest.mark.parametrize("command", [
    "distill --recipe {recipe} --out {ro}/run",
    "data shard imagefolder {tree} --out {ro}",
    "explain {image} --model {model} --out {ro}/e.png",
    "eval {model} --data {spec} --json {ro}/m.json",
], ids=["distill", "shard", "explain", "eval"])
def test_a_read_only_destination_is_one_line_and_loses_nothing(command, inputs, read_only_dir, monkeypatch,
                                                               capsys):
    before = sorted(os.listdir(read_only_dir))
    code, out, err = run_main(command.format(ro=read_only_dir, **inputs).split(), monkeypatch, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and str(read_only_dir) in lines[0], err
    assert "read-only file system" in lines[0] or "permission denied" in lines[0], err
    assert ".tmp" not in lines[0] and not out.strip(), out  # said before any work (no table), on the path given
    assert sorted(os.listdir(read_only_dir)) == before
    assert (read_only_dir / "earlier.txt").read_text() == "written before"


def test_a_full_disk_while_sharding_keeps_the_finished_shards(inputs, tmp_path, monkeypatch, capsys):
    from gte.data.index import read_side_index
    from gte.data.tar import iter_samples
    from gte.io import temporary_path

    out = tmp_path / "shards"
    out.mkdir()
    # the second shard's temporary file is /dev/full: every write to it fails with ENOSPC, as on a full disk
    os.symlink("/dev/full", temporary_path(out / "train-000001.tar"))
    argv = ["data", "shard", "imagefolder", inputs["tree"], "--out", str(out), "--max-samples", "2", "--no-shuffle"]
    code, _, err = run_main(argv, monkeypatch, capsys)
    errors = [x for x in err.splitlines() if x.startswith("gte: error: ")]  # after the progress bar's last state
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "No space left on device" in errors[0] and "disk is full" in errors[0] and "train-000001.tar" in errors[0]
    assert ".tmp" not in errors[0]  # the shard the user will look for, not its temporary file
    assert len(list(iter_samples(str(out / "train-000000.tar")))) == 2  # the finished shard is kept, whole
    assert not (out / "train-000001.tar").exists() and not list(out.glob(".*.tmp"))
    assert read_side_index(out)["shards"]["train-000000.tar"]["n"] == 2
    code, _, err = run_main(argv, monkeypatch, capsys)  # space freed: the run completes, the first shard is kept
    assert code == 0, err
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


def _private_mounts() -> list[str] | None:
    """The ``unshare`` command line for a private mount namespace where this user may mount a tmpfs, or None."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    prefix = [exe, "--mount"] if os.geteuid() == 0 else [exe, "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoint(inputs, tmp_path):
    prefix = _private_mounts()
    if prefix is None:
        pytest.skip("no private mount namespace (unshare) in which to mount a small tmpfs")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    gte = [sys.executable, "-m", "gte", "train", "--recipe", "demo", "--set", f"data.train={inputs['spec']}",
           "--set", "optim.batch_size=4", "--set", "data.num_workers=0", "--set", "optim.epochs=3",
           "--out", str(disk / "run")]
    # One checkpoint of this 4-class bcos_cifar_resnet20 (weights + Adam state) takes 3.2 MiB: the first (epoch 1)
    # fits in 5 MiB, the second does not. What the run left is copied out before the namespace, and its tmpfs, go.
    script = 'mount -t tmpfs -o size=5m tmpfs "$1" || exit 99; shift; "$@"; rc=$?; cp -r "$DISK/run" "$KEPT"; exit $rc'
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1", "DISK": str(disk),
           "KEPT": str(kept), "GTE_HOME": str(tmp_path / "home")}
    env.pop("GTE_DEBUG", None)
    res = subprocess.run([*prefix, "sh", "-c", script, "sh", str(disk), *gte], capture_output=True, text=True,
                         env=env, timeout=300)
    report = f"rc={res.returncode}\n{res.stderr[-3000:]}"
    errors = [x for x in res.stderr.splitlines() if x.startswith("gte: error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(errors) == 1, report
    assert "disk is full" in errors[0] and "No space left on device" in errors[0], report
    checkpoints = sorted(p.name for p in (kept / "checkpoints").iterdir())
    assert checkpoints == ["step-00000004"], checkpoints  # epoch 1's, whole; no half-written one beside it
    step = kept / "checkpoints" / "step-00000004"
    assert json.loads((step / "position.json").read_text())["step"] == 4
    import torch
    from safetensors.torch import load_file

    assert load_file(str(step / "model.safetensors")) and torch.load(step / "state.pt", weights_only=True)
    assert (kept / "recipe.toml").is_file()
