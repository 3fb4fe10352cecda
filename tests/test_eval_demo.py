"""``gte eval`` reproduces the demo table, and writes an HTML report whose images render.

- tiny (untrained) students on the demo's test split: the CLI's JSON == ``gte.demo``'s evaluation path
  (``_row(evaluate(...))``) == an independent plain loop (forward, argmax, cosine of explain()).
- real demo outputs, when pointed at (skipped otherwise): ``GTE_EVAL_DEMO_RUN`` = a ``gte distill --out`` directory
  (``kd/``, ``e2kd/`` with model.safetensors, eval.json, and results.json) and ``GTE_EVAL_DEMO_CACHE`` = its demo
  cache entry (``teacher.safetensors``, ``data/DONE.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_report import CHROMIUM, check_html_images, chromium_loaded_images

ROW_KEYS = ("acc1", "aligned", "conflicting", "agreement", "explanation_similarity")


def gte_eval(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160", "NO_COLOR": "1"}
    env.pop("GTE_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "gte", "eval", *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def reference_row(student, teacher, spec: str) -> dict[str, float]:
    """The demo table's row computed the plain way, independent of gte.evaluate."""
    from gte.data.loader import make_loader
    from gte.explain import explain
    from gte.models import info, to_model_input

    n, hits, agree, cos, g_n, g_hit = 0, 0, 0, 0.0, [0, 0], [0, 0]
    for batch in make_loader(spec, train=False, image_size=32, eval_resize=32, batch_size=50, world_size=1, rank=0):
        x_s, x_t = to_model_input(info(student), batch["image"]), to_model_input(info(teacher), batch["image"])
        with torch.no_grad():
            s_pred, t_pred = student(x_s).argmax(1), teacher(x_t).argmax(1)
        e_s, e_t = explain(student, x_s, t_pred, "bcos"), explain(teacher, x_t, t_pred, "bcos")
        cos += F.cosine_similarity(e_s.flatten(1), e_t.flatten(1), dim=1).sum().item()
        ok = s_pred == batch["label"]
        n, hits, agree = n + len(ok), hits + int(ok.sum()), agree + int((s_pred == t_pred).sum())
        for g, o in zip(batch["group"].tolist(), ok.tolist()):
            g_n[g], g_hit[g] = g_n[g] + 1, g_hit[g] + o
    return {"acc1": hits / n, "aligned": g_hit[0] / g_n[0], "conflicting": g_hit[1] / g_n[1], "agreement": agree / n,
            "explanation_similarity": cos / n}


def assert_rows_equal(a: dict[str, float], b: dict[str, float]) -> None:
    for k in ROW_KEYS:
        if k == "explanation_similarity":  # float32 maps: equal up to batching
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
        else:
            assert a[k] == b[k], k


@pytest.mark.slow
def test_gte_eval_reproduces_demo_evaluation_and_report(tmp_path):
    from gte.config import DataConfig
    from gte.data.synthetic import write_synthetic_split
    from gte.demo import _row
    from gte.evaluate import evaluate
    from gte.models import build_model, freeze, save_model, with_spec

    spec = write_synthetic_split(tmp_path / "data", "test", 80, image_size=32, num_classes=4)
    torch.manual_seed(0)
    teacher = freeze(build_model("bcos_cifar_resnet20", 4))
    save_model(teacher, tmp_path / "teacher.safetensors")
    demo_data = DataConfig(image_size=32, eval_resize=32, num_workers=0, num_classes=4)
    for name in ("kd", "e2kd"):
        student = build_model("bcos_cifar_resnet20", 4).eval()
        (tmp_path / name).mkdir()
        # gte distill gives the student the run's geometry (the demo's eval_resize = image_size = 32): gte eval takes
        # its eval geometry from the model's spec
        save_model(with_spec(student, input_size=32, crop_pct=1.0), tmp_path / name / "model.safetensors")
        demo_row = _row(evaluate(student, spec, data=demo_data, teacher=teacher))
        assert_rows_equal(demo_row, reference_row(student, teacher, spec))
        report = ["--report", str(tmp_path / "report")] if name == "e2kd" else []
        gte_eval([str(tmp_path / name / "model.safetensors"), "--data", spec, "--teacher",
                  str(tmp_path / "teacher.safetensors"), "--json", str(tmp_path / f"{name}.json"), *report], tmp_path)
        cli = json.loads((tmp_path / f"{name}.json").read_text())
        assert cli["image_size"] == 32 and cli["eval_resize"] == 32 and cli["n"] == 80
        assert_rows_equal(_row(cli), demo_row)
    page = tmp_path / "report" / "report.html"
    assert len(check_html_images(page)) == 3  # per-group bars, reliability diagram, explanation grid (no --shift)
    if CHROMIUM:
        loaded, total, _ = chromium_loaded_images(page, tmp_path)
        assert loaded == total == 3


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("GTE_EVAL_DEMO_RUN") and os.environ.get("GTE_EVAL_DEMO_CACHE")),
                    reason="set GTE_EVAL_DEMO_RUN and GTE_EVAL_DEMO_CACHE to check real demo outputs")
def test_gte_eval_on_real_demo_outputs(tmp_path):
    run, cache = Path(os.environ["GTE_EVAL_DEMO_RUN"]), Path(os.environ["GTE_EVAL_DEMO_CACHE"])
    spec = json.loads((cache / "data" / "DONE.json").read_text())["specs"]["test"]
    table = json.loads((run / "results.json").read_text())
    for name in ("kd", "e2kd"):
        gte_eval([str(run / name / "model.safetensors"), "--data", spec, "--teacher",
                  str(cache / "teacher.safetensors"), "--json", str(tmp_path / f"{name}.json"), "--report", str(tmp_path / f"report-{name}"), "--shift",
                  "--shift-samples", "64"], tmp_path)
        cli = json.loads((tmp_path / f"{name}.json").read_text())
        from gte.demo import _row

        assert_rows_equal(_row(cli), _row(json.loads((run / name / "eval.json").read_text())))
        row = next(v for k, v in table.items() if k.startswith(f"{name} "))
        assert [round(100 * _row(cli)[k], 1) for k in ROW_KEYS] == [round(100 * row[k], 1) for k in ROW_KEYS]
        print(name, {k: round(100 * v, 1) for k, v in _row(cli).items()}, "epg", round(100 * cli["epg"], 1))
        # + shift curve, reliability diagram, training curves (the run's metrics.jsonl)
        assert len(check_html_images(tmp_path / f"report-{name}" / "report.html")) == 5
