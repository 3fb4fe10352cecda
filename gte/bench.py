"""``gte bench``: what a training step of each method costs, in one process, on the same models and batch.

Rows: student only (CE), KD (live teacher), e2KD live at K = 1 and K = 16, e2KD frozen (stored logits + map), and a
*reference* e2KD step written the straightforward way (teacher forward + ``autograd.grad`` for its map, student
forward in explanation mode + ``autograd.grad(create_graph=True)``, KD on those same student logits, nothing else).

A step = forward, backward and an Adam update of the student on one fixed random batch (models randomly initialised:
the cost does not depend on the weights; no data loading is timed — for frozen e2KD the stored logits/map are
computed once beforehand, as ``gte precompute`` would). Each row runs ``warmup`` untimed steps, then ``steps`` timed
ones; the median step time gives img/s. K = 16 is derived, not timed: one guided step (the K = 1 time) and 15 unguided
ones (plain KD) per 16 steps, ``(t_e2kd + 15·t_kd) / 16``; its memory is the guided step's.

Memory: on GPU, ``torch.cuda.max_memory_allocated`` during the row's steps minus what was allocated before them (the
step's transient tensors + optimizer state created in it). On CPU, the peak resident set size (``/proc/self/statm``,
sampled every millisecond by a helper process) during the row's steps minus the RSS just before them, after ``malloc_trim`` —
an approximation: the allocator may reuse memory freed by an earlier row, so small differences are noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from gte.config import DistillConfig, Recipe
from gte.errors import GteError
from gte.losses import explanation_loss, kd_loss


class PeakMemory:
    """Peak extra memory (bytes) of the code inside ``with`` (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._base = self.rss()
        # sampled by another process: a sampling thread here would fight the training step for the GIL
        self._sampler = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid())], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self._sampler.stdout.readline()  # started
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        peak, _ = self._sampler.communicate("")
        self.peak = max(0, max(int(peak), self.rss()) - self._base)


_SAMPLER = """
import os, sys, threading, time
path, page, peak, done = f"/proc/{sys.argv[1]}/statm", os.sysconf("SC_PAGE_SIZE"), 0, threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("ready", flush=True)
while not done.is_set():
    with open(path) as f:
        peak = max(peak, int(f.read().split()[1]) * page)
    time.sleep(0.001)
print(peak)
"""


def reference_e2kd_loss(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: DistillConfig,
                        explainer: str) -> torch.Tensor:
    """e2KD the straightforward way: teacher forward + grad for its map, ONE student forward (explanation mode for
    B-cos) + grad with create_graph, KD on that forward's logits."""
    from gte.explain import explain_with_logits
    from gte.models import info, to_model_input

    t_maps, t_logits = explain_with_logits(teacher, to_model_input(info(teacher), images), None, explainer)
    classes = t_logits.argmax(1)
    s_maps, s_logits = explain_with_logits(student, to_model_input(info(student), images), classes, explainer,
                                           create_graph=True)
    return kd_loss(s_logits, t_logits, cfg.temperature) + cfg.lambda_exp * explanation_loss(s_maps, t_maps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> tuple[list[float], int]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times, mem.peak


def run_bench(recipe: Recipe, *, steps: int = 10, batch: int = 0, warmup: int = 1,
              console: Console | None = None) -> dict[str, Any]:
    """Time every row (see the module docstring); returns the JSON-able result."""
    from gte.methods.ce import LabelsOnly
    from gte.methods.e2kd import E2KD
    from gte.methods.kd import KD
    from gte.models import build_model, check_arch, freeze, info
    from gte.precompute import teacher_outputs

    console = console or Console(stderr=True)
    d = recipe.data
    check_arch(recipe.student.arch)
    if not recipe.teacher.arch:
        raise GteError("gte bench needs teacher.arch (weights are not needed: models are randomly initialised)")
    check_arch(recipe.teacher.arch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = batch or recipe.optim.batch_size
    torch.manual_seed(0)
    student = build_model(recipe.student.arch, d.num_classes).to(device).train()
    teacher = freeze(build_model(recipe.teacher.arch, d.num_classes)).to(device)
    images = torch.rand(b, 3, d.image_size, d.image_size, device=device)
    labels = torch.randint(0, d.num_classes, (b,), device=device)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-6)
    explainer = recipe.distill.explainer if recipe.distill.explainer != "auto" else info(student).explainer

    def cfg(**kw) -> DistillConfig:
        c = DistillConfig(**{**recipe.distill.__dict__, "multilabel": False, "frozen": False})
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    with torch.no_grad():
        t_logits, t_maps = teacher_outputs(teacher, images, explainer)  # what `gte precompute` would have stored
    frozen = {"logits": t_logits, "map": t_maps}

    def method_step(method, step_index: int = 0, **kw) -> Callable[[], None]:
        def step() -> None:
            loss, _ = method.loss(images, labels, step_index, **kw)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def reference_step() -> None:
        loss = reference_e2kd_loss(student, teacher, images, cfg(), explainer)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows_spec: list[tuple[str, str, Callable[[], None]]] = [
        ("ce", "student only (CE)", method_step(LabelsOnly(cfg(method="ce"), student))),
        ("kd", "KD (live teacher)", method_step(KD(cfg(method="kd"), student, teacher))),
        ("e2kd_frozen", "e2KD frozen", method_step(E2KD(cfg(frozen=True), student, None), frozen=frozen)),
        ("e2kd_k1", "e2KD live K=1", method_step(E2KD(cfg(guided_every=1), student, teacher))),
        ("reference", "e2KD reference (naive)", reference_step),
    ]
    results: dict[str, dict[str, Any]] = {}
    for _ in range(2):  # first steps pay one-off costs (allocator, kernels): not any row's
        rows_spec[3][2]()
    for key, label, step in rows_spec:
        console.print(f"bench: {label} …")
        times, peak = time_steps(step, steps, warmup, device)
        med = statistics.median(times)
        results[key] = {"name": label, "step_s": med, "img_per_s": b / med, "peak_mem_mib": peak / 2**20,
                        "times_s": times}
    k1, kd = results["e2kd_k1"], results["kd"]
    k16 = (k1["step_s"] + 15 * kd["step_s"]) / 16
    results["e2kd_k16"] = {"name": "e2KD live K=16 (derived)", "step_s": k16, "img_per_s": b / k16,
                           "peak_mem_mib": k1["peak_mem_mib"], "times_s": []}
    order = ["ce", "kd", "e2kd_k1", "e2kd_k16", "e2kd_frozen", "reference"]
    ce_t, ref_t = results["ce"]["step_s"], results["reference"]["step_s"]
    rows = []
    for key in order:
        r = results[key]
        rows.append({"key": key, **r, "x_ce": r["step_s"] / ce_t, "speedup_vs_reference": ref_t / r["step_s"]})
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "student": recipe.student.arch, "teacher": recipe.teacher.arch, "explainer": explainer,
        "image_size": d.image_size, "batch": b, "steps": steps, "warmup": warmup,
        "memory": ("torch.cuda.max_memory_allocated during the steps minus allocated before" if device.type == "cuda"
                   else "peak RSS (/proc/PID/statm sampled every 1 ms by a helper process) during the steps minus RSS before, after malloc_trim"),
        "torch": torch.__version__, "rows": rows,
    }


def table(result: dict[str, Any]) -> Table:
    t = Table(title=f"{result['student']} ← {result['teacher']}, {result['image_size']}², batch {result['batch']}, "
                    f"{result['device']}")
    for col in ("method", "ms/step", "img/s", "peak MiB", "time × CE", "speed-up vs reference"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in result["rows"]:
        t.add_row(r["name"], f"{1000 * r['step_s']:.1f}", f"{r['img_per_s']:.1f}", f"{r['peak_mem_mib']:.0f}",
                  f"{r['x_ce']:.2f}", f"{r['speedup_vs_reference']:.2f}")
    return t


def bench_command(recipe: Recipe, *, steps: int, batch: int, warmup: int, json_out: str | None) -> dict[str, Any]:
    err = Console(stderr=True)
    result = run_bench(recipe, steps=steps, batch=batch, warmup=warmup, console=err)
    Console().print(table(result))
    Console().print(f"memory: {result['memory']}", highlight=False)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result
