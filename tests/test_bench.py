"""`gte bench`: every row runs and is printed, the JSON holds consistent numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tomli_w


def test_gte_bench_runs_all_rows(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps({
        "data": {"num_classes": 4, "image_size": 32},
        "teacher": {"arch": "bcos_cifar_resnet20"},   # no weights: bench uses random initialisation
        "student": {"arch": "bcos_cifar_resnet20"},
        "distill": {"method": "e2kd"},
        "optim": {"batch_size": 4},
    }))
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "gte", "bench", "--recipe", str(recipe), "--steps", "3",
                        "--json", str(out)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200",
                                                                                    "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    for name in ("student only (CE)", "KD (live teacher)", "e2KD live K=1", "e2KD live K=16", "e2KD frozen K=1",
                 "e2KD frozen K=16", "e2KD reference", "teacher forward + W(x)", "floor for e2KD live K=1"):
        assert name in r.stdout, (name, r.stdout)
    res = json.loads(out.read_text())
    rows = {x["key"]: x for x in res["rows"]}
    assert set(rows) == {"ce", "kd", "e2kd_k1", "e2kd_k16", "e2kd_frozen", "e2kd_frozen_k16", "reference",
                         "teacher_fwd", "teacher_explain", "at", "cat_kd", "crd", "dist", "dkd", "reviewkd",
                         "crd_e2kd"}
    for name in ("at (live teacher)", "reviewkd (live teacher)", "crd+e2kd (live teacher)"):
        assert name in r.stdout, (name, r.stdout)
    assert res["batch"] == 4 and all(x["step_s"] > 0 and x["img_per_s"] > 0 for x in rows.values())
    assert rows["ce"]["x_ce"] == 1.0 and rows["kd"]["x_kd"] == 1.0 and rows["reference"]["speedup_vs_reference"] == 1.0
    assert all(len(x["times_s"]) == 3 for x in rows.values())  # K = 16 rows too: one interval per round
    # memory comes from a separate process; explanation steps keep the double-backward graph on top of KD's
    assert all(x["peak_mem_mib"] > 0 for x in rows.values())
    assert rows["e2kd_frozen"]["peak_mem_mib"] > rows["ce"]["peak_mem_mib"]
    # the memory floor: KD's peak + what the student's W(x) keeps for the final backward (a memory-only row)
    m = res["memory_floor"]
    assert "exp_kept" not in rows and m["exp_kept_mib"] > 0
    assert abs(m["peak_mem_mib"] - rows["kd"]["peak_mem_mib"] - m["exp_kept_mib"]) < 1e-9
    assert "memory floor for e2KD live" in r.stdout
    f = res["floor"]
    want = rows["kd"]["step_s"] + rows["teacher_explain"]["step_s"] - rows["teacher_fwd"]["step_s"] + \
        rows["e2kd_frozen"]["step_s"] - rows["ce"]["step_s"]
    assert abs(f["step_s"] - want) < 1e-12 and abs(f["x_kd"] - want / rows["kd"]["step_s"]) < 1e-12
    # per round: live e2KD ÷ the floor of that round's five rows
    t = {k: x["times_s"] for k, x in rows.items()}
    for i, ratio in enumerate(f["live_over_floor_per_round"]):
        floor_i = t["kd"][i] + t["teacher_explain"][i] - t["teacher_fwd"][i] + t["e2kd_frozen"][i] - t["ce"][i]
        assert abs(ratio - t["e2kd_k1"][i] / floor_i) < 1e-12
    assert "% over the floor (per round: " in r.stdout


def test_bench_only_runs_the_named_rows_and_the_floors():
    import pytest
    import torch

    from gte.bench import run_bench
    from gte.config import from_dict
    from gte.errors import GteError

    recipe = from_dict({"data": {"num_classes": 4, "image_size": 16}, "teacher": {"arch": "bcos_cifar_resnet20"},
                        "student": {"arch": "bcos_cifar_resnet20"}, "optim": {"batch_size": 2}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_bench(recipe, steps=1, only=["dkd", "crd+e2kd"], measure_memory=False)
        with pytest.raises(GteError, match="gte bench has no row dkdd; rows: e2kd_k16"):
            run_bench(recipe, steps=1, only=["dkdd"], measure_memory=False)
    finally:
        torch.set_num_threads(threads)
    assert {x["key"] for x in res["rows"]} == {"ce", "kd", "e2kd_k1", "e2kd_frozen", "reference", "teacher_fwd",
                                               "teacher_explain", "dkd", "crd_e2kd"}
    assert len(res["floor"]["live_over_floor_per_round"]) == 1


def test_bench_gives_the_recipes_own_method_its_options_and_no_other_row():
    """`--set distill.method=reviewkd --set distill.options.mid_channel=…`: the ReviewKD row is built with them (an
    invalid value is refused by ReviewKD's options: no row, the reason listed), the CE/KD/e2KD rows without them."""
    from gte.bench import build_rows
    from gte.config import from_dict

    def recipe(mid: int):
        return from_dict({"data": {"num_classes": 4, "image_size": 16}, "teacher": {"arch": "bcos_cifar_resnet20"},
                          "student": {"arch": "bcos_cifar_resnet20"}, "optim": {"batch_size": 2},
                          "distill": {"method": "reviewkd", "options": {"mid_channel": mid}}}, check_ranges=False)

    import torch

    rows, meta = build_rows(recipe(8), 2, "fp32", torch.device("cpu"))
    assert {"ce", "kd", "e2kd_k1", "reviewkd"} <= {r[0] for r in rows} and not meta["skipped"]
    rows, meta = build_rows(recipe(-1), 2, "fp32", torch.device("cpu"))
    assert "reviewkd" not in {r[0] for r in rows} and "mid_channel" in meta["skipped"]["reviewkd"]


def test_gte_bench_rejects_unknown_precision(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps({"teacher": {"arch": "bcos_cifar_resnet20"},
                                     "student": {"arch": "bcos_cifar_resnet20"}}))
    r = subprocess.run([sys.executable, "-m", "gte", "bench", "--recipe", str(recipe), "--precision", "fp8"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--precision must be fp32 or bf16" in r.stderr, r.stderr


def test_bench_reference_step_computes_gtes_exact_gradient():
    """The reference row is only a fair baseline if it computes the same gradient as gte's step (float64)."""
    import copy

    import torch

    from gte.bench_reference import reference_e2kd_loss
    from gte.config import DistillConfig
    from gte.methods import Batch
    from gte.methods.e2kd import E2KD
    from gte.models import build_model

    torch.manual_seed(0)
    for arch, size in (("bcos_cifar_resnet20", 16), ("bcos_vit_ti_patch16_224", 32)):
        student = build_model(arch, 10).double().train()
        ref = copy.deepcopy(student)
        teacher = build_model(arch, 10).double().eval()
        images = torch.rand(3, 3, size, size, dtype=torch.float64)
        cfg = DistillConfig(method="e2kd", lambda_exp=3.0, temperature=2.0)
        E2KD(cfg, student, teacher).loss(Batch(images, torch.zeros(3, dtype=torch.long)))[0].backward()
        reference_e2kd_loss(ref, teacher, images, cfg, "bcos").backward()
        for (name, p), q in zip(ref.named_parameters(), student.parameters()):
            assert (q.grad - p.grad).abs().max() <= 1e-9 * p.grad.abs().max(), (arch, name)


def test_bench_skips_a_method_the_pair_cannot_run_and_says_why():
    """MobileNetV3's classifier reads a 1×1 conv after pooling, not the feature map: CAT-KD has no class activation
    maps there. The bench leaves that row out, with the reason, instead of failing (rows are built, not timed)."""
    import torch

    from gte.bench import build_rows
    from gte.config import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe("own-teacher", ["data.image_size=32", "teacher.image_size=0", "data.num_classes=4"])
    rows, meta = build_rows(recipe, 2, "fp32", torch.device("cpu"))
    keys = {r[0] for r in rows}
    assert "cat_kd" not in keys and {"at", "crd", "dkd", "dist", "reviewkd", "crd_e2kd"} <= keys
    assert set(meta["skipped"]) == {"cat_kd"} and "1024 channels" in meta["skipped"]["cat_kd"]
