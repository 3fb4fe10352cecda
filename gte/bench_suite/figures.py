"""Sections "figures" and "loader" of ``gte bench --suite gpu``: step cost on the device, and whether the host's
DataLoader workers keep up with it.

**figures**: ``gte bench`` (:func:`gte.bench.run_bench`) restricted to the rows CE, KD, e2KD live K=1 / K=16, e2KD
frozen K=1 / K=16, the reference e2KD step and the teacher rows of the floor, for each teacher → student pair,
precision (fp32, bf16 autocast) and variant (eager NCHW; ``run.channels_last`` + ``run.compile_teacher``), in that
order of priority: the plain runs first. A run starts only if the time left in the suite's budget covers the longest
earlier run of the same kind (same pair, teacher compiled or not; a first compiled run is assumed to take a plain run's
time + ``compile_s``); the others are reported as skipped, with the time left. fp32 runs with PyTorch's defaults
(cuDNN convolutions in TF32).

**loader**: ``gte data bench``'s pieces (:mod:`gte.data.bench`): ``distinct`` synthetic 500×375 JPEGs in 4 shards,
the shard files copied so that every worker decodes several batches (the same bytes, so the same decode cost),
streamed through the training loader (RandomResizedCrop + flip to the figures' size) with 1, half and all the CPUs
this process may use, for both decoders; then each figures row's img/s against the loader's best: a ratio above 1
means one GPU consumes images faster than the host decodes them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

ROWS = ("ce", "kd", "e2kd_k1", "e2kd_k16", "e2kd_frozen", "e2kd_frozen_k16", "reference")
# the rows whose img/s is compared with the loader's (the teacher rows are parts of a step, not a consumer)
CONSUMERS = ("ce", "kd", "e2kd_k1", "e2kd_k16", "e2kd_frozen_k16")


@dataclass(frozen=True)
class FigureRun:
    """One ``run_bench`` call of the figures section."""

    teacher: str
    student: str
    precision: str
    channels_last: bool = False
    compile_teacher: bool = False

    @property
    def label(self) -> str:
        options = [o for o, on in (("channels_last", self.channels_last), ("compiled teacher", self.compile_teacher))
                   if on]
        return f"{self.student} ← {self.teacher}, {self.precision}, {' + '.join(options) or 'NCHW eager'}"


def figure_runs(pairs: tuple[tuple[str, str], ...], precisions: tuple[str, ...]) -> list[FigureRun]:
    """Every pair × precision, eager NCHW and with both run options; the plain runs first (the time guard keeps
    them)."""
    return [FigureRun(t, s, p, on, on) for on in (False, True) for p in precisions for t, s in pairs]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_figures(runs: tuple[FigureRun, ...], *, size: int, batch: int, classes: int, steps: int, deadline: float,
                memory: bool, compile_s: float, console: Console) -> dict[str, Any]:
    """The figures section (see the module docstring); ``deadline``: ``time.monotonic()`` value to stay under."""
    from gte.bench import run_bench
    from gte.bench_suite.checks import pair_recipe

    done: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    took: dict[tuple[str, bool], float] = {}
    for run in runs:
        kind = (run.teacher, run.compile_teacher)
        need = took.get(kind)
        if need is None:  # a first run of its kind: a compiled one pays for compiling on top of a plain run
            need = took.get((run.teacher, False), 0.0) + compile_s if run.compile_teacher else 0.0
        left = deadline - time.monotonic()
        if left < need or left <= 0:
            skipped.append({"run": run.label, "reason": f"time budget: {max(left, 0):.0f} s left, a run of this kind "
                            f"takes ≈ {need:.0f} s"})
            continue
        console.print(f"suite: figures, {run.label} …")
        recipe = pair_recipe(run.teacher, run.student, size, classes, optim={"batch_size": batch},
                             run={"channels_last": run.channels_last, "compile_teacher": run.compile_teacher})
        t0 = time.monotonic()
        if run.compile_teacher:  # a fresh compile per run, as in its own `gte bench` process (and dynamo's
            torch._dynamo.reset()  # per-function cache limit is never reached: beyond it, it runs eager silently)
        try:
            result = run_bench(recipe, steps=steps, batch=batch, warmup=1, precision=run.precision, console=console,
                               only=ROWS, measure_memory=memory)
        except Exception as e:  # noqa: BLE001 — e.g. out of memory or a compiler failure: the other runs go on
            failed.append({"run": run.label, "error": f"{type(e).__name__}: {e}"})
            continue
        finally:
            empty_cache()
        seconds = time.monotonic() - t0
        took[kind] = max(seconds, took.get(kind, 0.0))
        rows = [{k: r[k] for k in ("key", "name", "step_s", "img_per_s", "peak_mem_mib", "x_ce", "x_kd",
                                   "speedup_vs_reference") if k in r} for r in result["rows"]]
        done.append({"run": run.label, "teacher": run.teacher, "student": run.student, "precision": run.precision,
                     "channels_last": run.channels_last, "compile_teacher": run.compile_teacher,
                     "seconds": round(seconds, 1), "device": result["device"], "memory": result["memory"],
                     "floor": result["floor"], "rows": rows})
    return {"status": "ran" if done or failed else "skipped", "image_size": size, "batch": batch,
            "classes": classes, "rounds": steps, "rows": list(ROWS), "runs": done, "skipped_runs": skipped,
            "failed_runs": failed, **({} if done or failed else {"reason": "no run fitted the time budget"})}


def empty_cache() -> None:
    """Hand cached CUDA memory back after a run (one that ran out of it included): the next one starts clean."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copied_shards(directory: Path, distinct: int, copies: int) -> tuple[str, float]:
    """(spec, mean kB) of ``distinct`` bench JPEGs in 4 shards, each shard file present ``copies`` times."""
    from gte.data.bench import write_bench_shards
    from gte.data.writers.core import shard_name, shard_spec

    _, kb = write_bench_shards(directory, distinct, shards=4)
    for c in range(1, copies):
        for s in range(4):
            shutil.copyfile(directory / shard_name("bench", s), directory / shard_name("bench", 4 * c + s))
    return shard_spec(directory, "bench", 4 * copies), kb


def run_loader(*, distinct: int, image_size: int, batch: int, batches_per_worker: int,
               decoders: tuple[str, ...] = ("pil", "torchvision"), progress: Callable[[str], None]) -> dict[str, Any]:
    """The loader section (see the module docstring)."""
    from gte.data.bench import decode_only, loader_rate

    n = usable_cpus()
    workers = sorted({1, max(1, n // 2), n})
    images = max(distinct, n * batch * batches_per_worker)
    copies = -(-images // distinct)
    with tempfile.TemporaryDirectory(prefix="gte-suite-") as tmp:
        spec, kb = copied_shards(Path(tmp), distinct, copies)
        decode = {d: round(decode_only(spec, d), 1) for d in decoders}
        rows = []
        for d in decoders:
            for w in workers:
                progress(f"suite: loader, {d} decoder, {w} workers …")
                rows.append(loader_rate(spec, workers=w, decoder=d, image_size=image_size, batch_size=batch))
    return {"status": "ran", "cpus_usable": n, "cpu_count": os.cpu_count(), "image_size": image_size,
            "batch_size": batch, "jpeg": {"width": 500, "height": 375, "quality": 90, "mean_kB": round(kb, 1),
                                          "distinct": distinct, "images": distinct * copies},
            "decode_only_img_per_s_1_thread": decode, "loader": rows}


def compare(figures: dict[str, Any], loader: dict[str, Any]) -> dict[str, Any]:
    """Each figures row's img/s against the loader's best img/s (all workers, the faster decoder)."""
    if loader.get("status") != "ran" or not figures.get("runs"):
        return {"status": "skipped", "reason": "needs both the figures and the loader sections"}
    best = max(loader["loader"], key=lambda r: (r["workers"], r["img_per_s"]))
    rows = [{"run": run["run"], "row": r["name"], "device_img_per_s": r["img_per_s"],
             "ratio": r["img_per_s"] / best["img_per_s"], "device_outruns_loader": r["img_per_s"] > best["img_per_s"]}
            for run in figures["runs"] for r in run["rows"] if r["key"] in CONSUMERS]
    return {"status": "ran", "loader_img_per_s": best["img_per_s"], "loader_workers": best["workers"],
            "loader_decoder": best["decoder"], "rows": rows,
            "measure": "device img/s of a training step ÷ the loader's img/s with every usable CPU as a worker"}
