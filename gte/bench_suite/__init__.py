"""``gte bench --suite gpu``: the standing GPU checks and figures in one run, as one JSON-able result.

Sections (each records the machine and the exact command; one that cannot run says why):

- ``correctness`` (:mod:`gte.bench_suite.checks`): an e2KD step on the device equals the CPU step (B-cos and GradCAM
  students, fp32), bf16 autocast trains, fp16 loss scaling does not overflow silently;
- ``ddp`` (:mod:`gte.bench_suite.ddp`): 2 ranks equal 1 rank with gradient accumulation (NCCL with ≥ 2 GPUs, else 2
  gloo processes on the CPU);
- ``figures`` (:mod:`gte.bench_suite.figures`): ``gte bench`` rows per pair, precision and run option;
- ``loader`` and ``loader_vs_device``: the host's DataLoader img/s with its CPUs as workers, against each figures row.

On CUDA the sizes are the issue's (:data:`GPU`: 224², batch 64, B-cos ResNet-34 / DenseNet-169 → ResNet-18); with
``device="cpu"`` the same code runs at :data:`TINY` sizes, as a dry run. The time budget guards the figures runs
(the others have fixed, small costs): a run that would not fit is skipped and listed with the time left.

Time on one H100, estimated (no GPU has run it yet): correctness ≈ 30 s (the CPU reference steps at 224², batch 8,
dominate), ddp ≈ 15 s, loader ≈ 30 s (4096 decodes per decoder and worker count), figures ≈ 10–15 s per eager run
(≈ 95 steps at batch 64) and 1–2 min per compiled one (inductor compiling the teacher's forward and W(x)): the eager
runs fit, the compiled ones are what the guard drops first when time runs short.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from gte.bench_suite.figures import FigureRun, compare, figure_runs, run_figures, run_loader, usable_cpus
from gte.errors import GteError

BCOS_TINY = ("bcos_cifar_resnet20", "bcos_cifar_resnet20")


@dataclass(frozen=True)
class Sizes:
    """What each section runs at (pairs are (teacher, student))."""

    name: str
    classes: int
    check_pairs: tuple[tuple[str, str], ...]  # device vs CPU step: a B-cos and a GradCAM student
    check_size: int
    check_batch: int
    train_pair: tuple[str, str]  # bf16 / fp16 training on one batch
    train_size: int
    train_batch: int
    train_steps: int
    ddp: dict  # the NCCL job (≥ 2 GPUs): teacher, student, image_size, classes, batch (global)
    bench_runs: tuple[FigureRun, ...]
    bench_size: int
    bench_batch: int
    bench_rounds: int
    bench_memory: bool  # peak memory per row (CUDA: cheap; CPU: a second process per run)
    compile_s: float  # assumed cost of a first compile, for the time guard
    loader_distinct: int  # distinct JPEGs written
    loader_batches_per_worker: int
    budget_s: float


GPU = Sizes("gpu", 1000, (("bcos_resnet34", "bcos_resnet18"), ("resnet34", "resnet18")), 224, 8,
            ("bcos_resnet34", "bcos_resnet18"), 224, 32, 50,
            {"teacher": "bcos_resnet34", "student": "bcos_resnet18", "image_size": 224, "classes": 1000, "batch": 16},
            tuple(figure_runs((("bcos_resnet34", "bcos_resnet18"), ("bcos_densenet169", "bcos_resnet18")),
                              ("fp32", "bf16"))), 224, 64, 5, True, 90.0, 256, 4, 420.0)
# The dry run: the same code at 32², 2 rounds, each precision and channels_last once; no compile_teacher (inductor's
# C++ build of even a tiny teacher takes tens of seconds on a CPU) and no CPU memory process (seconds per run).
TINY = Sizes("tiny (CPU dry run)", 10, (BCOS_TINY, ("cifar_resnet20", "cifar_resnet20")), 32, 4,
             BCOS_TINY, 32, 8, 6,
             {"teacher": BCOS_TINY[0], "student": BCOS_TINY[1], "image_size": 32, "classes": 10, "batch": 8},
             (FigureRun(*BCOS_TINY, "fp32"), FigureRun(*BCOS_TINY, "bf16", channels_last=True)), 32, 8, 2, False,
             0.0, 16, 2, 300.0)
DDP_CPU = TINY.ddp  # the gloo job, whatever the machine: the check is of gte's synchronisation, not of a model


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The facts a figure needs beside it: GPU, versions, CPUs."""
    from gte import __version__

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "gpus": gpus,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "cpus_usable": usable_cpus(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "gte": __version__}


def suite_device(name: str) -> torch.device:
    """``auto`` | ``cuda`` | ``cpu`` → the device, refusing what cannot run as asked."""
    cuda = torch.cuda.is_available()
    if name not in ("auto", "cuda", "cpu"):
        raise GteError(f"--device must be auto, cuda or cpu, not '{name}'")
    if name in ("auto", "cuda") and not cuda:
        raise GteError("gte bench --suite gpu: no CUDA device here (torch.cuda.is_available() is False); "
                       "--device cpu runs the suite's dry run at tiny sizes")
    if name == "cpu" and cuda:
        raise GteError("--device cpu on a machine with CUDA: run CUDA_VISIBLE_DEVICES= gte bench --suite gpu "
                       "--device cpu (the training engine would use the GPU)")
    return torch.device("cuda" if name != "cpu" else "cpu")


def correctness(sizes: Sizes, device: torch.device, progress: Callable[[str], None]) -> dict[str, Any]:
    """Section "correctness" (:mod:`gte.bench_suite.checks`)."""
    from gte.bench_suite.checks import device_step, train_fixed_batch

    checks = []
    for teacher, student in sizes.check_pairs:
        progress(f"suite: correctness, e2KD step {student} ← {teacher} on {device.type} vs cpu …")
        checks.append(device_step(teacher, student, size=sizes.check_size, batch=sizes.check_batch,
                                  classes=sizes.classes, device=device))
    train = dict(size=sizes.train_size, batch=sizes.train_batch, classes=sizes.classes, steps=sizes.train_steps)
    for precision in ("bf16", "fp16"):
        name = f"{precision} training {sizes.train_pair[1]} ← {sizes.train_pair[0]}"
        if precision == "fp16" and device.type != "cuda":
            checks.append({"name": name, "status": "skipped", "reason": "fp16 loss scaling needs CUDA: on CPU "
                           "Accelerate has no GradScaler and `gte distill` refuses fp16"})
        elif precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            checks.append({"name": name, "status": "skipped", "reason": "this GPU has no bf16"})
        else:
            progress(f"suite: correctness, {name}, {sizes.train_steps} steps …")
            checks.append(train_fixed_batch(*sizes.train_pair, precision=precision, **train))
    return {"status": "ran", "checks": checks}


def ddp(sizes: Sizes, device: torch.device, directory: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Section "ddp" (:mod:`gte.bench_suite.ddp`): NCCL with ≥ 2 GPUs, else 2 gloo processes on the CPU."""
    from gte.bench_suite.ddp import run_ddp_check

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    nccl = gpus >= 2
    progress(f"suite: ddp, 2 ranks ({'NCCL' if nccl else 'gloo, CPU'}) vs 1 rank accumulating …")
    out = run_ddp_check(sizes.ddp if nccl else DDP_CPU, directory, nccl=nccl, threads=max(1, usable_cpus() // 2))
    if not nccl:
        out["nccl"] = {"status": "skipped", "reason": f"{gpus} GPU{'' if gpus == 1 else 's'}: NCCL needs 2; "
                       "the check ran on 2 gloo processes on the CPU instead"}
    return out


def run_suite(device_name: str = "auto", *, budget_s: float = 0.0, command: str = "",
              console: Console | None = None) -> dict[str, Any]:
    """Every section (see the module docstring); ``budget_s`` 0 = the sizes' own (on CUDA 420 s: a minute's margin
    under 8 for a run that takes longer than the guard estimated)."""
    console = console or Console(stderr=True)
    device = suite_device(device_name)
    sizes = GPU if device.type == "cuda" else TINY
    budget = budget_s or sizes.budget_s
    start = time.monotonic()
    deadline = start + budget
    common = {"machine": machine(), "command": command}
    sections: dict[str, dict[str, Any]] = {}

    def section(name: str, run: Callable[[], dict[str, Any]]) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            sections[name] = {"status": "skipped", "reason": f"time budget of {budget:.0f} s spent"}
        else:
            t0 = time.monotonic()
            try:
                sections[name] = run()
            except Exception as e:  # noqa: BLE001 — one section's crash (OOM, a compiler) must not lose the others
                sections[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            sections[name]["seconds"] = round(time.monotonic() - t0, 1)
        sections[name] = {**sections[name], **common}

    with tempfile.TemporaryDirectory(prefix="gte-suite-") as tmp:
        section("correctness", lambda: correctness(sizes, device, console.print))
        section("ddp", lambda: ddp(sizes, device, Path(tmp) / "ddp", console.print))
    section("loader", lambda: run_loader(distinct=sizes.loader_distinct, image_size=sizes.bench_size,
                                         batch=sizes.bench_batch, batches_per_worker=sizes.loader_batches_per_worker,
                                         progress=console.print))
    section("figures", lambda: run_figures(sizes.bench_runs, size=sizes.bench_size, batch=sizes.bench_batch,
                                           classes=sizes.classes, steps=sizes.bench_rounds, deadline=deadline,
                                           memory=sizes.bench_memory, compile_s=sizes.compile_s, console=console))
    if device.type == "cpu":
        sections["figures"]["not_in_dry_run"] = (
            "run.compile_teacher (inductor's C++ build of even a tiny teacher takes tens of seconds on a CPU), peak "
            "memory (on a CPU a second process per run), the fp32/bf16 × channels_last cross product")
    sections["loader_vs_device"] = {**compare(sections["figures"], sections["loader"]), **common}
    failures = [c["name"] for c in sections["correctness"].get("checks", []) if c["status"] == "fail"]
    failures += [f"{name}: {sections[name]['error']}" for name in sections if sections[name]["status"] == "error"]
    failures += [f"figures: {f['run']}: {f['error']}" for f in sections["figures"].get("failed_runs", [])]
    if sections["ddp"]["status"] == "fail":
        failures.append("ddp: 2 ranks vs 1 rank with accumulation" + (f": {sections['ddp']['error']}"
                                                                     if "error" in sections["ddp"] else ""))
    return {"suite": "gpu", "device": device.type, "sizes": sizes.name, "budget_s": budget,
            "seconds": round(time.monotonic() - start, 1), **common, "passed": not failures, "failures": failures,
            "sections": sections}
