"""The report's training curves (a run's ``metrics.jsonl``) and shortcut tests (``gte eval --shortcut``): tables,
figures, and one example image per shortcut with each model's explanation of it. Used by :mod:`gte.report`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    import torch.nn as nn
    from matplotlib.figure import Figure

# step-record keys that are not training-loss terms (gte.train's log lines)
_NOT_LOSS = {"step", "epoch", "lr", "img_per_s", "skipped", "time_s", "train_skipped"}
# epoch-record validation metrics drawn, as shares of samples
_VAL = ("val_acc1", "val_agreement", "val_worst_group_acc", "val_id_acc", "val_ood_acc")


def training_log(model_path: str | None) -> list[dict]:
    """The records of ``metrics.jsonl`` beside ``model_path`` (a run directory's model.safetensors); [] when there is
    none. A line cut short (a killed run) or not an object is left out."""
    if not model_path:
        return []
    log = Path(model_path).parent / "metrics.jsonl"
    try:
        lines = log.read_text(encoding="utf-8").splitlines() if Path(model_path).is_file() else []
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            records.append(r)
    return records


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curves_figure(records: Sequence[dict]) -> Figure | None:
    """Loss terms per logged step (left) and validation accuracy per epoch (right); None without either."""
    from matplotlib.figure import Figure

    from gte.render import FONT

    steps = [r for r in records if "lr" in r and _finite(r.get("step"))]
    epochs = [r for r in records if "time_s" in r and _finite(r.get("epoch"))]
    terms = sorted({k for r in steps for k, v in r.items() if k not in _NOT_LOSS and _finite(v)})
    val = [k for k in _VAL if any(_finite(r.get(k)) for r in epochs)]
    if not (terms and steps) and not val:
        return None
    panels = [p for p in (("step", terms, steps, 1, "training loss terms"),
                          ("epoch", val, epochs, 100, "validation (%)")) if p[1]]  # a run without val: one panel
    fig = Figure(figsize=(5 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xs, keys, rows, scale, title) in zip(axes, panels):
        for k in keys:  # epochs counted from 1, as training prints them
            pts = [(r[xs] + (1 if xs == "epoch" else 0), scale * r[k]) for r in rows if _finite(r.get(k))]
            if pts:  # the total under its terms, wide and pale: with one term (KD) they coincide
                style = {"lw": 4, "alpha": 0.35, "color": "0.3", "zorder": 1} if k == "loss" else {"ms": 3}
                ax.plot(*zip(*pts), "-" if k == "loss" or len(pts) >= 30 else "o-", label=k.removeprefix("val_"),
                        **style)
        ax.set_xlabel(xs, fontsize=FONT)
        ax.set_title(title, fontsize=FONT)
        ax.tick_params(labelsize=FONT)
        ax.legend(fontsize=FONT, frameon=False)
        if xs == "epoch":
            ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- shortcut tests
def _roles(r: dict) -> list[tuple[str, str]]:
    return [("student", "student"), ("teacher", "teacher")] if "teacher" in r else [("student", "model")]


def shortcut_header(metrics: dict) -> list[str]:
    """The columns of :func:`shortcut_rows`: one per shortcut test."""
    return ["shortcut test", *metrics.get("shortcuts", {})]


def shortcut_rows(metrics: dict) -> list[list[str]]:
    """One row per measure, one column per test: samples, each model's accuracy clean → shifted and the change
    (percentage points), the agreement change, each model's explanation cosine and attribution share on the inserted
    region, the region's area; ImageNet's carton rate for 1000-class models."""
    tests = list(metrics.get("shortcuts", {}).values())
    if not tests:
        return []
    roles = _roles(tests[0])
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    pts = lambda v: f"{100 * v:+.1f} pt"  # noqa: E731

    def row(label: str, cell) -> list[str]:
        return [label, *(cell(r) for r in tests)]

    rows = [row("samples (skipped)", lambda r: f"{r['n']} ({r['skipped']})")]
    for role, shown in roles:
        rows.append(row(f"{shown} acc clean → shifted",
                        lambda r: f"{100 * r[role]['acc_clean']:.1f} → {pct(r[role]['acc_shifted'])}"))
        rows.append(row(f"{shown} acc change", lambda r: pts(r[role]["acc_change"])))
    if "agreement_change" in tests[0]:
        rows.append(row("agreement change", lambda r: pts(r["agreement_change"])))
    for role, shown in roles:
        rows.append(row(f"{shown} explanation cosine", lambda r: f"{r[role]['explanation_cosine']:.3f}"))
    for role, shown in roles:
        rows.append(row(f"{shown} share on pattern", lambda r: pct(r[role]["pattern_share"])))
    rows.append(row("pattern area", lambda r: pct(r["pattern_area"])))
    for role, shown in roles:
        if "carton_shifted" in tests[0][role]:
            rows.append(row(f"{shown} carton (478) clean → shifted", lambda r: f"{100 * r[role]['carton_clean']:.1f} "
                            f"→ {pct(r[role]['carton_shifted'])}"))
    return rows


SHORTCUT_NOTE = ("Each test inserts a known pattern into every test image (watermark: semi-transparent text at a "
                 "random place; patch: a coloured square at a corner; background: the object on another image's "
                 "background). Explanation cosine: the clean vs the shifted image's explanation of the same class "
                 "(1 = unmoved). Share on pattern: the share of the positive attribution on the inserted region; "
                 "pattern area: the region's share of the image (what attribution spread evenly would give).")


def shortcut_figure(metrics: dict) -> Figure:
    """Bars: accuracy on clean and shifted images, per test and model."""
    from matplotlib.figure import Figure

    from gte.render import FONT, LITERAL

    tests = metrics["shortcuts"]
    bars = [(f"{label}\n{shown}", r[role]) for label, r in tests.items() for role, shown in _roles(r)]
    fig = Figure(figsize=(max(5.0, 1.3 + 1.1 * len(bars)), 3.4))
    ax = fig.subplots()
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [100 * m["acc_clean"] for _, m in bars], 0.4, label="clean")
    ax.bar([x + 0.2 for x in xs], [100 * m["acc_shifted"] for _, m in bars], 0.4, label="shifted")
    ax.set_xticks(list(xs), [name for name, _ in bars], fontsize=FONT, **LITERAL)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def shortcut_examples(image: torch.Tensor, key: str, metrics: dict, student: nn.Module, teacher: nn.Module | None,
                      names: Sequence[str], path: Path) -> bool:
    """One test image with each per-image pattern (not ``background``, which needs a second image with boxes),
    explained by the teacher and the student (gte explain's renderer) into ``path``; False when there is none."""
    from gte.render import explain_rows, fit, render
    from gte.shortcuts import parse_shortcut

    shown = [(label, r) for label, r in metrics.get("shortcuts", {}).items() if r["name"] != "background"]
    if not shown:
        return False
    images = []
    for label, r in shown:
        sc = parse_shortcut(label, r["seed"])
        images.append((label, sc(image[None], [key]).images[0]))
    rows = explain_rows(images, student, teacher)
    for row, (label, _) in zip(rows, shown):
        row.note = fit(f"test: {label}")
    render(rows, names, path)
    return True
