"""Section "ddp" of ``gte bench --suite gpu``: 2 ranks of DDP equal 1 rank accumulating the same global batch.

Three e2KD trainings of 3 optimiser steps on the same fixed global batches, each through gte's training engine
(:func:`gte.engine.setup`, ``accumulate``, ``update``), seeded alike:

- **two ranks** (``python -m gte.launch --standalone --nproc_per_node 2 -m gte.bench_suite.ddp JOB``): each rank
  takes its half of every global batch, ``optim.grad_accum = 1``;
- **one rank** (``python -m gte.bench_suite.ddp JOB --one``): both halves as two micro-batches, ``grad_accum = 2``;
- **control** (in the same process as the one rank): the first half only, ``grad_accum = 1`` — half the global batch,
  which must *not* match: the comparison can fail.

The student's weights after the 3 steps are compared by :func:`gte.bench_suite.checks.relative_error` (worst
``‖w_2 − w_1‖ / ‖w_1‖`` over its parameters), pass at ≤ 1e-4. With ≥ 2 GPUs the ranks run on NCCL, one GPU each, and
the one rank on GPU 0 (TF32 off); otherwise, on 2 gloo processes on the CPU (``CUDA_VISIBLE_DEVICES=""``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from gte.bench_suite.checks import TOLERANCE, exact_fp32, pair_recipe, relative_error

STEPS = 3


def train(job: dict[str, Any], accum: int, halves: int) -> dict[str, torch.Tensor]:
    """The student's parameters after ``STEPS`` steps; this process takes ``halves`` halves of each global batch
    (its own half when launched with 2 ranks)."""
    from gte.engine import StopFlags, setup

    b, size, classes = job["batch"], job["image_size"], job["classes"]
    recipe = pair_recipe(job["teacher"], job["student"], size, classes, run={"seed": 0},
                         optim={"batch_size": b // 2, "grad_accum": accum, "epochs": 1, "warmup_epochs": 0})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine = setup(recipe, n_train=b // 2 * world * accum * STEPS)  # STEPS optimiser steps in every run
    rank = engine.accelerator.process_index
    g = torch.Generator().manual_seed(123)
    flags = StopFlags()
    try:
        for step in range(STEPS):
            images, labels = torch.rand(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)
            index = torch.arange(b * step, b * step + b)
            parts = [rank] if world > 1 else range(halves)  # half h = what rank h takes
            micro = [slice(h * b // 2, (h + 1) * b // 2) for h in parts]
            engine.accumulate(iter([{"image": images[s], "label": labels[s], "index": index[s]} for s in micro]),
                              step, flags)
            engine.update()
    finally:
        flags.restore()
    return {n: p.detach().cpu().contiguous() for n, p in engine.model().named_parameters()}


def main(argv: list[str]) -> None:
    """Worker entry point: ``JOB.json`` (2 ranks under a launcher) or ``JOB.json --one`` (one rank + control)."""
    from safetensors.torch import save_file

    job = json.loads(Path(argv[0]).read_text())
    out = Path(job["dir"])
    with exact_fp32():
        if argv[1:] == ["--one"]:
            save_file(train(job, accum=2, halves=2), str(out / "one.safetensors"))
            save_file(train(job, accum=1, halves=1), str(out / "control.safetensors"))
        else:
            weights = train(job, accum=1, halves=1)
            if int(os.environ.get("RANK", "0")) == 0:
                save_file(weights, str(out / "two.safetensors"))


def run_ddp_check(job: dict[str, Any], directory: Path, *, nccl: bool, threads: int) -> dict[str, Any]:
    """Launch the runs of the module docstring in ``directory`` and compare (``job``: teacher, student, image_size,
    classes, batch = the global batch)."""
    from safetensors.torch import load_file

    directory.mkdir(parents=True, exist_ok=True)
    job = {**job, "dir": str(directory)}
    (directory / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not nccl:
        env["CUDA_VISIBLE_DEVICES"] = ""
    python = [sys.executable, "-m"]
    job_file = str(directory / "job.json")
    launches = {"one": [*python, "gte.bench_suite.ddp", job_file, "--one"],
                "two": [*python, "gte.launch", "--standalone", "--nproc_per_node", "2", "-m", "gte.bench_suite.ddp",
                        job_file]}
    out: dict[str, Any] = {"backend": "nccl" if nccl else "gloo, CPU",
                           **{k: job[k] for k in ("teacher", "student", "image_size", "batch")}, "steps": STEPS,
                           "threads_per_process": threads,
                           "commands": {k: shlex.join(v) for k, v in launches.items()}, "tolerance": TOLERANCE,
                           "measure": "max over parameters of |w_2ranks - w_1rank| / |w_1rank| after 3 steps; rel_all: "
                                      "over all parameters as one vector"}
    # both at once: on a small CPU machine most of each run is starting Python and importing torch
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, cmd in launches.items()}
    errors = []
    for name, p in procs.items():
        try:
            _, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            stderr = p.communicate()[1] + "\n(killed after 600 s)"
        if p.returncode != 0:
            errors.append(f"{name}: exit {p.returncode}: " + " | ".join(stderr.strip().splitlines()[-3:]))
    if errors:
        return {**out, "status": "fail", "error": "; ".join(errors)}
    one, two, control = (load_file(str(directory / f"{k}.safetensors")) for k in ("one", "two", "control"))
    error = relative_error(two, one)
    control_rel = relative_error(control, one)["rel"]
    return {**out, **error, "parameters_compared": len(one),
            "status": "pass" if error["rel"] <= TOLERANCE and control_rel > TOLERANCE else "fail",
            "control": {"what": "1 rank on the first half of each global batch only", "rel": control_rel,
                        "detected": control_rel > TOLERANCE}}


if __name__ == "__main__":
    main(sys.argv[1:])
