"""``gte bench --suite gpu``: run :func:`gte.bench_suite.run_suite`, write ``OUT/gpu_suite.json`` and
``OUT/gpu_suite.md``, print the Markdown, exit 1 when a check failed."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from gte.commands._common import err
from gte.errors import GteError
from gte.text import markdown

SUITES = ("gpu",)


def suite_command(suite: str, device: str, out: Path, budget: float) -> None:
    """Run the suite and write its two files (see the module docstring)."""
    from gte.bench_suite import run_suite, suite_device
    from gte.io import atomic_write_json, atomic_write_text, check_writable

    if suite not in SUITES:
        raise GteError(f"--suite must be one of {', '.join(SUITES)}, not '{suite}'")
    if budget < 0:
        raise GteError(f"--budget must be seconds ≥ 0 (0 = the suite's own), not {budget:g}")
    suite_device(device)  # refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out, "--out")
    command = shlex.join(["gte", *sys.argv[1:]])
    result = run_suite(device, budget_s=budget, command=command, console=err)
    text = suite_markdown(result)
    atomic_write_json(out / "gpu_suite.json", result)
    atomic_write_text(out / "gpu_suite.md", text)
    print(text)
    err.print(f"suite: wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}", highlight=False)
    if result["failures"]:
        err.print(f"gte bench --suite gpu: {len(result['failures'])} check(s) failed: "
                  + "; ".join(result["failures"]), highlight=False)
        raise typer.Exit(1)


def _e(x: float) -> str:
    return f"{x:.1e}"


def _comparison(c: dict[str, Any], control: str) -> list[str]:
    """Status, measured, bound and control cells of an equality check."""
    where = f" ({c['worst_parameter']})" if c["worst_parameter"] else ""
    return [c["status"], f"rel {_e(c['rel'])}{where}, all parameters {_e(c['rel_all'])}",
            f"≤ {_e(c['tolerance'])}", f"{control}: rel {_e(c['control']['rel'])}, "
            f"{'detected' if c['control']['detected'] else 'NOT detected'}"]


def _check_rows(result: dict[str, Any]) -> list[list[str]]:
    sections = result["sections"]
    rows = []
    for c in sections["correctness"].get("checks", []):
        if c["status"] == "skipped":
            rows.append(["correctness", c["name"], "skipped", c["reason"], "", ""])
        elif "rel" in c:
            rows.append(["correctness", c["name"], *_comparison(c, "perturbed weight")])
        else:
            exp = c["explanation_loss"]
            measured = (f"explanation loss {exp[0]:.4f} → {exp[-1]:.4f}" if exp else "no step") + \
                f", losses {'finite' if c['all_finite'] else 'NOT finite'}"
            if c["precision"] == "fp16":
                scale = c.get("scale") or [float("nan")]
                measured += f"; scale {scale[0]:g} → {scale[-1]:g}, {len(c['skipped_steps'])} of {c['steps']} " \
                            f"steps skipped"
            rows.append(["correctness", c["name"], c["status"], measured + (f"; {c['error']}" if c["error"] else ""),
                         "finite, scaler working" if c["precision"] == "fp16" else "finite, explanation loss falls",
                         ""])
    d = sections["ddp"]
    what = f"2 ranks ({d.get('backend', '')}) vs 1 rank accumulating, {d.get('steps', 3)} steps"
    if "rel" in d:
        rows.append(["ddp", what, *_comparison(d, "half batch")])
    else:
        rows.append(["ddp", what, d["status"], d.get("error") or d.get("reason", ""), "", ""])
    if "nccl" in d:
        rows.append(["ddp", "NCCL", "skipped", d["nccl"]["reason"], "", ""])
    for name, s in sections.items():
        if s["status"] in ("skipped", "error"):
            rows.append([name, "whole section", s["status"], s.get("reason") or s.get("error", ""), "", ""])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(markdown(str(x)) for x in r) + " |" for r in rows)]


def suite_markdown(result: dict[str, Any]) -> str:
    """The suite's result as Markdown: machine and command, the checks, the step costs, the loader."""
    m, sec = result["machine"], result["sections"]
    gpu = f"{m['gpu']} ×{m['gpus']} ({m['gpu_memory_gib']} GiB)" if m["gpu"] else "no GPU"
    verdict = "all checks passed" if result["passed"] else "FAILED: " + "; ".join(result["failures"])
    md = ["# gte bench --suite gpu", "",
          markdown(f"Machine: {gpu}; torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}; CPU {m['cpu']}, "
                   f"{m['cpu_count']} CPUs ({m['cpus_usable']} usable, {m['torch_threads']} torch threads); "
                   f"Python {m['python']}, gte {m['gte']}."), "",
          f"Command: `{result['command']}`", "",
          markdown(f"Sizes: {result['sizes']}, device {result['device']}; {result['seconds']:.0f} s of a "
                   f"{result['budget_s']:.0f} s budget. Result: {verdict}."), "", "## Checks", "",
          *_table(["section", "check", "status", "measured", "bound", "control (must fail)"], _check_rows(result))]
    f = sec["figures"]
    if f.get("runs"):
        md += ["", "## " + markdown(f"Step cost (gte bench rows), {f['image_size']}², batch {f['batch']}, "
                                    f"{f['rounds']} interleaved rounds"), ""]
        md += _table(["run", "method", "ms/step", "img/s", "peak MiB", "× CE", "× KD", "speed-up vs reference"],
                     [[run["run"], r["name"], f"{1000 * r['step_s']:.1f}", f"{r['img_per_s']:.0f}",
                       f"{r['peak_mem_mib']:.0f}" if "peak_mem_mib" in r else "–", f"{r['x_ce']:.2f}",
                       f"{r['x_kd']:.2f}", f"{r['speedup_vs_reference']:.2f}"]
                      for run in f["runs"] for r in run["rows"]])
        md += ["", markdown(f"Memory: {f['runs'][0]['memory']}.")]
    for s in f.get("skipped_runs", []) + f.get("failed_runs", []):
        md += ["", markdown(f"Not run: {s['run']}: {s.get('reason') or s.get('error')}.")]
    if "not_in_dry_run" in f:
        md += ["", markdown(f"Not in the CPU dry run: {f['not_in_dry_run']}.")]
    lo, cmp_ = sec["loader"], sec["loader_vs_device"]
    if lo["status"] == "ran":
        jpeg = lo["jpeg"]
        md += ["", "## " + markdown(f"Loader on the host: {jpeg['images']} JPEGs 500×375 q90 ({jpeg['distinct']} "
                                    f"distinct, {jpeg['mean_kB']:.0f} kB) → RandomResizedCrop {lo['image_size']}², "
                                    f"batch {lo['batch_size']}, {lo['cpus_usable']} usable CPUs"), ""]
        md += _table(["decoder", "workers", "img/s", "img/s per worker", "worker start-up s"],
                     [[r["decoder"], r["workers"], r["img_per_s"], r["img_per_s_per_worker"], r["startup_s"]]
                      for r in lo["loader"]])
    if cmp_["status"] == "ran":
        md += ["", markdown(f"One device against the loader's {cmp_['loader_img_per_s']:.0f} img/s "
                            f"({cmp_['loader_workers']} workers, {cmp_['loader_decoder']}):"), ""]
        md += _table(["run", "method", "device img/s", "÷ loader img/s", "device outruns the loader"],
                     [[r["run"], r["row"], f"{r['device_img_per_s']:.0f}", f"{r['ratio']:.2f}",
                       "yes" if r["device_outruns_loader"] else "no"] for r in cmp_["rows"]])
    return "\n".join(md) + "\n"
