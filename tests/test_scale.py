"""Multi-process and resumable training: DDP equivalence, launch guard, SIGKILL/SIGTERM resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gte.data.synthetic import write_synthetic_split
from gte.models import build_model, save_model

SCRIPTS = Path(__file__).parent / "scripts"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _env(tmp_path: Path) -> dict[str, str]:
    # one thread: bit-identical CPU kernels between runs; no GPU
    return {**os.environ, "OMP_NUM_THREADS": "1", "GTE_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("t") / "teacher.safetensors"
    model = build_model("bcos_cifar_resnet20", 4)
    with torch.no_grad():  # realistic BN statistics, so the teacher's logits and maps are not degenerate
        model.train()(torch.cat([torch.rand(16, 3, 32, 32), 1 - torch.rand(16, 3, 32, 32)], 1))
    save_model(model, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["e2kd", "crd+e2kd", "reviewkd"])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, teacher, method):
    """Student weights (and a method's trainable parts and memory: CRD's heads and banks) after 3 steps of 2 processes
    equal 1 process accumulating the same 2 micro-batches; the memory is identical on both ranks."""
    env = _env(tmp_path)
    one, two, half = tmp_path / "one.safetensors", tmp_path / "two.safetensors", tmp_path / "half.safetensors"
    script = str(SCRIPTS / "ddp_step.py")
    run = [sys.executable, script]
    subprocess.run(run + [str(one), str(teacher), "2", method], env=env, check=True, capture_output=True)
    res = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(random.randint(20000, 40000)),
                          script, str(two), str(teacher), "1", method], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    subprocess.run(run + [str(half), str(teacher), "1", method], env=env, check=True, capture_output=True)
    a, b, c = load_file(str(one)), load_file(str(two)), load_file(str(half))
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert params
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    # the comparison can fail: half the global batch gives different weights
    assert any(not torch.allclose(c[k], a[k], rtol=1e-5, atol=1e-7) for k in params)
    if method.startswith("crd"):
        m1, r0, r1 = (load_file(f"{p}.method") for p in (f"{one}.rank0", f"{two}.rank0", f"{two}.rank1"))
        assert {"state.memory_s", "state.memory_t", "parts.embed_s.linear.weight"} <= set(m1)
        for k in m1:
            assert torch.equal(r0[k], r1[k]), k  # every rank holds the same memory and heads
            torch.testing.assert_close(r0[k], m1[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["accelerate-cpu", "world-size-without-group"])
def test_launches_that_would_not_synchronise_are_refused(tmp_path, teacher, launch):
    shards = write_synthetic_split(tmp_path / "data", "distill", 32, image_size=32, num_classes=4)
    recipe = _recipe(tmp_path, teacher, shards, tmp_path / "out")
    env = _env(tmp_path)
    if launch == "accelerate-cpu":  # documented to run ONE process silently
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gte"]
    else:  # a rank of a 2-process job whose process group was never set up
        env.update({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
        env.pop("MASTER_ADDR", None)
        cmd = [sys.executable, "-m", "gte"]
    res = subprocess.run(cmd + ["distill", "--recipe", str(recipe)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode != 0
    errors = [x for x in res.stderr.splitlines() if x.startswith("gte: error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    if launch != "accelerate-cpu":  # accelerate's own launcher prints a traceback when its child exits non-zero
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _recipe(tmp_path: Path, teacher: Path, shards: str, out: Path, method: str = "e2kd", workers: int = 0) -> Path:
    text = f"""
[data]
train = "{shards}"
num_classes = 4
image_size = 32
eval_resize = 32
crop_scale = [0.5, 1.0]
num_workers = {workers}
[teacher]
arch = "bcos_cifar_resnet20"
weights = "{teacher}"
[student]
arch = "bcos_cifar_resnet20"
[distill]
method = "{method}"
lambda_exp = 5.0
options = {{{'nce_k = 16' if method == 'crd' else ''}}}
[optim]
epochs = 2
batch_size = 8
warmup_epochs = 1
[run]
out = "{out}"
seed = 3
log_every = 1
checkpoint_every = 1
keep_checkpoints = 2
"""
    path = tmp_path / f"{out.name}.toml"
    path.write_text(text)
    return path


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [p for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
        if any(int(p.name[5:]) >= step for p in done):
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited early"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, teacher):
    """Shards shared by the kill tests, and their uninterrupted runs, made once per (method, workers)."""
    root = tmp_path_factory.mktemp("kill")
    shards = write_synthetic_split(root / "data", "distill", 96, image_size=32, num_classes=4, samples_per_shard=30)
    done: dict[tuple[str, int], Path] = {}

    def run(method: str, workers: int) -> tuple[str, Path]:
        if (method, workers) not in done:
            out = root / f"ref-{method}-{workers}"
            recipe = _recipe(root, teacher, shards, out, method, workers)
            subprocess.run([sys.executable, "-m", "gte", "distill", "--recipe", str(recipe)], env=_env(root),
                           check=True, capture_output=True)
            done[method, workers] = out
        return shards, done[method, workers]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("how, method", [("sigkill", "e2kd"), ("sigterm", "e2kd"), ("sigint-group", "e2kd"),
                                         ("sigterm-group", "e2kd"), ("sigkill", "crd"), ("sigkill", "reviewkd")])
def test_killed_run_resumes_to_identical_weights(tmp_path, teacher, reference_runs, how, method):
    """Killed at a random step and run again: the same weights as an uninterrupted run (crd: also its trainable
    heads and memory bank, restored from the checkpoint's method.safetensors). ``-group``: the signal goes to the
    whole process group with DataLoader workers running, as Ctrl-C, ``timeout`` and SLURM preemption send it."""
    workers = 2 if how.endswith("-group") else 0  # the same workers in both runs: the plan is exact per worker count
    shards, ref_out = reference_runs(method, workers)
    env = _env(tmp_path)
    gte = [sys.executable, "-m", "gte", "distill", "--recipe"]
    run_out = tmp_path / "run"

    recipe = _recipe(tmp_path, teacher, shards, run_out, method, workers)
    proc = subprocess.Popen(gte + [str(recipe)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    kill_at = random.Random().randint(2, 20)  # 12 steps per epoch × 2 epochs = 24 steps
    _wait_for_step(run_out, kill_at, proc)
    sig = {"sigkill": signal.SIGKILL, "sigint-group": signal.SIGINT}.get(how, signal.SIGTERM)
    if how.endswith("-group"):
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig, err
        lines = [x for x in err.splitlines() if x.strip()]
        assert "checkpoint saved" in lines[-1] and "Traceback" not in err, err
    else:
        assert proc.returncode == -signal.SIGKILL
    # nothing left half-written looks like a checkpoint
    for ckpt in (run_out / "checkpoints").glob("step-*"):
        method_file = {"method.safetensors"} if method in ("crd", "reviewkd") else set()
        assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.pt", "position.json", *method_file}
        json.loads((ckpt / "position.json").read_text())
    assert len(list((run_out / "checkpoints").glob("step-*"))) <= 2
    assert not (run_out / "model.safetensors").exists()

    res = subprocess.run(gte + [str(recipe)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    if method in ("crd", "reviewkd"):  # trainable parts (and CRD's memory) at the end equal the uninterrupted run's
        last = "checkpoints/step-00000024/method.safetensors"
        m_ref, m_run = load_file(str(ref_out / last)), load_file(str(run_out / last))
        assert m_ref.keys() == m_run.keys() and any(k.startswith("parts.") for k in m_ref)
        for k in m_ref:
            assert torch.equal(m_ref[k], m_run[k]), k
    a = load_file(str(ref_out / "model.safetensors"))
    b = load_file(str(run_out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (run_out / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert steps == list(range(1, 25))  # no step logged twice, none missing


@pytest.mark.slow
def test_a_stopped_torchrun_job_checkpoints_and_ends_in_one_line(tmp_path, teacher, reference_runs):
    """SIGTERM to the whole process group of `python -m gte.launch` (torchrun's agent, 2 ranks, a DataLoader worker
    each), as `scancel` / a preemption sends it: every rank stops at the same step, rank 0 saves a checkpoint and says
    so in one line, the job exits 128 + SIGTERM (torchrun itself: a traceback and exit 1); the same command resumes."""
    shards, _ = reference_runs("e2kd", 0)
    recipe = _recipe(tmp_path, teacher, shards, tmp_path / "run", "e2kd", workers=1)
    cmd = [sys.executable, "-m", "gte.launch", "--nproc_per_node", "2", "--master_port",
           str(random.randint(20000, 40000)), "-m", "gte", "distill", "--recipe", str(recipe)]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_step(tmp_path / "run", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("data.")]
    assert len(lines) == 1 and "checkpoint saved" in lines[0] and "Traceback" not in err, err
    cmd[cmd.index("--master_port") + 1] = str(random.randint(20000, 40000))
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "resuming from" in res.stderr, res.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
