"""`gte bench --suite gpu`: its CPU dry run writes every section, compares something, and says what it skipped."""

from __future__ import annotations

import json
import time

import pytest
import torch

from _fixtures import one_line_exit_2, run_main

# the dry run and the "no CUDA" refusal are what a machine without a GPU sees (CI); on a GPU machine run the suite
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check: this machine has CUDA")


@cpu_only
def test_gpu_suite_dry_run_on_cpu_writes_every_section(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "suite"
    code, stdout, err = run_main(["bench", "--suite", "gpu", "--device", "cpu", "--out", str(out)], monkeypatch,
                                 capsys)
    assert code == 0, err[-3000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    md = (out / "gpu_suite.md").read_text()
    assert md in stdout
    sections = res["sections"]
    assert set(sections) == {"correctness", "ddp", "figures", "loader", "loader_vs_device"}
    command = "gte bench --suite gpu --device cpu --out " + str(out)
    for s in sections.values():  # every section says where and how it ran
        assert s["command"] == command and s["machine"]["cpu_count"] >= 1 and s["machine"]["torch"]
        assert "gpu" in s["machine"] and s["status"] in ("ran", "pass"), s
    assert res["passed"] and res["failures"] == [] and res["device"] == "cpu"

    checks = {c["name"].split(",")[0]: c for c in sections["correctness"]["checks"]}
    steps = [c for c in checks.values() if "rel" in c]
    assert {c["explainer"] for c in steps} == {"bcos", "gradcam"}
    for c in steps:  # the comparison sees a difference where there is one: its control fails it
        assert c["status"] == "pass" and c["rel"] <= 1e-4 and c["parameters_compared"] > 10
        assert c["control"]["detected"] and c["control"]["rel"] > 1e-3
    bf16 = checks["bf16 training bcos_cifar_resnet20 ← bcos_cifar_resnet20"]
    assert bf16["status"] == "pass" and bf16["explanation_loss"][-1] < bf16["explanation_loss"][0]
    fp16 = checks["fp16 training bcos_cifar_resnet20 ← bcos_cifar_resnet20"]
    assert fp16["status"] == "skipped" and "needs CUDA" in fp16["reason"]

    ddp = sections["ddp"]
    assert ddp["status"] == "pass" and ddp["backend"] == "gloo, CPU" and ddp["rel"] <= 1e-4
    assert ddp["control"]["detected"] and ddp["control"]["rel"] > 1e-3  # half the batch: other weights
    assert "gte.launch" in ddp["commands"]["two"] and ddp["nccl"]["status"] == "skipped"

    figures = sections["figures"]
    assert [(r["precision"], r["channels_last"]) for r in figures["runs"]] == [("fp32", False), ("bf16", True)]
    for run in figures["runs"]:
        keys = {r["key"] for r in run["rows"]}
        assert keys == {"ce", "kd", "e2kd_k1", "e2kd_k16", "e2kd_frozen", "e2kd_frozen_k16", "reference",
                        "teacher_fwd", "teacher_explain"}
        assert all(r["img_per_s"] > 0 for r in run["rows"])
    assert "compile_teacher" in figures["not_in_dry_run"] and figures["skipped_runs"] == []

    loader = sections["loader"]
    assert {r["workers"] for r in loader["loader"]} == {1, loader["cpus_usable"]} | {max(1, loader["cpus_usable"] // 2)}
    assert all(r["img_per_s"] > 0 for r in loader["loader"])
    cmp_ = sections["loader_vs_device"]
    assert len(cmp_["rows"]) == 2 * 5 and all(r["ratio"] > 0 for r in cmp_["rows"])

    for heading in ("## Checks", "## Step cost", "## Loader on the host", "÷ loader img/s", "Not in the CPU dry run"):
        assert heading in md, heading
    assert md.count("| correctness |") == 4 and "| skipped |" in md and "detected" in md


def test_relative_error_per_tensor_and_over_all():
    import math

    from gte.bench_suite.checks import relative_error

    want = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 12.0]), "z": torch.zeros(2)}
    got = {"a": torch.tensor([3.0, 4.5]), "b": torch.tensor([0.0, 12.0]), "z": torch.zeros(2)}
    r = relative_error(got, want)
    assert r["worst_parameter"] == "a" and math.isclose(r["rel"], 0.5 / 5) and math.isclose(r["rel_all"], 0.5 / 13)
    assert relative_error({"a": want["a"]}, want)["rel"] == math.inf  # a tensor left out is not "equal"
    assert relative_error({**want, "a": torch.zeros(3)}, want)["rel"] == math.inf
    assert relative_error({**want, "z": torch.ones(2)}, want)["rel"] == math.inf  # 1/0


def test_a_step_check_whose_control_changes_nothing_fails(monkeypatch, one_thread):
    """The device-vs-CPU check passes only when its control (a moved weight) is caught: with a control that moves
    nothing it cannot tell a wrong step from a right one, and reports a failure."""
    import copy

    from gte.bench_suite import checks

    monkeypatch.setattr(checks, "perturbed", copy.deepcopy)
    r = checks.device_step("cifar_resnet20", "cifar_resnet20", size=16, batch=2, classes=4, device=torch.device("cpu"))
    assert r["rel"] == 0 and r["control"]["rel"] == 0 and not r["control"]["detected"] and r["status"] == "fail"


def test_figures_past_the_time_budget_are_skipped_and_listed():
    from rich.console import Console

    from gte.bench_suite.figures import figure_runs, run_figures

    runs = figure_runs((("bcos_resnet34", "bcos_resnet18"),), ("fp32", "bf16"))
    assert [(r.precision, r.channels_last, r.compile_teacher) for r in runs] == [
        ("fp32", False, False), ("bf16", False, False), ("fp32", True, True), ("bf16", True, True)]
    res = run_figures(tuple(runs), size=224, batch=64, classes=1000, steps=5, deadline=time.monotonic() - 1,
                      memory=False, compile_s=90, console=Console(quiet=True))
    assert res["status"] == "skipped" and res["runs"] == [] and len(res["skipped_runs"]) == 4
    assert all(s["reason"].startswith("time budget: 0 s left") for s in res["skipped_runs"])


@pytest.mark.parametrize("argv, needle", [
    (["--suite", "gpu"], "no CUDA device here"),
    (["--suite", "gpu", "--device", "cpu", "--steps", "3"], "takes --device, --out and --budget only"),
    (["--suite", "cpu"], "--suite must be one of gpu"),
    (["--out", "x"], "go with --suite gpu"),
])
@cpu_only
def test_suite_refusals_are_one_line(argv, needle, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(tmp_path)
    one_line_exit_2(["bench", *argv], monkeypatch, capsys, needle)
