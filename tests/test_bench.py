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
    for name in ("student only (CE)", "KD (live teacher)", "e2KD live K=1", "e2KD live K=16", "e2KD frozen",
                 "e2KD reference"):
        assert name in r.stdout, (name, r.stdout)
    res = json.loads(out.read_text())
    rows = {x["key"]: x for x in res["rows"]}
    assert set(rows) == {"ce", "kd", "e2kd_k1", "e2kd_k16", "e2kd_frozen", "reference"}
    assert res["batch"] == 4 and all(x["step_s"] > 0 and x["img_per_s"] > 0 for x in rows.values())
    assert rows["ce"]["x_ce"] == 1.0 and rows["reference"]["speedup_vs_reference"] == 1.0
    assert all(len(x["times_s"]) == 3 for k, x in rows.items() if k != "e2kd_k16")
