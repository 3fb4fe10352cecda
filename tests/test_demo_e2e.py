"""The README's first command, end to end: `gte distill` with no arguments on a fresh cache (slow: minutes)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import DEMO_SCALE


@pytest.mark.slow
def test_gte_distill_demo_e2kd_beats_kd(tmp_path, demo_home):
    home = demo_home  # empty when this test runs first (as in the suite): the README's command on a fresh cache
    env = {**os.environ, "GTE_HOME": str(home)}
    out = tmp_path / "demo"
    # scale overrides only (the suite's time, conftest.DEMO_SCALE): students 3 epochs on 1000 distillation images
    # instead of 5 on 2000, a 500-image test split, the README's teacher data in 4 epochs instead of 5. Measured
    # (2-core AMD EPYC, 150 s): teacher conflicting 98.8, KD 19.6 vs e2KD 26.8 conflicting, explanation similarity
    # 15.5 vs 54.7 (README's 5-epoch teacher: 100.0; 10.0 vs 23.6; 19.1 vs 60.2)
    sets = [x for kv in DEMO_SCALE for x in ("--set", kv)]
    res = subprocess.run([sys.executable, "-m", "gte", "distill", "--out", str(out), *sets], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "conflicting" in res.stdout  # the result table is printed
    rows = json.loads((out / "results.json").read_text())
    teacher = next(v for k, v in rows.items() if k.startswith("teacher"))
    kd = next(v for k, v in rows.items() if k.startswith("kd "))
    e2kd = next(v for k, v in rows.items() if k.startswith("e2kd "))
    assert teacher["conflicting"] > 0.9  # the teacher looks at the object, not the background
    assert kd["conflicting"] < 0.5      # plain KD on the 100 %-correlated split learns the shortcut
    assert e2kd["explanation_similarity"] > kd["explanation_similarity"] + 0.2
    assert e2kd["conflicting"] >= kd["conflicting"]
    for m in ("kd", "e2kd"):
        assert (out / m / "model.safetensors").is_file() and (out / m / "eval.json").is_file()
    # the teacher and shards are cached: a second run reuses them
    assert len(list((home / "demo").glob("*/teacher.safetensors"))) == 1
    # the report line the demo prints runs as printed (its paths need no GTE_HOME in the environment)
    line = next(x for x in res.stderr.splitlines() if x.startswith("an HTML report with pictures: gte eval "))
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[argv.index("--report") + 1] == str(out / "report")
    env.pop("GTE_HOME")
    rep = subprocess.run([sys.executable, "-m", "gte", *argv[1:]], env=env, capture_output=True, text=True,
                         timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert (out / "report" / "report.html").is_file()
