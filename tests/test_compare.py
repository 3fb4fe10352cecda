"""gte compare: the paired bootstrap's coverage on synthetic predictions with a known gap, McNemar against scipy,
and the command on real runs written by `gte distill --seeds` (grouped by method, one pass, eval's numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _fixtures import one_line_exit_2, run_main

from gte import stats


def test_paired_bootstrap_covers_the_true_gap_at_the_stated_rate():
    """Methods right with probability 0.75 and 0.70 on each of 300 test samples drawn from a population, correlated
    through per-sample difficulty (paired): the 95 % interval of acc(A) − acc(B) covers the true 0.05 in about 95 %
    of 300 repetitions (binomial sd 1.3 points), and the paired interval is narrower than an unpaired one."""
    rng = np.random.default_rng(0)
    reps, n, covered, width = 300, 300, 0, []
    for r in range(reps):
        u = rng.random(n)  # the sample's difficulty, shared by both models: A right if u < .75, B right if u < .70
        a, b = (u < 0.75).astype(float), (u < 0.70).astype(float)
        flip = rng.random(n) < 0.2  # plus some independent noise, keeping each model's rate
        a[flip], b[flip] = rng.random(flip.sum()) < 0.75, rng.random(flip.sum()) < 0.70
        ci = stats.paired_bootstrap(a, b, reps=400, seed=r)
        covered += ci["lo"] <= 0.05 <= ci["hi"]
        width.append(ci["hi"] - ci["lo"])
        assert ci["over"] == "samples" and ci["diff"] == pytest.approx(a.mean() - b.mean())
    assert 0.91 <= covered / reps <= 0.985, covered / reps
    unpaired = 2 * 1.96 * np.sqrt((0.75 * 0.25 + 0.7 * 0.3) / n)
    assert np.mean(width) < 0.8 * unpaired


def test_bootstrap_resamples_seeds_from_three_per_method():
    """With ≥ 3 seeds per method the seeds are resampled too: seeds that disagree widen the interval."""
    rng = np.random.default_rng(1)
    base = (rng.random(200) < 0.7).astype(float)
    steady = np.stack([base] * 3)
    noisy = np.stack([np.roll(base, k) * 0 + (rng.random(200) < p) for k, p in enumerate((0.5, 0.7, 0.9))])
    two = stats.paired_bootstrap(steady[:2], noisy[:2], seed=0)
    three = stats.paired_bootstrap(steady, noisy, seed=0)
    assert two["over"] == "samples" and three["over"] == "seeds+samples"
    assert three["hi"] - three["lo"] > 1.5 * (two["hi"] - two["lo"])


@pytest.mark.parametrize("only_a,only_b,both", [(0, 0, 10), (3, 9, 40), (12, 12, 5), (7, 1, 0), (40, 22, 100),
                                                (200, 150, 10)])
def test_mcnemar_equals_scipy(only_a, only_b, both):
    from scipy.stats import binomtest, chi2

    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * 7, dtype=bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * 7, dtype=bool)
    t = stats.mcnemar(a, b)
    n = only_a + only_b
    assert (t["b"], t["c"]) == (only_a, only_b)
    if n == 0:
        assert t["p"] == 1.0
    elif n < 25:
        assert t["test"] == "exact" and t["p"] == pytest.approx(binomtest(only_a, n, 0.5).pvalue, rel=1e-12)
    else:
        assert t["test"] == "chi2-cc"
        assert t["p"] == pytest.approx(chi2.sf((abs(only_a - only_b) - 1) ** 2 / n, 1), rel=1e-9)


def test_wilson_interval_formula():
    lo, hi = stats.wilson(8, 10)  # (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n), z = 1.96
    z, p, n = 1.959964, 0.8, 10
    c, h = (p + z * z / 20) / (1 + z * z / n), z * np.sqrt(p * 0.2 / n + z * z / 400) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((c - h, c + h))


# --------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory, teacher_path, one_thread):
    """`gte distill --seeds 0,1` for kd and e2kd on tiny shards (16 samples, one step per run)."""
    from gte.data.synthetic import write_synthetic_split

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("compare")
    train = write_synthetic_split(root / "data", "distill", 16, image_size=32, num_classes=4)
    test = write_synthetic_split(root / "data", "test", 24, image_size=32, num_classes=4)
    recipe = root / "tiny.toml"
    recipe.write_text(f"""
[data]
train = "{train}"
test = "{test}"
num_classes = 4
image_size = 32
eval_resize = 32
num_workers = 0
[teacher]
arch = "bcos_cifar_resnet20"
weights = "{teacher_path}"
[student]
arch = "bcos_cifar_resnet20"
[optim]
epochs = 1
batch_size = 16
warmup_epochs = 0
[run]
log_every = 1
""")
    logs = {}
    for method in ("kd", "e2kd"):
        logs[method] = _cli(["distill", "--recipe", str(recipe), "--set", f"distill.method={method}", "--out",
                             str(root / method), "--seeds", "0,1"], mp)
    mp.undo()
    return {"root": root, "test": test, "recipe": recipe, "logs": logs}


def _cli(argv, mp):
    import sys

    from gte.cli import main

    mp.setattr(sys, "argv", ["gte", *argv])
    try:
        main()
    except SystemExit as e:
        assert not e.code, e.code
    return argv


def test_distill_seeds_writes_one_run_per_seed_and_skips_finished_ones(seeded_runs, monkeypatch, capsys):
    root = seeded_runs["root"]
    for method in ("kd", "e2kd"):
        for seed in (0, 1):
            out = root / method / f"seed-{seed}"
            assert (out / "model.safetensors").is_file() and (out / "test.json").is_file()
            assert f"seed = {seed}" in (out / "recipe.toml").read_text()
    assert (root / "kd/seed-0/model.safetensors").read_bytes() != (root / "kd/seed-1/model.safetensors").read_bytes()
    code, _, err = run_main(["distill", "--recipe", str(seeded_runs["recipe"]), "--set", "distill.method=kd",
                             "--out", str(root / "kd"), "--seeds", "0,1"], monkeypatch, capsys)
    assert code == 0 and err.count("skipped") == 2, err
    for name in ("model.safetensors", "test.json"):  # seed 1 as if stopped after its last checkpoint
        (root / "kd" / "seed-1" / name).unlink()
    code, _, err = run_main(["distill", "--recipe", str(seeded_runs["recipe"]), "--set", "distill.method=kd",
                             "--out", str(root / "kd"), "--seeds", "0,1"], monkeypatch, capsys)
    assert code == 0 and err.count("skipped") == 1 and "resuming from" in err, err
    assert (root / "kd" / "seed-1" / "model.safetensors").is_file()


def test_demo_seeds_share_data_and_teacher():
    """The demo's data and teacher follow demo.data_seed (set by --seeds to the recipe's run.seed), not the
    students' run.seed; with data_seed = -1 they follow run.seed as before."""
    from gte.config import load_recipe
    from gte.demo import _cache_dir

    base = load_recipe("demo")
    student = load_recipe("demo", ["run.seed=7", f"demo.data_seed={base.run.seed}"])
    assert _cache_dir(student) == _cache_dir(base)
    assert _cache_dir(load_recipe("demo", ["run.seed=7"])) != _cache_dir(base)


def test_compare_groups_seeds_by_method_and_matches_each_runs_own_eval(seeded_runs, monkeypatch, capsys, tmp_path):
    root = seeded_runs["root"]
    runs = [str(root / m / f"seed-{s}") for m in ("kd", "e2kd") for s in (0, 1)]
    # the test shards and the teacher: the runs' own data.test and teacher.weights
    code, out, err = run_main(["compare", *runs, "--json", "-", "--bootstrap", "200"], monkeypatch, capsys)
    assert code == 0, err
    assert f"--data: {seeded_runs['test']}" in err and f"--teacher: {_teacher(root)}" in err
    r = json.loads(out)
    assert r["n"] == 24 and list(r["methods"]) == ["kd", "e2kd"]
    for method in ("kd", "e2kd"):
        m = r["methods"][method]
        assert m["seeds"] == [0, 1] and len(m["per_run"]) == 2
        for run, got in zip(m["runs"], m["per_run"]):  # one pass over the data: the numbers of each run's own eval
            own = json.loads((root / run / "test.json").read_text())
            for k in ("acc1", "acc5", "agreement", "balanced_acc", "worst_group_acc"):
                assert got[k] == pytest.approx(own[k]), k
            assert got["explanation_similarity"] == pytest.approx(own["explanation_similarity"], abs=1e-5)
            assert got["ece"] == pytest.approx(own["ece"], abs=1e-6)
        accs = [x["acc1"] for x in m["per_run"]]
        assert m["mean"]["acc1"] == pytest.approx(np.mean(accs)) and m["std"]["acc1"] == pytest.approx(
            np.std(accs, ddof=1))
    pairs = {p["metric"]: p for p in r["pairs"]}
    assert set(pairs) == {"acc1", "agreement", "explanation_similarity"}
    assert pairs["acc1"]["a"] == "kd" and pairs["acc1"]["lo"] <= pairs["acc1"]["diff"] <= pairs["acc1"]["hi"]
    assert [(t["seed_a"], t["seed_b"]) for t in pairs["acc1"]["mcnemar"]] == [(0, 0), (1, 1)]
    code, out, err = run_main(["compare", *runs, "--data", seeded_runs["test"], "--bootstrap", "200", "--report",
                               str(tmp_path / "rep"), "--examples", "2"], monkeypatch, capsys)
    assert code == 0 and "kd − e2kd" in out and "McNemar" in out, err
    assert "group 1 conflicting acc" in out  # the shards' groups.json names the groups
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # per-group bars, reliability diagram, explanation grid
    assert {"groups.png", "reliability.png", "grid.png"} <= {p.name for p in (tmp_path / "rep").iterdir()}
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["methods"].keys() == {"kd", "e2kd"}


def _teacher(root):
    import tomllib

    return tomllib.loads((root / "kd" / "seed-0" / "recipe.toml").read_text())["teacher"]["weights"]


def test_compare_bad_inputs_are_one_line(tmp_path, teacher_path, monkeypatch, capsys):
    from gte.models import build_model, save_model

    (tmp_path / "empty").mkdir()
    one_line_exit_2(["compare", str(teacher_path), "--data", "x.tar"], monkeypatch, capsys, "at least 2 models")
    one_line_exit_2(["compare", str(teacher_path), str(tmp_path / "empty"), "--data", "x.tar"], monkeypatch, capsys,
                    "empty: no model.safetensors")
    one_line_exit_2(["compare", str(teacher_path), str(teacher_path), "--data", "x.tar"], monkeypatch, capsys,
                    "the same model")
    (tmp_path / "copy.safetensors").write_bytes(teacher_path.read_bytes())
    one_line_exit_2(["compare", str(teacher_path), str(tmp_path / "copy.safetensors")], monkeypatch, capsys,
                    "--data is needed: the runs' recipes do not share one data.test")
    torch.manual_seed(0)
    save_model(build_model("bcos_cifar_resnet20", 3), tmp_path / "three.safetensors")
    from gte.data.synthetic import write_synthetic_split

    spec = write_synthetic_split(tmp_path / "d", "test", 4, image_size=32, num_classes=4)
    one_line_exit_2(["compare", str(teacher_path), str(tmp_path / "three.safetensors"), "--data", spec], monkeypatch,
                    capsys, "different class counts (3, 4)")
    one_line_exit_2(["distill", "--seeds", "0,x"], monkeypatch, capsys, "--seeds expects distinct integers")
