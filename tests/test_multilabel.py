"""Multi-label distillation (VOC): the binary KD term against its formula, and a real multi-label e2KD run."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from gte.config import from_dict
from gte.losses import classification_loss, multilabel_kd_loss
from gte.models import build_model, save_model
from gte.train import train


def test_multilabel_kd_equals_binary_kl_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    for temp in (1.0, 4.0):
        ps, pt = torch.sigmoid(s.double() / temp), torch.sigmoid(t.double() / temp)
        kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
        expected = temp ** 2 * kl.sum(1).mean()
        assert torch.allclose(multilabel_kd_loss(s, t, temp).double(), expected, rtol=1e-5)
    assert multilabel_kd_loss(t, t, 2.0).abs() < 1e-6  # zero when the student equals the teacher


def test_multi_hot_labels_take_bce():
    logits = torch.randn(3, 4)
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    p = torch.sigmoid(logits)
    expected = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert torch.allclose(classification_loss(logits, target, bcos=False), expected, atol=1e-6)


def _shards(path, n=48, num_classes=5):
    rng = np.random.default_rng(0)
    spec = str(path / "ml-000000.tar")
    with wds.TarWriter(spec) as sink:
        for i in range(n):
            labels = sorted(set(rng.choice(num_classes, size=rng.integers(1, 3), replace=False).tolist()))
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(labels[0]).encode(),
                        "json": json.dumps({"labels": labels}).encode()})
    return spec


def test_multilabel_e2kd_run(tmp_path):
    spec = _shards(tmp_path)
    teacher = tmp_path / "t.safetensors"
    save_model(build_model("bcos_cifar_resnet20", 5), teacher)
    recipe = from_dict({
        "data": {"train": spec, "num_classes": 5, "image_size": 32, "eval_resize": 32, "num_workers": 0},
        "teacher": {"arch": "bcos_cifar_resnet20", "weights": str(teacher)},
        "student": {"arch": "bcos_cifar_resnet20"},
        "distill": {"method": "e2kd", "multilabel": True, "ce_weight": 1.0},
        "optim": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0.5},
        "run": {"out": str(tmp_path / "run"), "log_every": 1},
    })
    result = train(recipe)
    rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert len(rows) == 6 and all({"kd", "exp", "ce"} <= set(r) for r in rows)
    assert all(np.isfinite([r["kd"], r["exp"], r["ce"]]).all() for r in rows)
