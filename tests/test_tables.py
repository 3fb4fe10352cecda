"""Every table gte prints survives an 80-column terminal: no line is wider, no cell is cut to "…", the numbers are
whole. Commands run through the console-script entry point with COLUMNS=80; the tables printed on stderr (shard
summary, bench), whose console is made once per process, are rendered by their own functions at width 80."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from _fixtures import run_main, write_imagefolder

WIDTH = 80


def check_fits(text: str, *numbers: str) -> None:
    lines = text.splitlines()
    assert lines, "nothing printed"
    assert max(len(x) for x in lines) <= WIDTH, "\n".join(x for x in lines if len(x) > WIDTH)
    assert "…" not in text, text
    for n in numbers:
        assert n in text, f"{n!r} missing:\n{text}"


def rendered(table) -> str:
    console = Console(file=io.StringIO(), width=WIDTH, color_system=None)
    console.print(table)
    return console.file.getvalue()


@pytest.fixture()
def narrow(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gte.data.synthetic import write_synthetic_split

    root = tmp_path_factory.mktemp("tables")
    write_imagefolder(root / "photos", {"a": 1})
    (root / "photos" / "a" / "img_0.jpg").rename(root / "a_long_photo_name_from_a_camera_0001.jpg")
    return write_synthetic_split(root / "shards", "test", 16, image_size=32, num_classes=4), root


@pytest.mark.parametrize("argv,numbers", [
    (["recipes"], ["imagenet-fewshot-200", "waterbirds", "bcos_densenet169 → bcos_resnet18", "reviewkd+e2kd"]),
    (["fetch-teachers", "--list"], ["bcos_vit_ti_patch16_224", "75.19", "80.86"]),
    (["data", "info", "{spec}"], ["16 samples", "1 conflicting: 8", "png: 16"]),
    (["eval", "{model}", "--data", "{spec}", "--teacher", "{model}"],
     ["explanation similarity (mean cosine)", "1 conflicting", "attribution energy", "100.0 %"]),
    (["explain", "{image}", "--model", "{model}", "--teacher", "{model}", "--out", "{root}/e.png"],
     ["a_long_photo_name_from_", "a_camera_0001.jpg", "bcos_cifar_resnet20", "0.25"]),
], ids=["recipes", "teachers", "data-info", "eval", "explain"])
def test_command_tables_fit_80_columns(argv, numbers, data, teacher_path, narrow, monkeypatch, capsys, tmp_path):
    spec, root = data
    monkeypatch.setenv("GTE_HOME", str(tmp_path / "home"))
    values = {"spec": spec, "model": str(teacher_path), "image": str(root / "a_long_photo_name_from_a_camera_0001.jpg"),
              "root": str(tmp_path)}
    code, out, err = run_main([a.format(**values) for a in argv], monkeypatch, capsys)
    assert code == 0, err
    check_fits(out, *numbers)


def test_bench_table_fits_80_columns():
    from gte.commands.bench import table

    rows = [{"name": name, "step_s": 12.3456, "img_per_s": 1234.5, "peak_mem_mib": 123456.0, "x_ce": 12.34,
             "x_kd": 2.34, "speedup_vs_reference": 1.23}
            for name in ("student only (CE)", "reviewkd+e2kd (live teacher)", "e2KD reference (official)")]
    text = rendered(table({"student": "bcos_vit_ti_patch16_224", "teacher": "bcos_densenet169", "image_size": 224,
                           "batch": 32, "device": "NVIDIA H200, 16 torch threads", "rows": rows}))
    check_fits(text, "e2KD reference (official)", "12345.6", "1234.5", "123456", "12.34", "speed-up")


def test_shard_summary_and_demo_tables_fit_80_columns():
    from gte.commands.data import summary_table
    from gte.data.writers.core import SplitSummary
    from gte.data.writers.waterbirds import WATERBIRDS_CLASSES, WATERBIRDS_GROUPS
    from gte.demo import results_table

    splits = [SplitSummary(name, 11788, 12, 12, 3, {0: 9000, 1: 2788}, {0: 8000, 1: 1000, 2: 188, 3: 2600})
              for name in ("train", "val", "test")]
    check_fits(rendered(summary_table(splits, list(WATERBIRDS_CLASSES), list(WATERBIRDS_GROUPS))),
               "group 3 waterbird-on-water", "11788", "12 (3)")
    row = {"acc1": 0.934, "aligned": 0.998, "conflicting": 0.87, "agreement": 0.933, "explanation_similarity": 0.98,
           "epg": 0.643}
    rows = {"teacher (bcos_cifar_resnet56)": row, "e2kd student (bcos_cifar_resnet56)": row}
    check_fits(rendered(results_table(rows)), "e2kd student", "(bcos_cifar_resnet56)", "93.4", "99.8", "87.0", "64.3", "conflicting")


def test_recipes_are_one_line_each_and_one_is_described_by_name(narrow, monkeypatch, capsys):
    from gte.config import shipped_recipes

    code, out, _ = run_main(["recipes"], monkeypatch, capsys)
    names = list(shipped_recipes())
    rows = [x.split()[0] for x in out.splitlines()[2:] if x.strip() and not x.startswith(" ")]
    assert code == 0 and rows == names, out  # the models of a long pair may fold onto an indented line
    assert out.splitlines()[0].split() == ["recipe", "method", "teacher", "→", "student"]
    code, out, _ = run_main(["recipes", "imagenet-fewshot-200"], monkeypatch, capsys)
    assert code == 0 and "51.3/55.6" in out and "imagenet-fewshot-200.toml" in out
