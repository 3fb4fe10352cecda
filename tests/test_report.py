"""``gte eval --report``: Markdown + self-contained HTML whose images decode (Python parser) and render (headless
Chromium, when installed), and the terminal tables. The HTML helpers here are reused by tests/test_eval_demo.py."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif a.get("src") or a.get("href"):  # scripts, stylesheets, frames, links: nothing may be loaded
            self.external.append(f"<{tag}> {a}")


def check_html_images(path: Path) -> list[tuple[int, int]]:
    """Every <img> is a decodable ``data:image/png;base64`` URI and nothing external is referenced; → image sizes."""
    parser = _Refs()
    parser.feed(path.read_text(encoding="utf-8"))
    assert parser.images, "no images in the report"
    assert not parser.external, parser.external
    sizes = []
    for src in parser.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            im.load()
            sizes.append(im.size)
    return sizes


def chromium_loaded_images(path: Path, tmp: Path) -> tuple[int, int, list[str]]:
    """Open a copy of the page (plus a probe script) in headless Chromium: (images loaded, images, natural sizes)."""
    probe = ("<script>addEventListener('load',()=>{const i=[...document.images];const p=document.createElement('pre');"
             "p.textContent='GTE-PROBE '+i.filter(x=>x.complete&&x.naturalWidth>0).length+' '+i.length+' '+"
             "i.map(x=>x.naturalWidth+'x'+x.naturalHeight).join(',');document.body.appendChild(p);});</script>")
    page = tmp / "probe.html"
    page.write_text(path.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          f"--user-data-dir={tmp / 'chrome-profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"GTE-PROBE (\d+) (\d+) ([\dx,]*)", res.stdout)
    assert found, f"Chromium printed no probe result: {res.stderr[-2000:]}"
    return int(found.group(1)), int(found.group(2)), found.group(3).split(",")


METRICS = {
    "n": 6, "acc1": 0.5, "acc5": 1.0, "agreement": 0.5, "explanation_similarity": 0.84,
    "groups": {"0": 1.0, "1": 0.25}, "group_counts": {"0": 2, "1": 4}, "worst_group_acc": 0.25,
    "group_agreement": {"0": 1.0, "1": 0.5}, "epg": 0.6, "iou": 0.2,
    "shift": {"t": [0, 1, 2], "n": 6, "student": [1.0, 0.8, 0.7], "teacher": [1.0, 0.9, 0.85]},
    "teacher": {"acc1": 1.0, "acc5": 1.0, "groups": {"0": 1.0, "1": 1.0}, "epg": 0.7, "iou": 0.3},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import torch

    from gte.evaluate import Example
    from gte.models import build_model
    from gte.report import write_report

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("report")
    student, teacher = build_model("bcos_cifar_resnet20", 2).eval(), build_model("bcos_cifar_resnet20", 2).eval()
    examples = [Example(f"{i:06d}", torch.rand(3, 16, 16), i % 2, i % 2) for i in range(2)]
    page = write_report(out, METRICS, examples=examples, student=student, teacher=teacher, names=["cat", "dog"],
                        about={"model": "s.safetensors"})
    return out, page


def test_report_files_and_markdown(report):
    out, page = report
    assert page == out / "report.html"
    for name in ("report.md", "metrics.json", "groups.png", "shift.png", "grid.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| acc@1 | 50.0 % | 100.0 % |" in md and "| worst-group acc | 25.0 % | — |" in md
    assert "| explanation similarity (mean cosine) | 0.840 | — |" in md  # a cosine stays a cosine, labelled so
    assert "| 1 | 4 | 25.0 % | 50.0 % | 100.0 % |" in md  # group 1: n, acc, agreement, teacher acc
    assert "| 2 | 0.700 | 0.850 |" in md  # the shift curve
    assert json.loads((out / "metrics.json").read_text())["acc1"] == 0.5  # the JSON keeps fractions
    for image in ("groups.png", "shift.png", "grid.png"):
        assert f"]({image})" in md


def test_report_html_is_self_contained(report):
    _, page = report
    sizes = check_html_images(page)
    assert len(sizes) == 3 and all(w > 100 and h > 100 for w, h in sizes)
    assert all(w <= 1168 for w, _ in sizes)  # within the page's 1200 px: shown at 100 %, text never shrunk


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, page = report
    loaded, total, sizes = chromium_loaded_images(page, tmp_path)
    assert (loaded, total) == (3, 3) and "0x0" not in sizes


def test_terminal_tables():
    text = _terminal(METRICS)
    assert "explanation similarity (mean cosine)" in text and "0.840" in text and "0.850" in text
    assert "25.0 %" in text and "50.0 %" in text and "84.0" not in text


def _terminal(metrics: dict, width: int = 120) -> str:
    from rich.console import Console

    from gte.report import print_summary

    console = Console(file=io.StringIO(), width=width, color_system=None)
    print_summary(metrics, console)
    return console.file.getvalue()


def test_groups_are_named_and_the_waterbirds_note_is_for_waterbirds_only(tmp_path):
    from gte.report import write_report

    named = {**METRICS, "group_names": {"0": "aligned", "1": "conflicting"}}
    write_report(tmp_path / "demo", named)
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "| 1 conflicting | 4 | 25.0 % |" in md and "Waterbirds" not in md
    assert "1 conflicting" in _terminal(named) and "Waterbirds" not in _terminal(named)
    birds = {**METRICS, "waterbirds": True, "group_names": {"0": "landbird-on-land", "1": "landbird-on-water"}}
    write_report(tmp_path / "birds", birds)
    md = (tmp_path / "birds" / "report.md").read_text()
    assert "| 1 landbird-on-water | 4 |" in md and "OOD = the minority groups 1 and 2" in md


def test_epg_and_iou_are_explained_where_they_are_shown(report, tmp_path):
    out, page = report
    for text in ((out / "report.md").read_text(), page.read_text(), _terminal(METRICS)):
        flat = " ".join(text.replace("│", " ").split())  # the terminal caption wraps
        assert "fraction of the positive attribution energy" in flat and "thresholded at 0.5" in flat
    from gte.report import write_report

    without = {k: v for k, v in METRICS.items() if k not in ("epg", "iou", "teacher")}
    write_report(tmp_path / "plain", without)
    assert "attribution energy" not in (tmp_path / "plain" / "report.md").read_text()
    assert "attribution energy" not in _terminal(without)


# ------------------------------------------------------------------------------------------ issue 21: readable reports
ALONE = {k: v for k, v in METRICS.items() if k not in ("teacher", "agreement", "explanation_similarity",
                                                        "group_agreement")}
ALONE = {**ALONE, "shift": {k: v for k, v in METRICS["shift"].items() if k != "teacher"},
         "group_names": {"1": "landbird-on-water"}}


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """A report of a model evaluated without a teacher; its examples: one in a named group, one in none (-1)."""
    import torch

    from gte.evaluate import Example
    from gte.models import build_model
    from gte.report import write_report

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("alone")
    model = build_model("cifar_resnet20", 2).eval()
    examples = [Example("000000", torch.rand(3, 16, 16), 1, 1), Example("000001", torch.rand(3, 16, 16), 0, -1)]
    write_report(out, ALONE, examples=examples, student=model, names=["tiger cat", "dog"])
    return out, model, examples


def test_no_teacher_no_teacher_heading_column_or_series(alone):
    out, _, _ = alone
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text(), _terminal(ALONE)):
        assert "teacher" not in text.lower()
        assert "—" not in text  # no column left empty
    md = (out / "report.md").read_text()
    assert "| metric | model |" in md and "| acc@1 | 50.0 % |" in md and "| group | n | acc |" in md
    assert "| shift px | model |" in md and "## Explanations" in md and "its own top-1" in md


def test_examples_are_captioned_with_class_and_group_names(alone, tmp_path):
    from gte.render import figure
    from gte.report import grid_figure

    _, model, examples = alone
    rows = grid_figure(examples, model, None, ["tiger cat", "dog"], tmp_path / "grid.png", ALONE["group_names"])
    assert [r.note for r in rows] == ["label: dog\ngroup: landbird-on-water", "label: tiger cat"]  # no group: -1
    texts = " ".join(t.get_text() for t in figure(rows, ["tiger cat", "dog"]).findobj(lambda a: hasattr(a, "get_text")))
    assert "label: dog" in texts and "y=" not in texts and "g=" not in texts
    rows = grid_figure(examples[:1], model, None, ["tiger cat", "dog"], tmp_path / "grid.png")
    assert rows[0].note == "label: dog\ngroup: 1"  # a group the data does not name keeps its number


@pytest.mark.parametrize("metrics", [METRICS, ALONE], ids=["teacher", "alone"])
def test_report_figures_are_readable(metrics):
    from gte.report import group_figure, shift_figure
    from test_render import assert_readable

    for fig in (group_figure(metrics), shift_figure(metrics)):
        assert_readable(fig)


def test_no_default_shown_beside_a_default_the_help_explains():
    """`[default: 0]` beside "(default: the model's own)" contradicts it: such options hide typer's default."""
    import typer.main
    from typer.testing import CliRunner

    from gte.cli import app

    def leaves(group, path=()):
        for name, cmd in group.commands.items():
            yield from leaves(cmd, (*path, name)) if hasattr(cmd, "commands") else [((*path, name), cmd)]

    clashes = []
    for path, cmd in leaves(typer.main.get_command(app)):
        text = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"}).output
        clashes += [" ".join(path) + ": " + " ".join(ln.split()) for ln in text.splitlines()
                    if "(default:" in ln and "[default:" in ln]
    assert not clashes, clashes


def test_eval_report_shows_calibration_and_the_new_accuracies(tmp_path):
    """ECE, balanced and worst-class accuracy in the metric table; the reliability diagram as a figure."""
    from gte.metrics import calibration_bins, reliability
    from gte.report import write_report

    bins = calibration_bins([0.95, 0.9, 0.55, 0.6], [1, 0, 1, 1])
    m = {"n": 4, "acc1": 0.75, "acc5": 1.0, "balanced_acc": 0.8, "worst_class_acc": 0.6, "worst_class": 1,
         "ece": 0.25, "reliability": reliability(bins)}
    write_report(tmp_path, m)
    md = (tmp_path / "report.md").read_text()
    assert "| ECE (15 bins) | 25.0 % |" in md and "| balanced acc | 80.0 % |" in md
    assert "| worst-class acc | 60.0 % |" in md and "](reliability.png)" in md
    assert len(check_html_images(tmp_path / "report.html")) == 1
