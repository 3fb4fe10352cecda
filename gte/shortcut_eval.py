"""The shortcut tests of ``gte eval --shortcut``: per batch sums (:func:`shortcut_batch`) and the metrics from the
reduced sums (:func:`shortcut_metrics`). The transforms are in :mod:`gte.shortcuts`.

Per test and model, over the samples the transform applied to: accuracy on the clean and on the shifted images and
the change; with a teacher, top-1 agreement on both; ``explanation_cosine``, the mean per-sample cosine between the
explanation of the clean and of the shifted image (both of the same class: the teacher's top-1 on the clean image
where there is a teacher, else the model's own); ``pattern_share``, the mean share of the positive attribution of the
shifted image's explanation that lies on the inserted region (the energy pointing game's ratio, with the region as
the box), next to ``pattern_area``, the region's share of the image (what attribution spread evenly would give). On
1000-class models, how often ImageNet's "carton" (478) is predicted, clean and shifted (ImageNet-W's score).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte import metrics as M
from gte.errors import GteError
from gte.explain import explain_with_logits
from gte.explainers import get
from gte.models import at_size, info, to_model_input
from gte.shortcuts import CARTON, Shortcut

Run = tuple[str, nn.Module, int]  # (prefix "s" | "t", model, the side it sees images at; 0 = as they are)


def _explained(model: nn.Module, images: torch.Tensor, size: int, classes: torch.Tensor,
               method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps at the images' size, attribution N×H×W at the images' size, logits) of ``classes``."""
    x = to_model_input(info(model), images, size)
    maps, logits = explain_with_logits(model, x, classes, method)
    attr = get(method).attribution(x, maps).float()
    hw = tuple(images.shape[-2:])
    return at_size(maps, hw).float(), at_size(attr[:, None], hw)[:, 0], logits


def shortcut_batch(sums: dict[str, float], shortcuts: Sequence[Shortcut], runs: Sequence[Run], images: torch.Tensor,
                   batch: dict, labels: torch.Tensor, classes: torch.Tensor, method: str) -> None:
    """Add one batch's sums for every shortcut test (keys ``sc/<label>/…``); ``images`` may be the batch's first
    samples only."""
    n = len(images)
    keys, boxes = batch["key"][:n], (batch.get("boxes") or [])[:n]
    clean = {p: _explained(m, images, size, classes, method) for p, m, size in runs}
    for sc in shortcuts:
        shifted = sc(images, keys, boxes)
        used = shifted.used
        k = f"sc/{sc.label}"
        sums[f"{k}/n"] += int(used.sum())
        sums[f"{k}/skipped"] += int((~used).sum())
        sums[f"{k}/boxed"] += sum(1 for b in boxes if b)
        if not used.any():
            continue
        mask = shifted.mask[used]
        sums[f"{k}/area"] += float(mask.flatten(1).float().mean(1).sum())
        preds = {}
        for p, m, size in runs:
            maps_c, _, logits_c = clean[p]
            maps, attr, logits = _explained(m, shifted.images[used], size, classes[used], method)
            before, after = logits_c[used].argmax(1), logits.argmax(1)
            preds[p] = (before, after)
            sums[f"{k}/{p}/correct_clean"] += int((before == labels[used]).sum())
            sums[f"{k}/{p}/correct_shifted"] += int((after == labels[used]).sum())
            cos = F.cosine_similarity(maps_c[used].flatten(1), maps.flatten(1), dim=1)
            sums[f"{k}/{p}/cos"] += float(cos.sum())
            sums[f"{k}/{p}/share"] += sum(M.energy_pointing_game(a, r) for a, r in zip(attr.cpu(), mask.cpu()))
            if info(m).num_classes == 1000:
                sums[f"{k}/{p}/carton_clean"] += int((before == CARTON).sum())
                sums[f"{k}/{p}/carton_shifted"] += int((after == CARTON).sum())
        if "t" in preds:
            (s0, s1), (t0, t1) = preds["s"], preds["t"]
            sums[f"{k}/agree_clean"] += int((s0 == t0).sum())
            sums[f"{k}/agree_shifted"] += int((s1 == t1).sum())


def _model(t: dict[str, float], k: str, p: str, n: float, imagenet: bool) -> dict:
    clean, shifted = t.get(f"{k}/{p}/correct_clean", 0) / n, t.get(f"{k}/{p}/correct_shifted", 0) / n
    out = {"acc_clean": clean, "acc_shifted": shifted, "acc_change": shifted - clean,
           "explanation_cosine": t.get(f"{k}/{p}/cos", 0) / n, "pattern_share": t.get(f"{k}/{p}/share", 0) / n}
    if imagenet:
        out["carton_clean"] = t.get(f"{k}/{p}/carton_clean", 0) / n
        out["carton_shifted"] = t.get(f"{k}/{p}/carton_shifted", 0) / n
    return out


def shortcut_metrics(t: dict[str, float], shortcuts: Sequence[Shortcut], has_teacher: bool, num_classes: int,
                     spec: str) -> dict:
    """``{label: {name, options, seed, n, skipped, pattern_area, student: {…}, teacher: {…}, agreement_…}}`` from
    the reduced sums; ``background`` on data without boxes is a one-line error."""
    out = {}
    for sc in shortcuts:
        k = f"sc/{sc.label}"
        n = t.get(f"{k}/n", 0)
        if not n:
            why = "no sample was read"
            if sc.name == "background" and t.get(f"{k}/boxed"):
                why = (f"{int(t[f'{k}/boxed'])} samples have json.boxes but none found a partner: each object goes "
                       "on the background of another sample with boxes in its batch (--batch-size 2 or more)")
            elif sc.name == "background":
                why = "no sample has json.boxes (it puts each object, inside its boxes, on another sample's background)"
            raise GteError(f"--shortcut {sc.label}: {why} in {spec}; {int(t.get(f'{k}/skipped', 0))} samples skipped")
        r: dict = {"name": sc.name, "options": dict(sc.options), "seed": sc.seed, "n": int(n),
                   "skipped": int(t.get(f"{k}/skipped", 0)), "pattern_area": t.get(f"{k}/area", 0) / n,
                   "student": _model(t, k, "s", n, num_classes == 1000)}
        if has_teacher:
            r["teacher"] = _model(t, k, "t", n, num_classes == 1000)
            r["agreement_clean"] = t.get(f"{k}/agree_clean", 0) / n
            r["agreement_shifted"] = t.get(f"{k}/agree_shifted", 0) / n
            r["agreement_change"] = r["agreement_shifted"] - r["agreement_clean"]
        if sc.name == "background":  # ImageNet-9's background gap: clean − mixed-rand accuracy
            for role in ("student", "teacher"):
                if role in r:
                    r[role]["background_gap"] = -r[role]["acc_change"]
        out[sc.label] = r
    return out
