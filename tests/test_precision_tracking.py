"""Mixed precision (bf16 on CPU), gradient accumulation bookkeeping and Accelerate trackers in a real run."""

from __future__ import annotations

import json

import pytest
import torch

from gte.config import from_dict
from gte.data.synthetic import write_synthetic_split
from gte.errors import GteError
from gte.models import build_model, save_model
from gte.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    spec = write_synthetic_split(root, "distill", 64, image_size=32, num_classes=4)
    teacher = root / "teacher.safetensors"
    save_model(build_model("bcos_cifar_resnet20", 4), teacher)
    return root, spec, teacher


def _recipe(root, spec, teacher, out, **run):
    return from_dict({
        "data": {"train": spec, "num_classes": 4, "image_size": 32, "eval_resize": 32, "num_workers": 0},
        "teacher": {"arch": "bcos_cifar_resnet20", "weights": str(teacher)},
        "student": {"arch": "bcos_cifar_resnet20"},
        "distill": {"method": "e2kd", "lambda_exp": 5.0},
        "optim": {"epochs": 1, "batch_size": 8, "grad_accum": 2, "warmup_epochs": 0.5},
        "run": {"out": str(root / out), "log_every": 1, **run},
    })


def test_bf16_e2kd_run_with_accumulation(setup):
    root, spec, teacher = setup
    result = train(_recipe(root, spec, teacher, "bf16", mixed_precision="bf16"))
    rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert len(rows) == 64 // (8 * 2)  # one optimiser step per 2 micro-batches
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kd"], r["exp"]])).all() for r in rows)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, fp32 master weights


def test_tensorboard_tracker_writes_events(setup):
    pytest.importorskip("tensorboardX")
    root, spec, teacher = setup
    result = train(_recipe(root, spec, teacher, "tb", trackers=["tensorboard"]))
    events = list(result.out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_unknown_tracker_is_a_clear_error(setup):
    root, spec, teacher = setup
    with pytest.raises(GteError, match="Accelerate"):
        train(_recipe(root, spec, teacher, "bad", trackers=["no-such-tracker"]))


def test_fp16_without_gpu_is_refused(setup):
    root, spec, teacher = setup
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(GteError, match="needs a GPU"):
        train(_recipe(root, spec, teacher, "fp16", mixed_precision="fp16"))
