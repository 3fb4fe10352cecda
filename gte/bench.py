"""``gte bench``: what a training step of each method costs, in one process, on the same models and batch.

Rows: student only (CE), KD (live teacher), e2KD live and frozen (stored logits + map) at K = 1 and K = 16, every other
registered method (AT, CAT-KD, CRD, DIST, DKD, ReviewKD; CRD + e2KD) with its paper defaults and live teacher, and a
*reference* e2KD step computing the same exact gradient the way the official code does (:mod:`gte.bench_reference`:
B-cos layers whose dynamic factor is saved with its graph and whose backward reads an explanation flag, W(x) by
``autograd.grad(create_graph=True)`` with the flag on, the final backward with it off, no further optimisation).

A step = forward, backward and an Adam update of the student on one fixed random batch (models randomly initialised:
the cost does not depend on the weights; no data loading is timed — for frozen e2KD the stored logits/map are
computed once beforehand, as ``gte precompute`` would). Each row runs ``warmup`` untimed steps; then ``steps`` rounds
time one step of every row in turn (interleaved, so that a slow spell of a shared machine hits all rows alike); the
median step time gives img/s. K = 16 rows time one whole guided interval per round (steps 0..15: one guided step,
15 plain KD steps) and report the median over rounds of its mean step. The teacher rows (forward; forward + W(x))
give the floor the issue sets for live e2KD: KD + the teacher's input gradient + the student's double backward
(frozen e2KD K=1 minus CE). ``precision="bf16"`` runs every forward under ``torch.autocast(bfloat16)`` (CPUs with
AMX/AVX512-BF16, GPUs).

Memory is measured after all timing, one step per row after a warm one: on GPU, ``torch.cuda.max_memory_allocated``
during the step minus what was allocated before it (the step's transient tensors). On CPU, in a second process started
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set
at once: the peak RSS (``/proc/PID/statm``, sampled every millisecond by a helper process) during the step minus the
RSS just before it. With glibc's default adaptive threshold freed blocks stay in the heap, and a row's figure depended
on the rows before it (±40 %).

The memory floor of live e2KD, stated as the time floor is: what the step must hold at least — the KD step's peak (the
same forward's saved tensors, the ordinary backward) plus what the student's W(x) adds and keeps until the final
backward (its double-backward graph, one gradient per layer, and the map). The last figure is a memory-only row
(``exp_kept``: the memory after the student's forward + W(x) minus after its forward alone). Above the floor, the
final backward holds a few gradients in flight at its largest layer (:mod:`gte.bcos_grads`).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Collection

import torch
import torch.nn as nn
from rich.console import Console

from gte.bench_reference import reference_e2kd_loss
from gte.config import DistillConfig, Recipe
from gte.engine import apply_run_options, build_models
from gte.errors import GteError
from gte.explain import choose_explainer, explain_with_logits
from gte.methods import METHODS, Batch, Context, build_method, parse_method
from gte.methods.passes import StudentPass
from gte.models import check_arch, info, to_model_input
from gte.precompute import teacher_outputs
from gte.validate import check_compilable_teacher


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak extra memory (bytes) of one step after a warm one (see the module docstring)."""
    step()
    with PeakMemory(device) as mem:
        step()
    return mem.peak


# key, label, step(index), steps per timed unit (K); K = 0: a memory-only row, whose step returns the bytes it measured
BenchRow = tuple[str, str, Callable[[int], Any], int]
# the other registered methods get one row each (paper defaults; CRD with at most 4096 negatives), and CRD + e2KD
OTHER_METHODS = [m for m in METHODS if m not in ("ce", "kd", "e2kd")] + ["crd+e2kd"]
# the rows run_bench always runs: the floors', and the first three (its warm-up runs the third, e2KD live K=1)
FLOOR_ROWS = ("ce", "kd", "e2kd_k1", "e2kd_frozen", "reference", "teacher_fwd", "teacher_explain", "exp_kept")


def build_rows(recipe: Recipe, batch: int, precision: str, device: torch.device,
               keep: Collection[str] | None = None) -> tuple[list[BenchRow], dict[str, Any]]:
    """The models, the batch and one step function per row (``run.channels_last`` and ``run.compile_teacher`` of the
    recipe apply, except to the reference step's teacher and to the teacher of methods that tap its features);
    ``keep``: only the rows with these keys (the other methods' are not even built)."""
    d = recipe.data
    check_arch(recipe.student.arch)
    if not recipe.teacher.arch:
        raise GteError("gte bench needs teacher.arch (weights are not needed: models are randomly initialised)")
    check_arch(recipe.teacher.arch)
    if precision not in ("fp32", "bf16"):
        raise GteError(f"--precision must be fp32 or bf16, not '{precision}'")
    if recipe.run.compile_teacher:
        check_compilable_teacher(recipe)
    b = batch or recipe.optim.batch_size
    torch.manual_seed(0)
    student, teacher = build_models(recipe, pretrained=False, teacher=True)
    student, teacher = student.to(device).train(), teacher.to(device)
    ref_student, ref_teacher = student, teacher  # the reference step never gets gte's options below
    if recipe.run.channels_last:
        ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    teacher = apply_run_options(recipe, student, teacher)
    images = torch.rand(b, 3, d.image_size, d.image_size, device=device)
    labels = torch.randint(0, d.num_classes, (b,), device=device)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-6)
    ref_optimizer = torch.optim.Adam(ref_student.parameters(), lr=1e-6) if ref_student is not student else optimizer
    explainer = choose_explainer(recipe.distill.explainer, info(student).bcos)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def cfg(**kw) -> DistillConfig:
        c = dataclasses.replace(recipe.distill, multilabel=False, frozen=False)
        for k, v in kw.items():
            setattr(c, k, v)
        if c.method != recipe.distill.method and "options" not in kw:
            c.options = {}  # [distill.options] belong to the recipe's own method
        return c

    with torch.no_grad():
        t_logits, t_maps = teacher_outputs(teacher, images, explainer)  # what `gte precompute` would have stored
    frozen = {"logits": t_logits, "map": t_maps}
    t_in = to_model_input(info(teacher), images)

    def train_step(loss_fn: Callable[[int], torch.Tensor], opt: torch.optim.Optimizer = optimizer
                   ) -> Callable[[int], None]:
        def step(index: int) -> None:
            with autocast():
                loss = loss_fn(index)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    indices = torch.arange(b, device=device)

    def method_step(method, frozen: dict | None = None) -> Callable[[int], None]:
        opt = optimizer  # a method with trainable parts gets an optimiser over them too, as in training
        if method.parts is not None:
            method.parts.to(device)
            opt = torch.optim.Adam([*student.parameters(), *method.parts.parameters()], lr=1e-6)
        step = train_step(lambda i: method.loss(Batch(images, labels, i, indices=indices, frozen=frozen))[0], opt)

        def with_end(i: int) -> None:
            step(i)
            method.end_step()
        return with_end

    context = Context(n_data=max(4 * b, 1024), image_size=d.image_size)

    skipped: dict[str, str] = {}

    def other(name: str) -> list[BenchRow]:
        """A row for another registered method (or one "+e2kd"), with its paper defaults (the recipe's own method:
        with its ``[distill.options]``); none (and the reason in
        ``skipped``) where the method does not apply to this pair (CAT-KD on a student whose head is not a 1×1 map
        classifier, a feature method on models with differing stage counts, …)."""
        if keep is not None and name.replace("+", "_") not in keep:
            return []
        options = {"nce_k": min(4096, context.n_data)} if name.startswith("crd") else {}
        if name == recipe.distill.method:  # the recipe's own method keeps its [distill.options]
            options = {**options, **recipe.distill.options}
        # per-call feature hooks on a compiled teacher are ignored by a graph traced without them (the KD row's):
        # methods that tap the teacher get its eager module
        taps = parse_method(name)[0].needs.teacher_features
        t = getattr(teacher, "_orig_mod", teacher) if taps else teacher
        try:
            method = build_method(cfg(method=name, options=options), student, t, context)
        except GteError as e:
            skipped[name] = str(e)
            return []
        return [(name.replace("+", "_"), f"{name} (live teacher)", method_step(method), 1)]

    def teacher_forward(index: int) -> None:
        with torch.no_grad(), autocast():
            teacher(t_in)

    def teacher_explain(index: int) -> None:
        with autocast():
            explain_with_logits(teacher, t_in, None, explainer)

    def explanation_kept(index: int) -> int:
        """Bytes the student's W(x) of the teacher's top-1 class adds to its forward and keeps for the final backward
        (memory-only row; the second of two calls is measured)."""
        classes = t_logits.argmax(1)
        for _ in range(2):
            with autocast():
                s = StudentPass(student, images, [], explainer)
                before = _allocated(device)
                maps = s.explain(classes)
                kept = _allocated(device) - before
            del s, maps
        return max(kept, 0)

    def e2kd(teacher_model: nn.Module | None, **kw) -> Callable[[int], None]:
        return method_step(build_method(cfg(method="e2kd", **kw), student, teacher_model),
                           frozen if kw.get("frozen") else None)

    k = 16
    rows: list[BenchRow] = [
        ("ce", "student only (CE)", method_step(build_method(cfg(method="ce"), student, None)), 1),
        ("kd", "KD (live teacher)", method_step(build_method(cfg(method="kd"), student, teacher)), 1),
        ("e2kd_k1", "e2KD live K=1", e2kd(teacher, guided_every=1), 1),
        (f"e2kd_k{k}", f"e2KD live K={k}", e2kd(teacher, guided_every=k), k),
        ("e2kd_frozen", "e2KD frozen K=1", e2kd(None, frozen=True, guided_every=1), 1),
        (f"e2kd_frozen_k{k}", f"e2KD frozen K={k}", e2kd(None, frozen=True, guided_every=k), k),
        *(row for name in OTHER_METHODS for row in other(name)),
        ("reference", "e2KD reference (official)",
         train_step(lambda i: reference_e2kd_loss(ref_student, ref_teacher, images, cfg(), explainer), ref_optimizer),
         1),
        ("teacher_fwd", "teacher forward (no grad)", teacher_forward, 1),
        ("teacher_explain", "teacher forward + " + ("W(x)" if explainer == "bcos" else "GradCAM"), teacher_explain, 1),
        ("exp_kept", "student W(x): kept for the final backward", explanation_kept, 0),
    ]
    meta = {"student": recipe.student.arch, "teacher": recipe.teacher.arch, "explainer": explainer,
            "image_size": d.image_size, "batch": b, "precision": precision,
            "channels_last": recipe.run.channels_last, "compile_teacher": recipe.run.compile_teacher,
            "skipped": skipped}
    return [r for r in rows if keep is None or r[0] in keep], meta


def _allocated(device: torch.device) -> int:
    """Bytes allocated now: CUDA's allocator count, or the resident set on CPU (which follows live memory in the
    memory process, :func:`cpu_memory_in_child`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return PeakMemory.rss()


def memory_rows(rows: list[BenchRow], device: torch.device, console: Console) -> dict[str, float]:
    """Peak MiB of each row's step (a K row: its guided step; a memory-only row: what its step measures)."""
    out = {}
    for key, label, step, cycle in rows:
        console.print(f"bench: memory of {label} …")
        out[key] = (step(0) if cycle == 0 else peak_memory(lambda: step(0), device)) / 2**20  # noqa: B023
    return out


_MEMORY_CHILD = """
import json, sys, torch
from rich.console import Console
from gte.bench import build_rows, memory_rows
from gte.config import from_dict
job = json.loads(sys.stdin.read())
torch.set_num_threads(job["threads"])
rows, _ = build_rows(from_dict(job["recipe"]), job["batch"], job["precision"], torch.device("cpu"), job["keep"])
print(json.dumps(memory_rows(rows, torch.device("cpu"), Console(stderr=True))))
"""


def cpu_memory_in_child(recipe: Recipe, batch: int, precision: str,
                        keep: Collection[str] | None = None) -> dict[str, float]:
    """CPU memory rows in a fresh process started with glibc's mmap threshold fixed at 64 KiB: every tensor gets its
    own mapping and leaves the RSS when freed, so RSS follows live memory (in-process, glibc's adaptive threshold kept
    freed blocks in the heap and a row's figure depended on the rows before it; the fixed threshold makes steps ~1.5×
    slower, hence not the timing process)."""
    job = {"recipe": recipe.to_dict(), "batch": batch, "precision": precision, "threads": torch.get_num_threads(),
           "keep": None if keep is None else sorted(keep)}
    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], input=json.dumps(job), text=True,
                       stdout=subprocess.PIPE, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
    if r.returncode != 0:
        raise GteError("gte bench: the memory measurement process failed (see above)")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_bench(recipe: Recipe, *, steps: int = 10, batch: int = 0, warmup: int = 1, precision: str = "fp32",
              console: Console | None = None, only: Collection[str] | None = None,
              measure_memory: bool = True) -> dict[str, Any]:
    """Time every row (``only``: these rows and those of the floor), then (``measure_memory``) measure its memory
    (see the module docstring); returns the JSON-able result."""
    console = console or Console(stderr=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep = None if only is None else {*(k.replace("+", "_") for k in only), *FLOOR_ROWS}
    rows_spec, meta = build_rows(recipe, batch, precision, device, keep)
    if keep is not None:
        unknown = keep - {r[0] for r in rows_spec} - {k.replace("+", "_") for k in meta["skipped"]}
        if unknown:
            known = ["e2kd_k16", "e2kd_frozen_k16", *(m.replace("+", "_") for m in OTHER_METHODS)]
            raise GteError(f"gte bench has no row {', '.join(sorted(unknown))}; rows: {', '.join(known)}")
    b = meta["batch"]
    results: dict[str, dict[str, Any]] = {}
    for i in range(2):  # first steps pay one-off costs (allocator, kernels, compilation): not any row's
        rows_spec[2][2](i)
    timed = [row for row in rows_spec if row[3] > 0]  # a memory-only row (K = 0) is not timed
    for _, label, step, cycle in timed:
        if cycle == 1:
            console.print(f"bench: warm-up {label} …")
            time_steps(lambda: step(0), 0, warmup, device)  # noqa: B023
    times: dict[str, list[float]] = {key: [] for key, *_ in timed}
    for r in range(steps):  # interleaved rounds: a slow spell of a shared machine hits every row alike
        console.print(f"bench: round {r + 1}/{steps} …")
        for key, _, step, cycle in timed:
            # a K row: one whole guided interval, steps 0..K-1 (step 0 guided), its mean step (the K = 1 rows
            # before it warmed every path); each round, like the others — one interval timed once had varied ±5 %
            t = time_steps(lambda: [step(i) for i in range(cycle)], 1, 0, device)[0]  # noqa: B023
            times[key].append(t / cycle)
    for key, label, *_ in timed:
        med = statistics.median(times[key])
        results[key] = {"name": label, "step_s": med, "img_per_s": b / med, "times_s": times[key]}
    if not measure_memory:
        memory = {}
    elif device.type == "cuda":
        memory = memory_rows(rows_spec, device, console)
    else:
        del rows_spec  # the child builds its own models
        memory = cpu_memory_in_child(recipe, b, precision, keep)
    kept = memory.pop("exp_kept", None)
    for key, mib in memory.items():
        if key in results:  # the CPU memory process measures every row
            results[key]["peak_mem_mib"] = mib
    ce_t, kd_t, ref_t = (results[x]["step_s"] for x in ("ce", "kd", "reference"))
    rows = [{"key": key, **r, "x_ce": r["step_s"] / ce_t, "x_kd": r["step_s"] / kd_t,
             "speedup_vs_reference": ref_t / r["step_s"]} for key, r in results.items()]
    # the floor for live e2KD: a KD step + the teacher's input gradient + the student's double backward
    floor = kd_t + (results["teacher_explain"]["step_s"] - results["teacher_fwd"]["step_s"]) + \
        (results["e2kd_frozen"]["step_s"] - ce_t)
    # the floor is a sum of five measured rows, so its noise is theirs added up: per round, live e2KD ÷ that round's
    # floor shows how far one run's "over the floor" can move on this machine
    per_round = [times["e2kd_k1"][i] / (times["kd"][i] + times["teacher_explain"][i] - times["teacher_fwd"][i]
                                        + times["e2kd_frozen"][i] - times["ce"][i]) for i in range(steps)]
    memory_floor = {}
    if kept is not None and "peak_mem_mib" in results["kd"]:
        kd_m = results["kd"]["peak_mem_mib"]
        memory_floor = {"peak_mem_mib": kd_m + kept, "x_kd": (kd_m + kept) / kd_m, "exp_kept_mib": kept,
                        "formula": "KD's peak + what the student's W(x) keeps until the final backward"}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        **meta, "steps": steps, "warmup": warmup,
        "memory": ("not measured" if not measure_memory else
                   "torch.cuda.max_memory_allocated during one step minus allocated before it" if device.type == "cuda"
                   else "peak RSS (/proc/PID/statm sampled every 1 ms by a helper process) during one step minus RSS "
                        "before it, in a process started with glibc's mmap threshold fixed at 64 KiB"),
        "torch": torch.__version__, "rows": rows,
        "floor": {"step_s": floor, "x_kd": floor / kd_t, "live_over_floor_per_round": per_round,
                  "formula": "KD + (teacher forward + explanation - teacher forward) + (e2KD frozen K=1 - CE)"},
        "memory_floor": memory_floor,
    }
