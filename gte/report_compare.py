"""The tables and the ``--report DIR`` of ``gte compare``: per-method mean ± std, paired differences, per-group bars
with Wilson intervals, reliability diagrams and a grid of teacher | each method's student explanations on a fixed,
seeded set of test images (half of them from the worst group), written by :func:`gte.report.write_pages`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch.nn as nn

    from gte.compare import Records, Run
    from gte.config import DataConfig

# (key, label) of the per-method table's rows, as gte eval labels them; percentages except the cosine
COLUMNS = (("acc1", "acc@1"), ("acc5", "acc@5"), ("agreement", "agreement"), ("explanation_similarity", "expl. cos"),
           ("worst_group_acc", "worst-group acc"), ("id_acc", "Waterbirds ID acc"), ("ood_acc", "Waterbirds OOD acc"),
           ("weighted_acc", "Waterbirds weighted acc"), ("balanced_acc", "balanced acc"),
           ("worst_class_acc", "worst-class acc"), ("ece", "ECE (15 bins)"))
NOT_PERCENT = {"explanation_similarity"}
SHORT = {"acc1": "acc@1", "agreement": "agree", "explanation_similarity": "expl. cos"}
CI_NOTE = ("95 % CI: paired bootstrap of A − B over the test samples (the same resampled samples for both), and over "
           "seeds where each method has ≥ 3. McNemar p: exact binomial under 25 discordant samples, else chi-square "
           "with continuity correction; one p per pair of runs with the same seed.")


def _cell(mean: dict, std: dict, key: str, seeds: int) -> str:
    if key not in mean:
        return "—"
    scale, fmt = (1, "{:.3f}") if key in NOT_PERCENT else (100, "{:.1f}")
    text = fmt.format(scale * mean[key])
    return text + " ± " + fmt.format(scale * std[key]) if seeds > 1 else text


def method_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header (metric, one column per method) and rows of the per-method table: mean ± std over seeds (%; the cosine
    as a cosine), the number of runs first and the per-group accuracies last."""
    methods = result["methods"]
    keys = [(k, label) for k, label in COLUMNS if any(k in m["mean"] for m in methods.values())]
    groups = sorted({k for m in methods.values() for k in m["mean"] if k.startswith("group/")},
                    key=lambda k: int(k.split("/")[1]))
    named = result.get("group_names", {})
    keys += [(k, f"group {k.split('/')[1]} {named.get(k.split('/')[1], '')} acc".replace("  ", " ")) for k in groups]
    rows = [["runs (seeds)", *(f"{len(m['runs'])}" for m in methods.values())]]
    rows += [[label, *(_cell(m["mean"], m["std"], k, len(m["runs"])) for m in methods.values())] for k, label in keys]
    return ["metric", *methods], rows


def pair_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired differences: A − B, the 95 % interval, what it resamples, McNemar p."""
    rows = []
    for p in result["pairs"]:
        scale, fmt = (1, "{:+.3f}") if p["metric"] in NOT_PERCENT else (100, "{:+.2f}")
        ps = ", ".join(f"{t['p']:.2g}" for t in p.get("mcnemar", [])) or "—"
        rows.append([f"{p['a']} − {p['b']}", SHORT.get(p["metric"], p["metric"]), fmt.format(scale * p["diff"]),
                     f"[{fmt.format(scale * p['lo'])}, {fmt.format(scale * p['hi'])}]", p["over"], ps])
    return ["pair", "metric", "diff", "95 % CI", "resampled", "McNemar p"], rows


def pooled_reliability(rows_per_run: Sequence[list[dict]]) -> list[dict]:
    """Reliability bins of several runs pooled (counts added, confidence and accuracy count-weighted)."""
    out = []
    for bins in zip(*rows_per_run):
        n = sum(b["count"] for b in bins)
        out.append({"lo": bins[0]["lo"], "hi": bins[0]["hi"], "count": n,
                    **{k: sum(b[k] * b["count"] for b in bins if b["count"]) / n if n else None
                       for k in ("confidence", "accuracy")}})
    return out


def example_indices(result: dict, records: Records, count: int, seed: int) -> list[int]:
    """``count`` test samples drawn with ``seed``: half from the worst group (lowest accuracy averaged over all
    runs), the rest from the others (all samples where the data has no groups); in data order."""
    rng = np.random.default_rng(seed)
    runs = [r for m in result["methods"].values() for r in m["per_run"]]
    groups = runs[0].get("groups") if runs else None
    if not groups or count == 0:
        pool = np.arange(records.labels.size)
        return sorted(rng.choice(pool, min(count, pool.size), replace=False).tolist())
    worst = min(groups, key=lambda g: np.mean([r["groups"][g] for r in runs]))
    inside = np.flatnonzero(records.groups == int(worst))
    outside = np.flatnonzero(records.groups != int(worst))
    first = rng.choice(inside, min(-(-count // 2), inside.size), replace=False)
    rest = rng.choice(outside, min(count - first.size, outside.size), replace=False)
    return sorted(np.concatenate([first, rest]).astype(int).tolist())


def _images(spec: str, data: DataConfig, keys: set[str]) -> dict[str, tuple]:
    """(image, label, group) of the samples ``keys``, read from the shards again (eval transform)."""
    from gte.data.loader import make_loader

    found: dict[str, tuple] = {}
    loader = make_loader(spec, train=False, image_size=data.image_size, eval_resize=data.eval_resize,
                         interpolation=data.interpolation, batch_size=64, num_workers=0, world_size=1, rank=0)
    for batch in loader:
        for j, key in enumerate(batch["key"]):
            if key in keys:
                found[key] = (batch["image"][j].clone(), int(batch["label"][j]), int(batch["group"][j]))
        if len(found) == len(keys):
            break
    return found


def grid_rows(result: dict, runs: Sequence[Run], records: Records, students: Sequence[nn.Module],
              teacher: nn.Module | None, spec: str, data: DataConfig, count: int, seed: int,
              names: Sequence[str], group_names: dict[str, str]) -> list:
    """Rows of teacher | each method's first run explanations of the :func:`example_indices` images; every
    student explains the teacher's top-1 class (without a teacher: the first student's)."""
    from gte.evaluate import Example
    from gte.render import Row, explain_panel
    from gte.report import example_note

    first = {}
    for i, r in enumerate(runs):
        first.setdefault(r.method, i)
    keys = [records.keys[i] for i in example_indices(result, records, count, seed)]
    images = _images(spec, data, set(keys))
    rows = []
    for key in keys:
        if key not in images:
            continue
        image, label, group = images[key]
        panels = [explain_panel(teacher, image, None, "teacher")] if teacher is not None else []
        for method, i in first.items():
            panels.append(explain_panel(students[i], image, panels[0].explained if panels else None, method))
        rows.append(Row(key, image, panels[0].explained, panels,
                        example_note(Example(key, image, label, group), names, group_names)))
    return rows


def write_compare_report(out_dir: str | Path, result: dict, *, runs: Sequence[Run], records: Records,
                         students: Sequence[nn.Module], teacher: nn.Module | None, spec: str, data: DataConfig,
                         names: Sequence[str], group_names: dict[str, str], examples: int = 6,
                         seed: int = 0) -> Path:
    """Write ``report.md``, ``report.html`` (self-contained), ``metrics.json`` and the PNGs; return the HTML path."""
    from gte.render import render
    from gte.report import RELIABILITY_NOTE, _png, report_dir, write_pages
    from gte.report_figures import method_group_figure, reliability_figure

    out = report_dir(out_dir)
    images: dict[str, bytes] = {}
    methods = result["methods"]
    if all("groups" in r for m in methods.values() for r in m["per_run"]):
        pooled = {name: {g: (sum(r["group_correct"][g] for r in m["per_run"]),
                             sum(r["group_counts"][g] for r in m["per_run"])) for g in m["per_run"][0]["groups"]}
                  for name, m in methods.items()}
        labels = {g: f"{g} {group_names[g]}" if g in group_names else g for m in pooled.values() for g in m}
        images["groups.png"] = _png(method_group_figure(pooled, labels))
    images["reliability.png"] = _png(reliability_figure(
        {name: pooled_reliability([r["reliability"] for r in m["per_run"]]) for name, m in methods.items()}))
    if examples:
        rows = grid_rows(result, runs, records, students, teacher, spec, data, examples, seed, names, group_names)
        if rows:
            images["grid.png"] = render(rows, names, out / "grid.png").read_bytes()
    header, rows_m = method_rows(result)
    pheader, rows_p = pair_rows(result)
    sections = [
        ("Methods", header, rows_m, None, "Mean ± std over each method's seeds, in % (expl. cos: a cosine). ECE: "
         "15 equal-width bins of the top-1 softmax probability."),
        ("Paired differences", pheader, rows_p, None, CI_NOTE),
        ("Per group", [], [], "groups.png", "Accuracy per group pooled over each method's seeds; error bars: 95 % "
         "Wilson intervals over those samples (test-sample noise only, not seed-to-seed variation)."),
        ("Calibration", [], [], "reliability.png", RELIABILITY_NOTE + " Bins pooled over each method's seeds."),
        ("Teacher and students" if teacher is not None else "Students", [], [], "grid.png",
         f"{examples} test images drawn with seed {seed}, half from the worst group; each method's first run, "
         "explaining the teacher's top-1 class." if teacher is not None else "each method's first run."),
    ]
    about = {"samples": str(result["n"]), "data": spec, **({"teacher": str(result["teacher"])} if teacher else {}),
             **{name: ", ".join(m["runs"]) for name, m in methods.items()}}
    return write_pages(out, "gte compare report", about, sections, images, result)
