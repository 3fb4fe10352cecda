"""``gte bench``: the cost of one training step of each method (table, floor, optional JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from gte.tables import add_columns, compact_table

from gte.commands._common import RecipeOpt, SetOpt, err, recipe
from gte.errors import GteError


def bench_command(recipe_name: str = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          steps: int = typer.Option(10, "--steps", help="Timed steps per row (after warm-up)."),
          batch: int = typer.Option(0, "--batch-size", "--batch", help="Batch size (0 = optim.batch_size)."),
          warmup: int = typer.Option(1, "--warmup", help="Untimed steps per row first."),
          precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (autocast)."),
          json_out: Optional[str] = typer.Option(None, "--json", help="Also write the results as JSON."),
          only: Optional[str] = typer.Option(None, "--only", help="Only these rows (comma-separated keys: "
                                             "e2kd_k16, e2kd_frozen_k16, dkd, reviewkd, crd_e2kd, …) besides "
                                             "those of the floors (CE, KD, e2KD K=1, frozen K=1, reference, "
                                             "teacher)."),
          suite: Optional[str] = typer.Option(None, "--suite", help="gpu: the GPU checks and figures in one run, "
                                              "written to --out (benchmarks/README.md); its own models and sizes."),
          device: str = typer.Option("auto", "--device", help="--suite: cuda, or cpu for a dry run at tiny sizes."),
          out_dir: Optional[Path] = typer.Option(None, "--out", help="--suite: directory for gpu_suite.json and "
                                                 "gpu_suite.md (default runs/gpu-suite)."),
          budget: float = typer.Option(0.0, "--budget", help="--suite: seconds; figures runs that would pass it are "
                                       "skipped and listed (0 = 420 on CUDA).")) -> None:
    """Time one training step of CE, KD, e2KD live and frozen (K=1, K=16) and a reference e2KD step."""
    if suite is not None:
        if recipe_name != "demo" or set_ or json_out or only or (steps, batch, warmup, precision) != (10, 0, 1, "fp32"):
            raise GteError("--suite runs its own models and sizes: it takes --device, --out and --budget only")
        from gte.commands.bench_suite import suite_command

        return suite_command(suite, device, out_dir or Path("runs/gpu-suite"), budget)
    if device != "auto" or out_dir is not None or budget:
        raise GteError("--device, --out and --budget go with --suite gpu")
    if steps < 1 or batch < 0 or warmup < 0:
        raise GteError("--steps must be positive, --batch and --warmup not negative")
    from gte.bench import run_bench
    from gte.io import atomic_write_json

    keys = None if only is None else [k.strip() for k in only.split(",") if k.strip()]
    result = run_bench(recipe(recipe_name, set_), steps=steps, batch=batch, warmup=warmup, precision=precision,
                       console=err, only=keys)
    out = Console()
    out.print(table(result))
    live, floor = next(r for r in result["rows"] if r["key"] == "e2kd_k1"), result["floor"]
    out.print(f"floor for e2KD live K=1 ({floor['formula']}): {1000 * floor['step_s']:.1f} ms = "
              f"{floor['x_kd']:.2f}× KD; measured {live['x_kd']:.2f}× KD, "
              f"{100 * (live['step_s'] / floor['step_s'] - 1):+.0f} % over the floor (per round: "
              f"{', '.join(f'{100 * (x - 1):+.0f} %' for x in floor['live_over_floor_per_round'])})",
              highlight=False)
    mem_floor, kd = result.get("memory_floor"), next(r for r in result["rows"] if r["key"] == "kd")
    if mem_floor and "peak_mem_mib" in live:
        out.print(f"memory floor for e2KD live ({mem_floor['formula']}): {mem_floor['peak_mem_mib']:.0f} MiB = "
                  f"{mem_floor['x_kd']:.2f}× KD; measured {live['peak_mem_mib'] / kd['peak_mem_mib']:.2f}× KD, "
                  f"{100 * (live['peak_mem_mib'] / mem_floor['peak_mem_mib'] - 1):+.0f} % over the floor",
                  highlight=False)
    out.print(f"memory: {result['memory']}", highlight=False)
    for name, why in result.get("skipped", {}).items():
        out.print(f"not run: {why}" if why.startswith(name) else f"not run: {name}: {why}", highlight=False)
    if json_out:
        atomic_write_json(json_out, result)


def table(result: dict[str, Any]) -> Table:
    """The bench result as a rich table."""
    t = compact_table(f"{result['student']} ← {result['teacher']}, {result['image_size']}², batch {result['batch']}, "
                      f"{result['device']}", caption="speed-up: the reference e2KD step's time ÷ this row's")
    numbers = ("ms/step", "img/s", "peak MiB", "× CE", "× KD", "speed-up")
    add_columns(t, ("method", *numbers), numeric=numbers)
    for r in result["rows"]:
        t.add_row(r["name"], f"{1000 * r['step_s']:.1f}", f"{r['img_per_s']:.1f}", f"{r['peak_mem_mib']:.0f}",
                  f"{r['x_ce']:.2f}", f"{r['x_kd']:.2f}", f"{r['speedup_vs_reference']:.2f}")
    return t
