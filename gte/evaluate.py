"""Evaluation: accuracy, agreement with a teacher, explanation similarity, per-group accuracy."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte.config import DataConfig
from gte.data.shards import make_loader
from gte.errors import GteError
from gte.explain import explain_with_logits
from gte.models import info, to_model_input


def _explainer(student: nn.Module, teacher: nn.Module) -> str:
    s, t = info(student), info(teacher)
    if s.bcos != t.bcos:
        raise GteError(f"cannot compare explanations of {t.arch} (teacher) and {s.arch} (student): "
                       "one is a B-cos network and the other is not")
    return s.explainer


@torch.no_grad()
def evaluate(
    model: nn.Module,
    spec: str,
    *,
    data: DataConfig,
    teacher: nn.Module | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict:
    """Metrics of ``model`` on the shards ``spec`` (eval transform), optionally against ``teacher``.

    Returns ``n, acc1, acc5`` and, with a teacher, ``agreement`` and ``explanation_similarity`` (mean cosine of both
    models' explanations of the teacher's top-1 class); with ``json.group`` present, ``groups`` ({group: acc}),
    ``group_agreement`` and ``worst_group_acc``.
    """
    was_training = model.training
    model.eval()
    mi = info(model)
    if teacher is not None and info(teacher).num_classes != mi.num_classes:
        raise GteError(f"teacher has {info(teacher).num_classes} classes, the model {mi.num_classes}")
    method = _explainer(model, teacher) if teacher is not None else None
    k = min(5, mi.num_classes)
    n = correct1 = correct5 = agree = 0
    cos_sum = 0.0
    g_n: dict[int, int] = defaultdict(int)
    g_correct: dict[int, int] = defaultdict(int)
    g_agree: dict[int, int] = defaultdict(int)
    loader = make_loader(spec, train=False, image_size=data.image_size, eval_resize=data.eval_resize,
                         batch_size=batch_size, num_workers=min(data.num_workers, 2))
    for batch in loader:
        images = batch["image"].to(device)
        labels = batch["label"].to(device)
        if teacher is None:
            logits = model(to_model_input(mi, images))
        else:
            t_maps, t_logits = explain_with_logits(teacher, to_model_input(info(teacher), images), None, method)
            t_top = t_logits.argmax(1)
            s_maps, logits = explain_with_logits(model, to_model_input(mi, images), t_top, method)
            cos_sum += F.cosine_similarity(s_maps.flatten(1).float(), t_maps.flatten(1).float(), dim=1).sum().item()
            agree_mask = logits.argmax(1) == t_top
            agree += int(agree_mask.sum())
        top = logits.topk(k, dim=1).indices
        hit1 = top[:, 0] == labels
        correct1 += int(hit1.sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        n += labels.numel()
        for j, g in enumerate(batch["group"].tolist()):
            if g >= 0:
                g_n[g] += 1
                g_correct[g] += int(hit1[j])
                if teacher is not None:
                    g_agree[g] += int(agree_mask[j])
    model.train(was_training)
    if n == 0:
        raise GteError(f"no samples could be read from {spec}")
    result: dict = {"n": n, "acc1": correct1 / n, "acc5": correct5 / n}  # top-min(5, C)
    if teacher is not None:
        result["agreement"] = agree / n
        result["explanation_similarity"] = cos_sum / n
    if g_n:
        result["groups"] = {str(g): g_correct[g] / g_n[g] for g in sorted(g_n)}
        result["group_counts"] = {str(g): g_n[g] for g in sorted(g_n)}
        result["worst_group_acc"] = min(result["groups"].values())
        if teacher is not None:
            result["group_agreement"] = {str(g): g_agree[g] / g_n[g] for g in sorted(g_n)}
    return result
