"""Small matplotlib figures shared by the reports of ``gte eval`` and ``gte compare``: a reliability diagram and
per-group bars with confidence intervals (each function returns a Figure; ``gte.report._png`` encodes it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from gte.stats import wilson

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def wilson_errors(values: Sequence[float], counts: Sequence[float]) -> list[list[float]]:
    """2×K matplotlib ``yerr`` (percentage points below / above) of the 95 % Wilson intervals of proportions
    ``values`` over ``counts`` samples."""
    lows, highs = [], []
    for v, n in zip(values, counts):
        lo, hi = wilson(v * n, n)
        lows.append(max(0.0, 100 * (v - lo)))
        highs.append(max(0.0, 100 * (hi - v)))
    return [lows, highs]


def reliability_figure(series: dict[str, list[dict]]) -> Figure:
    """Accuracy vs mean confidence per bin (``gte.metrics.reliability`` rows), one line per model, the diagonal of
    perfect calibration, and the samples per bin underneath."""
    from matplotlib.figure import Figure

    from gte.render import FONT

    fig = Figure(figsize=(5.6, 4.6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    width = 1 / max(len(next(iter(series.values()), [])), 1) / max(len(series), 1)
    for i, (name, rows) in enumerate(series.items()):
        kept = [r for r in rows if r["count"]]
        ax.plot([r["confidence"] for r in kept], [r["accuracy"] for r in kept], "o-", label=name)
        hist.bar([r["lo"] + (i + 0.5) * width for r in rows], [r["count"] for r in rows], width)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy", fontsize=FONT)
    hist.set_xlabel("confidence (top-1 softmax)", fontsize=FONT)
    hist.set_ylabel("samples", fontsize=FONT)
    for a in (ax, hist):
        a.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="upper left")
    fig.tight_layout()
    return fig


def method_group_figure(methods: dict[str, dict[str, tuple[int, int]]], labels: dict[str, str]) -> Figure:
    """Accuracy per group for each method: ``methods[name][group] = (right, samples)`` pooled over the method's
    seeds, bars with 95 % Wilson intervals over those samples; ``labels`` names the groups."""
    from matplotlib.figure import Figure

    from gte.render import FONT, LITERAL

    groups = sorted({g for m in methods.values() for g in m}, key=int)
    fig = Figure(figsize=(max(5.0, 1.5 + 0.6 * len(methods) * len(groups)), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(methods), 1)
    for i, (name, per_group) in enumerate(methods.items()):
        k = [per_group.get(g, (0, 0)) for g in groups]
        acc = [right / n if n else 0.0 for right, n in k]
        ax.bar([j + i * width for j in range(len(groups))], [100 * a for a in acc], width, label=name,
               yerr=wilson_errors(acc, [n for _, n in k]), capsize=3, error_kw={"elinewidth": 1})
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(groups))],
                  [labels.get(g, g).replace(" ", "\n", 1) for g in groups], fontsize=FONT, **LITERAL)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(methods), 4), frameon=False)
    fig.tight_layout()
    return fig
