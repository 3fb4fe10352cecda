"""The report's training curves (metrics.jsonl beside the model) and shortcut section: the figures draw what was
logged, and ``gte eval --shortcut … --report`` on a model in a run directory embeds them (rendered by Chromium when
installed)."""

from __future__ import annotations

import json
import shutil

import pytest

from _fixtures import run_main, write_jpeg_shards
from test_report import CHROMIUM, check_html_images, chromium_loaded_images

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = [{"step": s, "epoch": s // 4, "lr": 0.001, "img_per_s": 10.0, "skipped": 0, "loss": 2.0 / s, "kd": 1.0 / s,
          "exp": 0.5 / s} for s in (2, 4, 6, 8)]
EPOCHS = [{"epoch": e, "step": 4 * (e + 1), "time_s": 1.0 + e, "train_loss": 1.0, "val_acc1": 0.5 + 0.2 * e,
           "val_agreement": 0.6 + 0.1 * e} for e in (0, 1)]


def _run_dir(tmp_path, model):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model, run / "model.safetensors")
    lines = [json.dumps(r) for r in (STEPS[:2] + EPOCHS[:1] + STEPS[2:] + EPOCHS[1:])]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo', encoding="utf-8")  # a killed run
    return run


def test_curves_draw_the_logged_loss_terms_and_validation(tmp_path, teacher_path):
    from gte.report_shortcuts import curves_figure, training_log
    from test_render import assert_readable

    records = training_log(str(_run_dir(tmp_path, teacher_path) / "model.safetensors"))
    assert len(records) == 6  # the line cut short is left out
    fig = curves_figure(records)
    loss_ax, val_ax = fig.axes
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in loss_ax.get_lines()}
    assert lines["loss"] == ([2, 4, 6, 8], [2.0 / s for s in (2, 4, 6, 8)])
    assert set(lines) == {"loss", "kd", "exp"}  # lr, img/s and counters are not loss terms
    val = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in val_ax.get_lines()}
    assert val["acc1"] == ([1, 2], [pytest.approx(50.0), pytest.approx(70.0)])  # epochs from 1, in percent
    assert set(val) == {"acc1", "agreement"}
    assert_readable(fig)
    assert len(curves_figure(STEPS).axes) == 1  # no validation logged: one panel, not an empty one
    assert curves_figure([]) is None and training_log(str(tmp_path / "elsewhere.safetensors")) == []


def test_eval_report_embeds_curves_and_shortcut_results(tmp_path, teacher_path, monkeypatch, capsys):
    run = _run_dir(tmp_path, teacher_path)
    spec, _ = write_jpeg_shards(tmp_path / "d", [4])
    report = tmp_path / "report"
    code, out, err = run_main(["eval", str(run / "model.safetensors"), "--data", spec, "--teacher", str(teacher_path),
                               "--shortcut", "patch", "--shortcut", "watermark", "--report", str(report),
                               "--examples", "2"], monkeypatch, capsys)
    assert code == 0, err
    assert "shortcut tests" in out and "student acc clean → shifted" in out  # the terminal table
    for name in ("curves.png", "shortcuts.png", "shortcut-examples.png"):
        assert (report / name).is_file(), name
    md = (report / "report.md").read_text()
    assert "## Shortcut tests" in md and "| shortcut test | patch | watermark |" in md and "## Training curves" in md
    html = (report / "report.html").read_text()
    assert "Shortcut examples" in html and "share on pattern" in html
    # groups, grid, reliability, shortcut bars and examples, curves
    assert len(check_html_images(report / "report.html")) == 6
    if CHROMIUM:
        loaded, total, sizes = chromium_loaded_images(report / "report.html", tmp_path)
        assert (loaded, total) == (6, 6) and "0x0" not in sizes
