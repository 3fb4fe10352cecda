"""``gte eval`` under ``torchrun --nproc_per_node 2`` (CPU, gloo) gives the single-process numbers: every sample once.
Not marked slow: about 15 s on the shared 2-core machine (two CLI runs, three processes).

Uneven on purpose: 3 shards of 7, 5 and 2 samples for 2 ranks × 2 workers (the loader splits samples exactly).
Every metric family is on: groups, multi-label F1/mAP (gathered per-sample lists), EPG/IoU, the shift test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_eval_small import write_shards


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160", "NO_COLOR": "1"}
    env.pop("GTE_DEBUG", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


# ratios of sample counts: identical, not just close
EXACT = {"n", "acc1", "acc5", "agreement", "groups", "group_counts", "group_agreement", "worst_group_acc",
         "multilabel_n", "localisation_n", "skipped"}


def _close(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (path, sorted(a), sorted(b))
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not EXACT.intersection(path.split(".")):
        # explanations and logits are float32 and depend slightly on how samples are batched on each rank
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_torchrun_two_processes_equals_single(tmp_path):
    import torch

    from gte.models import build_model, save_model

    sizes = [7, 5, 2]
    metas, labels = [], []
    for i in range(sum(sizes)):
        y = i % 3
        metas.append({"group": i % 2, "labels": sorted({y, (i * 7) % 3}), "boxes": [[i % 5, 1, 9 + i % 6, 14]],
                      "box_labels": [y]})
        labels.append(y)
    start = 0
    for s, n in enumerate(sizes):
        spec = write_shards(tmp_path / f"part{s}", metas[start:start + n], size=16, labels=labels[start:start + n])
        target = tmp_path / f"d-{s:06d}.tar"
        os.replace(spec, target)
        start += n
    spec = str(tmp_path / "d-{000000..000002}.tar")
    torch.manual_seed(0)
    save_model(build_model("bcos_cifar_resnet20", 3), tmp_path / "s.safetensors")
    save_model(build_model("bcos_cifar_resnet20", 3), tmp_path / "t.safetensors")
    args = ["eval", str(tmp_path / "s.safetensors"), "--data", spec, "--teacher", str(tmp_path / "t.safetensors"),
            "--image-size", "16", "--eval-resize", "16", "--batch-size", "3", "--shift", "--shift-max", "2",
            "--shift-samples", "1000"]
    _run([sys.executable, "-m", "gte", *args, "--json", str(tmp_path / "one.json")], tmp_path)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    _run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gte", *args, "--json", str(tmp_path / "two.json")],
         tmp_path)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert one.pop("world_size") == 1 and two.pop("world_size") == 2
    assert one["n"] == sum(sizes) and one["multilabel_n"] == sum(sizes) and one["localisation_n"] == sum(sizes)
    assert one["shift"]["n"] == sum(sizes)
    _close(one, two)
