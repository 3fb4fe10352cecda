"""gte.evaluate on tiny constructed sets with known answers: agreement, (worst-)group accuracy, Waterbirds ID/OOD,
multi-label F1/mAP, EPG/IoU through the loader (boxes follow Resize + CenterCrop)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import webdataset as wds
from PIL import Image

from gte import metrics as M
from gte.config import DataConfig
from gte.evaluate import EvalOptions, evaluate, run_eval
from gte.models import IMAGENET_MEAN, IMAGENET_STD, ModelInfo

STEP = 20  # sample i is a flat grey image of value i·STEP, so a model can tell the samples apart


def write_shards(path: Path, metas: list[dict], size: int = 8, per_shard: int = 1000,
                 labels: list[int] | None = None, image_size: tuple[int, int] | None = None) -> str:
    """Write sample i as a flat image of value i·STEP with ``cls`` and ``json`` = metas[i]; return the spec."""
    path.mkdir(parents=True, exist_ok=True)
    n, urls = len(metas), []
    for s in range(-(-n // per_shard)):
        url = str(path / f"s-{s:06d}.tar")
        urls.append(url)
        with wds.TarWriter(url) as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                Image.new("RGB", image_size or (size, size), (i * STEP,) * 3).save(buf, format="PNG")
                label = labels[i] if labels else metas[i].get("y", 0)
                sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(label).encode(),
                            "json": json.dumps(metas[i]).encode()})
    return urls[0] if len(urls) == 1 else str(path / f"s-{{000000..{len(urls) - 1:06d}}}.tar")


class Lookup(nn.Module):
    """A standard (GradCAM) "model" whose logits for sample i are ``table[i]``, decoded from the grey value."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = torch.tensor(table)
        self.feat = nn.Conv2d(3, 1, 1)  # the GradCAM layer
        self.gte_info = ModelInfo("lookup", self.table.shape[1], False, "feat")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        idx = (raw.mean(dim=(1, 2, 3)) * 255 / STEP).round().long()
        return self.table[idx] + 0 * self.feat(x).mean(dim=(1, 2, 3))[:, None]


def one_hot_logits(preds: list[int], num_classes: int) -> list[list[float]]:
    """Top-1 = the prediction; the other classes strictly ordered by index (no ties for top-k)."""
    return [[(1.0 if k == p else 0.0) - 0.01 * k for k in range(num_classes)] for p in preds]


DATA = DataConfig(image_size=8, eval_resize=8, num_workers=0)


def test_agreement_and_group_accuracy_known_answers(tmp_path):
    labels = [0, 1, 2, 0, 1, 2]
    groups = [0, 0, 0, 1, 1, 1]
    spec = write_shards(tmp_path, [{"group": g} for g in groups], labels=labels)
    student_preds, teacher_preds = [0, 1, 2, 1, 2, 2], [0, 1, 2, 0, 1, 1]
    s_table = one_hot_logits(student_preds, 6)
    s_table[5] = [5.0, 4.0, 0.0, 3.0, 2.0, 1.0]  # sample 5 (label 2): top-1 is 0 and the label is ranked last
    m = evaluate(Lookup(s_table), spec, data=DATA, teacher=Lookup(one_hot_logits(teacher_preds, 6)), batch_size=4)
    assert m["n"] == 6 and m["acc1"] == pytest.approx(3 / 6) and m["acc5"] == pytest.approx(5 / 6)
    assert m["groups"] == {"0": 1.0, "1": pytest.approx(0.0)}  # sample 4 -> 2 (label 1), sample 5 -> 0
    assert m["worst_group_acc"] == 0.0 and m["group_counts"] == {"0": 3, "1": 3}
    assert m["agreement"] == pytest.approx(3 / 6)  # [0,1,2,1,2,0] vs [0,1,2,0,1,1]
    assert m["group_agreement"] == {"0": 1.0, "1": 0.0}
    assert m["teacher"]["acc1"] == pytest.approx(5 / 6) and m["teacher"]["groups"]["1"] == pytest.approx(2 / 3)
    assert m["explainer"] == "gradcam" and m["skipped"] == 0 and "waterbirds" not in m


@pytest.mark.parametrize("flag", [None, True])
def test_waterbirds_id_ood(tmp_path, flag):
    # group = 2·y + place; OOD = landbird on water (1) and waterbird on land (2)
    ys, places = [0, 0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 0, 1, 0, 1]
    preds = [0, 1, 0, 0, 1, 1, 0, 0]  # right: 0, 2, 4, 5, 6 ; OOD samples 1, 2, 3, 4 -> 2 of 4 right
    spec = write_shards(tmp_path, [{"group": 2 * y + p} for y, p in zip(ys, places)], labels=ys)
    m = evaluate(Lookup(one_hot_logits(preds, 2)), spec, data=DATA, waterbirds=flag)
    assert m["waterbirds"] is True
    assert m["ood_acc"] == pytest.approx(2 / 4) and m["id_acc"] == pytest.approx(3 / 4)
    assert m["groups"] == {"0": 1.0, "1": 0.5, "2": 0.5, "3": 0.5}
    m2 = evaluate(Lookup(one_hot_logits(preds, 2)), spec, data=DATA, waterbirds=False)
    assert "ood_acc" not in m2


def test_multilabel_f1_map_through_evaluate(tmp_path):
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(0)
    n, c = 12, 5
    label_sets = [sorted(set(rng.choice(c, size=rng.integers(1, 3), replace=False).tolist())) for _ in range(n)]
    table = np.round(rng.normal(size=(n, c)), 2).tolist()
    spec = write_shards(tmp_path, [{"labels": ls} for ls in label_sets], labels=[ls[0] for ls in label_sets])
    m = evaluate(Lookup(table), spec, data=DATA, batch_size=5)
    targets = np.stack([M.multi_hot(ls, c) for ls in label_sets])
    scores = np.asarray(table, dtype=np.float32)
    keep = targets.sum(0) > 0
    assert m["f1"] == pytest.approx(f1_score(targets, scores > 0, average="micro"))
    assert m["map"] == pytest.approx(average_precision_score(targets[:, keep], scores[:, keep]), abs=1e-6)
    assert m["multilabel_n"] == n
    assert "ece" not in m and "reliability" not in m  # softmax confidence of a multi-label model: no ECE


def test_boxes_follow_resize_and_centre_crop(tmp_path):
    from gte.data.loader import make_loader

    # 40×20 image -> Resize(short 10) = 20×10 -> CenterCrop(8): x offset round(6) = 6, y offset 1
    spec = write_shards(tmp_path, [{"boxes": [[12, 2, 28, 18], [0, 0, 4, 4]], "box_labels": [1, 0]}],
                        image_size=(40, 20))
    batch = next(make_loader(spec, train=False, image_size=8, eval_resize=10, batch_size=1))
    assert batch["image"].shape == (1, 3, 8, 8)
    assert batch["boxes"][0][0] == pytest.approx([0.0, 0.0, 8.0, 8.0])  # [6, 1, 14, 9] - offset [6, 1, 6, 1]
    assert batch["boxes"][0][1] == pytest.approx([0.0, 0.0, 0.0, 1.0])  # [0, 0, 2, 2] - offset, clamped
    assert batch["box_labels"] == [[1, 0]] and batch["labels"] == [None]


def test_epg_iou_through_evaluate_match_direct_computation(tmp_path):
    from gte.explain import contribution_map, explain
    from gte.models import build_model, to_model_input

    torch.manual_seed(0)
    model = build_model("bcos_cifar_resnet20", 3).eval()
    boxes = [[[1, 1, 5, 6]], [[2, 0, 8, 3], [0, 5, 3, 8]], [[0, 0, 8, 8]]]
    metas = [{"boxes": b, "box_labels": [i % 3] * len(b)} for i, b in enumerate(boxes)]
    spec = write_shards(tmp_path, metas, labels=[0, 1, 2])
    out = run_eval(model, spec, data=DATA, options=EvalOptions(batch_size=2))
    images = torch.stack([torch.full((3, 8, 8), i * STEP / 255) for i in range(3)])
    x = to_model_input(model.gte_info, images)
    attr = contribution_map(x, explain(model, x, torch.tensor([0, 1, 2]), "bcos"))
    masks = [M.box_mask(b, 8, 8) for b in boxes]
    epg = np.mean([M.energy_pointing_game(a, mk) for a, mk in zip(attr, masks)])
    iou = np.mean([M.box_iou(a, mk) for a, mk in zip(attr, masks)])
    assert out.metrics["localisation_n"] == 3
    assert out.metrics["epg"] == pytest.approx(epg, abs=1e-5) and out.metrics["iou"] == pytest.approx(iou, abs=1e-6)


def test_shift_curve_and_examples(tmp_path):
    from gte.models import build_model

    torch.manual_seed(0)
    model = build_model("bcos_cifar_resnet20", 2).eval()
    spec = write_shards(tmp_path, [{"group": i % 2} for i in range(5)], size=16)
    data = DataConfig(image_size=16, eval_resize=16, num_workers=0)
    out = run_eval(model, spec, data=data, teacher=model,
                   options=EvalOptions(batch_size=2, shift=True, shift_max=3, shift_samples=3, examples=2))
    s = out.metrics["shift"]
    assert s["t"] == [0, 1, 2, 3] and s["n"] == 3 and s["student"][0] == pytest.approx(1.0)
    assert s["student"] == pytest.approx(s["teacher"])  # the same network
    assert out.metrics["explanation_similarity"] == pytest.approx(1.0) and out.metrics["agreement"] == 1.0
    assert [e.group for e in out.examples] == [0, 1] and out.examples[0].image.shape == (3, 16, 16)


def test_ece_balanced_and_worst_class_by_hand(tmp_path):
    """Two classes, logits [log p, log(1 − p)] so the top-1 softmax probability is exactly p; 15 bins of width 1/15."""
    labels = [0, 1, 1, 0, 0, 1, 1]
    preds = [0, 0, 1, 1, 0, 1, 0]
    conf = [0.9, 0.9, 0.92, 0.72, 0.62, 0.62, 0.62]
    table = [[np.log(p), np.log(1 - p)] if k == 0 else [np.log(1 - p), np.log(p)] for k, p in zip(preds, conf)]
    spec = write_shards(tmp_path, [{} for _ in labels], labels=labels)
    m = evaluate(Lookup(table), spec, data=DATA, batch_size=3)
    # bins: 0.9, 0.9, 0.92 -> (13/15, 14/15]: 3 samples, 2 right, Σconf 2.72 ; 0.72 -> (10/15, 11/15]: 1, 0 right ;
    # 0.62 ×3 -> (9/15, 10/15]: 3, 2 right, Σconf 1.86.  ECE = Σ_b |Σcorrect_b − Σconf_b| / N
    ece = (abs(2 - 2.72) + abs(0 - 0.72) + abs(2 - 1.86)) / 7
    assert m["ece"] == pytest.approx(ece, abs=1e-6)
    rel = {r["lo"]: r for r in m["reliability"] if r["count"]}
    assert len(m["reliability"]) == 15 and sorted(rel) == pytest.approx([9 / 15, 10 / 15, 13 / 15])
    top = m["reliability"][13]
    assert top["count"] == 3 and top["accuracy"] == pytest.approx(2 / 3) and top["hi"] == pytest.approx(14 / 15)
    assert top["confidence"] == pytest.approx(2.72 / 3, abs=1e-6)
    assert m["reliability"][12] == {"lo": 12 / 15, "hi": 13 / 15, "count": 0, "confidence": None, "accuracy": None}
    # class 0: samples 0, 3, 4 -> 2/3 right ; class 1: samples 1, 2, 5, 6 -> 2/4 right
    assert m["acc1"] == pytest.approx(4 / 7)
    assert m["balanced_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["worst_class_acc"] == pytest.approx(0.5) and m["worst_class"] == 1


def test_waterbirds_average_weighted_by_training_groups(tmp_path):
    """Group accuracies {1, .5, .5, .5}: weighted by the official training split (3498, 184, 56, 1057) where the
    shards record none, by the training split's groups in shards.json where they do (through the CLI)."""
    from gte.commands.eval import train_group_sizes
    from gte.data.index import update_side_index

    ys, places = [0, 0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 0, 1, 0, 1]
    preds = [0, 1, 0, 0, 1, 1, 0, 0]
    spec = write_shards(tmp_path, [{"group": 2 * y + p} for y, p in zip(ys, places)], labels=ys)
    model = Lookup(one_hot_logits(preds, 2))
    m = evaluate(model, spec, data=DATA)
    assert m["weighted_acc"] == pytest.approx((3498 * 1 + 0.5 * (184 + 56 + 1057)) / 4795)
    assert m["train_group_sizes_from"] == "waterbirds-official"
    assert train_group_sizes(spec) is None
    update_side_index(tmp_path, lambda d: d["shards"].update(
        {"train-000000.tar": {"n": 10, "groups": {"0": 6, "1": 1}},
         "train-000001.tar": {"n": 3, "groups": {"2": 1, "3": 2}}, "test-000000.tar": {"n": 8, "groups": {"1": 8}}}))
    sizes = train_group_sizes(spec)
    assert sizes == {0: 6, 1: 1, 2: 1, 3: 2}
    m = evaluate(model, spec, data=DATA, train_group_sizes=sizes)
    assert m["weighted_acc"] == pytest.approx((6 + 0.5 * 4) / 10) and m["train_group_sizes_from"] == "shards"
