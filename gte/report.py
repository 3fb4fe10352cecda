"""Reports of ``gte eval``: a rich table in the terminal, and ``--report DIR`` with Markdown and one self-contained
HTML page (metric tables, per-group bars, a grid of images with teacher and student explanations, the shift curve).

``DIR/report.md`` links the PNGs written next to it (``DIR/*.png``); ``DIR/report.html`` embeds the same PNGs as
``data:image/png;base64`` URIs and loads nothing else, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from gte.errors import GteError
from gte.text import markdown

if TYPE_CHECKING:
    import torch.nn as nn
    from matplotlib.figure import Figure
    from rich.console import Console

    from gte.evaluate import Example
    from gte.render import Row

# (key, label) of the headline metrics, shown as percentages except the cosines of COSINES
METRIC_ROWS = (("acc1", "acc@1"), ("acc5", "acc@5"), ("agreement", "top-1 agreement"),
        ("explanation_similarity", "explanation similarity (mean cosine)"), ("worst_group_acc", "worst-group acc"),
        ("id_acc", "Waterbirds ID acc"), ("ood_acc", "Waterbirds OOD acc"),
        ("weighted_acc", "Waterbirds acc weighted by training groups"), ("balanced_acc", "balanced acc"),
        ("worst_class_acc", "worst-class acc"), ("ece", "ECE (15 bins)"), ("f1", "micro-F1 (logit > 0)"),
        ("map", "mAP"), ("epg", "EPG"), ("iou", "IoU"))
COSINES = {"explanation_similarity"}  # a cosine in [-1, 1], not a fraction: shown as one


# What the localisation metrics mean (gte.metrics), said wherever they are shown
METRIC_NOTES = (
    ("epg", "EPG (energy pointing game): the fraction of the positive attribution energy that lies inside the "
            "boxes of the explained class."),
    ("ece", "ECE: expected calibration error, |accuracy − mean confidence| over 15 equal-width bins of the top-1 "
            "softmax probability, weighted by the bins' sample shares."),
    ("worst_class_acc", "Balanced acc: the mean per-class recall; worst-class acc: the lowest recall (its class "
                        "is named in the JSON as worst_class)."),
    ("iou", "IoU: the positive attribution, min-max normalised and thresholded at 0.5, against the mask of the "
            "class's boxes (intersection over union)."),
)


def metric_notes(metrics: dict) -> list[str]:
    """One sentence for each metric shown that needs one (EPG, IoU)."""
    teacher = metrics.get("teacher", {})
    return [note for k, note in METRIC_NOTES if k in metrics or k in teacher]


RELIABILITY_NOTE = ("Reliability diagram: accuracy against mean top-1 softmax confidence in 15 equal-width bins "
                    "(a calibrated model lies on the diagonal); the bars below show how many samples each bin holds.")


def group_note(metrics: dict) -> str:
    """What the group table shows; the Waterbirds ID/OOD rule only for Waterbirds data."""
    note = "Worst-group accuracy is the lowest of these. Error bars: 95 % Wilson intervals over the group's samples."
    if metrics.get("waterbirds"):
        note += " Waterbirds: group = 2·label + place; OOD = the minority groups 1 and 2, ID = groups 0 and 3."
    return note


def group_label(metrics: dict, group: str) -> str:
    """``"1 landbird-on-water"`` where the data names its groups (``group_names``), else the number."""
    name = metrics.get("group_names", {}).get(group)
    return f"{group} {name}" if name else group


def _pct(v: object) -> str:
    """A fraction as a percentage with one decimal (``0.934`` → ``93.4 %``); ``—`` for a missing value."""
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "—"


def _cos(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "—"


def has_teacher(metrics: dict) -> bool:
    """Whether the metrics were measured with a teacher: no teacher column, heading or series without one."""
    return "teacher" in metrics


def metric_header(metrics: dict) -> list[str]:
    """The columns of :func:`metric_rows`."""
    return ["metric", "student", "teacher"] if has_teacher(metrics) else ["metric", "model"]


def metric_rows(metrics: dict) -> list[list[str]]:
    """[label, student, teacher] (without a teacher: [label, model]) for every headline metric present: percentages
    with one decimal, cosines as cosines."""
    teacher = metrics.get("teacher", {})
    cols = (metrics, teacher) if has_teacher(metrics) else (metrics,)
    return [[label, *((_cos if k in COSINES else _pct)(c.get(k)) for c in cols)]
            for k, label in METRIC_ROWS if k in metrics or k in teacher]


def group_header(metrics: dict) -> list[str]:
    """The columns of :func:`group_rows`."""
    return ["group", "n", "acc", "agreement", "teacher acc"] if has_teacher(metrics) else ["group", "n", "acc"]


def group_rows(metrics: dict) -> list[list[str]]:
    """[group, n, acc, agreement, teacher acc] per group (without a teacher: [group, n, acc])."""
    t = metrics.get("teacher", {}).get("groups", {})
    agree = metrics.get("group_agreement", {})
    return [[group_label(metrics, g), str(metrics["group_counts"][g]), _pct(acc),
             *((_pct(agree.get(g)), _pct(t.get(g))) if has_teacher(metrics) else ())]
            for g, acc in metrics.get("groups", {}).items()]


def shift_header(metrics: dict) -> list[str]:
    """The columns of :func:`shift_rows`."""
    return ["shift px", "student", "teacher"] if "teacher" in metrics.get("shift", {}) else ["shift px", "model"]


def shift_rows(metrics: dict) -> list[list[str]]:
    """[t, student cos, teacher cos] of the shift curve (without a teacher: [t, cos])."""
    s = metrics.get("shift", {})
    cols = [s.get("student", [])] + ([s["teacher"]] if "teacher" in s else [])
    return [[str(t), *(_cos(c[i]) for c in cols)] for i, t in enumerate(s.get("t", []))]


def print_summary(metrics: dict, console: Console, title: str = "gte eval") -> None:
    """The metric tables in the terminal (rich)."""
    from gte.tables import add_columns, compact_table, literal

    def table(name: str, header: Sequence[str], rows: list[list[str]], notes: Sequence[str] = ()) -> None:
        if rows:
            tab = compact_table(name)
            add_columns(tab, header, numeric=header[1:])  # numbers never wrap; a long group name folds
            for row in rows:
                tab.add_row(*map(literal, row))  # group names come from files: shown as written
            console.print(tab)
            if notes:  # under the table at the terminal's width: a caption would wrap to a narrow table's
                console.print(" ".join(notes), highlight=False)
            console.print()  # without vertical rules, a blank line keeps the next title apart

    table(f"{title}: {metrics['n']} samples", metric_header(metrics), metric_rows(metrics), metric_notes(metrics))
    table("per group", group_header(metrics), group_rows(metrics))
    table("shift test: cosine to the unshifted explanation", shift_header(metrics), shift_rows(metrics))
    from gte.report_shortcuts import SHORTCUT_NOTE, shortcut_header, shortcut_rows

    table("shortcut tests", shortcut_header(metrics), shortcut_rows(metrics), [SHORTCUT_NOTE])


# --------------------------------------------------------------------------------------------- figures
def _png(fig: object) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # type: ignore[attr-defined]
    return buf.getvalue()


def group_figure(metrics: dict) -> Figure:
    """Bars per group: student accuracy, teacher accuracy, agreement, each with its 95 % Wilson interval."""
    from matplotlib.figure import Figure

    from gte.render import FONT, LITERAL

    groups = list(metrics["groups"])
    series = [("student acc" if has_teacher(metrics) else "acc", metrics["groups"])]
    if has_teacher(metrics):
        series += [("teacher acc", metrics["teacher"]["groups"]), ("agreement", metrics["group_agreement"])]
    fig = Figure(figsize=(max(5.0, 1.2 + max(0.9 * len(series) / 2, 1.2) * len(groups)), 3.4))  # legend, names
    ax = fig.subplots()
    width = 0.8 / len(series)
    from gte.report_figures import wilson_errors

    counts = [metrics["group_counts"][g] for g in groups]
    for i, (name, vals) in enumerate(series):  # 95 % Wilson intervals: each bar is a proportion of its group's n
        heights = [vals[g] for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], [100 * v for v in heights], width, label=name,
               yerr=wilson_errors(heights, counts), capsize=3, error_kw={"elinewidth": 1})
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))],
                  [group_label(metrics, g).replace(" ", "\n", 1) for g in groups], fontsize=FONT, **LITERAL)
    ax.set_ylim(0, 100)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%" if len(series) > 1 else "accuracy (%)", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    if len(series) > 1:  # above the axes, not in them: at a readable size it is wider than two groups' bars
        ax.legend(fontsize=FONT, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), frameon=False)
    fig.tight_layout()
    return fig


def shift_figure(metrics: dict) -> Figure:
    """The shift curve: cosine to the unshifted explanation vs diagonal shift."""
    from matplotlib.figure import Figure

    from gte.render import FONT

    s = metrics["shift"]
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(s["t"], s["student"], "o-", label="student" if "teacher" in s else "model")
    if "teacher" in s:
        ax.plot(s["t"], s["teacher"], "s--", label="teacher")
    ax.set_xlabel("diagonal shift (px)", fontsize=FONT)
    ax.set_ylabel("cosine over the overlap", fontsize=FONT)
    ax.set_xticks(s["t"][::2])
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT)
    fig.tight_layout()
    return fig


def example_note(example: Example, names: Sequence[str], group_names: dict[str, str] | None = None) -> str:
    """The lines under an example of the grid: ``label: tiger cat`` and ``group: landbird-on-water`` (the group's
    number where the data does not name it; no group line for an example without one, group -1)."""
    from gte.render import fit

    label = names[example.label] if 0 <= example.label < len(names) else str(example.label)
    lines = [fit(f"label: {label}")]
    if example.group >= 0:
        name = (group_names or {}).get(str(example.group))
        lines.append(fit(f"group: {name}" if name else f"group: {example.group}"))
    return "\n".join(lines)


def grid_figure(examples: Sequence[Example], student: nn.Module, teacher: nn.Module | None,
                names: Sequence[str], path: Path, group_names: dict[str, str] | None = None) -> list[Row]:
    """Images with the teacher's and the student's explanations side by side (gte explain's renderer), each image
    captioned with its label and group by name; returns the rows drawn."""
    from gte.render import explain_rows, render

    rows = explain_rows([(e.key, e.image) for e in examples], student, teacher)
    for row, e in zip(rows, examples):
        row.note = example_note(e, names, group_names)
    render(rows, names, path)
    return rows


# --------------------------------------------------------------------------------------------- documents
def _md_table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    cells = [[markdown(c) for c in r] for r in rows]  # group names from files: no HTML, links or cell breaks
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in cells)]


def _html_table(header: Sequence[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}"
       "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
       "code{background:#f4f4f4;padding:0 .2em}")


def report_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` created (one line where it cannot be)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GteError(f"{out}: cannot create the report directory ({e.strerror})") from None
    return out


def write_report(out_dir: str | os.PathLike, metrics: dict, *, examples: Sequence[Example] = (),
                 student: nn.Module | None = None, teacher: nn.Module | None = None,
                 names: Sequence[str] | None = None, about: dict[str, str] | None = None,
                 training: Sequence[dict] = ()) -> Path:
    """Write ``report.md``, ``report.html``, ``metrics.json`` and the PNGs into ``out_dir``; return the HTML path.
    ``training``: the model's run log (metrics.jsonl records) for the training curves."""
    from gte import report_shortcuts as rs

    out = report_dir(out_dir)
    images: dict[str, bytes] = {}
    if metrics.get("groups"):
        images["groups.png"] = _png(group_figure(metrics))
    if metrics.get("shift"):
        images["shift.png"] = _png(shift_figure(metrics))
    if metrics.get("reliability"):
        from gte.report_figures import reliability_figure

        series = {"student" if has_teacher(metrics) else "model": metrics["reliability"]}
        if metrics.get("teacher", {}).get("reliability"):
            series["teacher"] = metrics["teacher"]["reliability"]
        images["reliability.png"] = _png(reliability_figure(series))
    if examples and student is not None:
        grid = out / "grid.png"
        from gte.models import info

        names = names or [f"class {k}" for k in range(info(student).num_classes)]
        grid_figure(examples, student, teacher, names, grid, metrics.get("group_names"))
        images["grid.png"] = grid.read_bytes()
    curves = rs.curves_figure(training) if training else None
    if curves is not None:
        images["curves.png"] = _png(curves)
    if metrics.get("shortcuts"):
        images["shortcuts.png"] = _png(rs.shortcut_figure(metrics))
        picture = out / "shortcut-examples.png"
        if examples and student is not None and rs.shortcut_examples(
                examples[0].image, examples[0].key, metrics, student, teacher, names or [], picture):
            images["shortcut-examples.png"] = picture.read_bytes()
    paired = teacher is not None and has_teacher(metrics)
    sections: list[Section] = [
        ("Metrics", metric_header(metrics), metric_rows(metrics), None, " ".join(metric_notes(metrics))),
        ("Per group", group_header(metrics), group_rows(metrics), "groups.png", group_note(metrics)),
        ("Teacher and student explanations" if paired else "Explanations", [], [], "grid.png",
         "Both models explain the teacher's top-1 class." if paired else "The model explains its own top-1 class."),
        ("Shift test", shift_header(metrics), shift_rows(metrics), "shift.png",
         "Cosine of the explanation of the diagonally shifted image with the unshifted one, over the overlap."),
        ("Calibration", [], [], "reliability.png", RELIABILITY_NOTE),
        ("Shortcut tests", rs.shortcut_header(metrics), rs.shortcut_rows(metrics), "shortcuts.png", rs.SHORTCUT_NOTE),
        ("Shortcut examples", [], [], "shortcut-examples.png", "One test image with each pattern, explained "
         + ("by the teacher and the student (the teacher's top-1 class)" if paired else "by the model")
         + "; background, which takes a second image, is in the table only."),
        ("Training curves", [], [], "curves.png", "From the run's metrics.jsonl beside the model file."),
    ]
    about = {"samples": str(metrics["n"]), **(about or {})}
    return write_pages(out, "gte eval report", about, sections, images, metrics)


# (title, table header, table rows, image name or None, note)
Section = tuple[str, Sequence[str], list[list[str]], "str | None", str]


def write_pages(out: Path, title: str, about: dict[str, str], sections: Sequence[Section], images: dict[str, bytes],
                data: dict) -> Path:
    """Write ``report.md`` (linking the PNGs ``images``, written next to it), the self-contained ``report.html`` and
    ``metrics.json`` (``data``) into ``out``; a section shows where it has rows or its image; returns the HTML path."""
    for name, png in images.items():
        (out / name).write_bytes(png)
    md = [f"# {title}", "", *(f"- **{k}**: {markdown(v)}" for k, v in about.items()), ""]
    body = [f"<h1>{html.escape(title)}</h1><ul>" + "".join(
        f"<li><b>{html.escape(k)}</b>: <code>{html.escape(v)}</code></li>" for k, v in about.items()) + "</ul>"]
    for heading, header, rows, image, note in sections:
        if not rows and image not in images:
            continue
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if note:
            md += [note, ""]
            body.append(f"<p>{html.escape(note)}</p>")
        if rows:
            md += [*_md_table(header, rows), ""]
            body.append(_html_table(header, rows))
        if image in images:
            md += [f"![{heading}]({image})", ""]
            uri = "data:image/png;base64," + base64.b64encode(images[image]).decode("ascii")
            body.append(f'<img alt="{html.escape(heading)}" src="{uri}">')
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    for name, text in (("report.md", "\n".join(md)), ("report.html", page),
                       ("metrics.json", json.dumps(data, indent=2))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out / "report.html"
