"""Evaluation (``gte eval``): accuracy, teacher agreement, explanation similarity, groups, multi-label and
localisation metrics, the shift test — single-process or under torchrun (every sample counted once).

Each rank streams its part of the shards and keeps sums and counts; at the end the sums are all-reduced (float64) and
the per-sample lists mAP needs are gathered with ``all_gather_object``, so every rank returns the global metrics.
Metric definitions are in :mod:`gte.metrics`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gte import dist
from gte import metrics as M
from gte.config import DataConfig
from gte.data.loader import make_loader
from gte.errors import GteError
from gte.explain import explain, explain_with_logits
from gte.explainers import get
from gte.models import at_size, info, run_size, to_model_input


@dataclass
class EvalOptions:
    """What to compute beyond the always-on metrics."""

    batch_size: int = 64
    waterbirds: bool | None = None  # None: detect (groups {0,1,2,3} and a 2-class model)
    localisation: bool = True  # EPG / IoU where the samples have boxes
    shift: bool = False  # the architectural-prior shift test
    shift_max: int = 16
    shift_samples: int = 256  # samples per run used by the shift test (split evenly over ranks)
    examples: int = 0  # images kept (rank 0) for the report grid
    train_group_sizes: dict[int, int] | None = None  # Waterbirds' weighted average (None: the official split's)
    teacher_size: int = 0  # the side the teacher sees each image at (0: the eval size, or its fixed size)
    explainer: str = "auto"  # how both models' explanations are compared (auto: see pair_explainer)
    shortcuts: tuple = ()  # gte.shortcuts.Shortcut tests (gte.shortcut_eval)
    shortcut_samples: int = 0  # samples per run the shortcut tests use (split evenly over ranks); 0: all


@dataclass
class Example:
    """One test image kept for the report's grid."""

    key: str
    image: torch.Tensor  # 3×H×W in [0, 1], as the models saw it
    label: int
    group: int


@dataclass
class EvalOutput:
    """The JSON-able metrics and the images kept for the report."""

    metrics: dict
    examples: list[Example] = field(default_factory=list)


def unrelated_labels(data_names: list[str] | None, models: Sequence[nn.Module | None]) -> str:
    """Why the data's labels do not index the models' classes ("" when they do, or when it cannot be told): the
    data's ``classes.json`` against the first model that knows its class names. Photos sorted into folders of one's
    own (``gte data shard imagefolder``) under an ImageNet teacher are the case: label 0 is the first folder, not
    'tench', so accuracy compares unrelated indices and agreement with the teacher is the measure."""
    for m in models:
        names = info(m).class_names if m is not None else ()
        if data_names and names:
            if len(data_names) <= len(names) and all(a == b for a, b in zip(data_names, names)):
                return ""
            return (f"the data's classes ({_few(data_names)}) are not the model's ({_few(names)}): its labels do not "
                    "index the model's classes, so accuracy is not meaningful; agreement with the teacher is")
    return ""


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f", … {len(names)} in all" if len(names) > 3 else "")


def pair_explainer(student: nn.Module, teacher: nn.Module, name: str = "auto") -> str:
    """The explainer both models are compared with: ``name``; for ``"auto"`` the one the student was trained with (its
    spec's ``trained_explainer``), else the one a ``gte distill`` run of this pair uses by default
    (:func:`gte.explainers.choose_explainer`: the student's own) where the teacher has it too, else GradCAM, which
    every model with a spatial map has — so any pair training accepts, evaluation accepts."""
    from gte.explainers import EXPLAINERS, choose_explainer

    s, t = info(student), info(teacher)
    if name != "auto" and name not in EXPLAINERS:
        raise GteError(f"unknown explainer '{name}' (known: auto, {', '.join(EXPLAINERS)})")
    chosen = s.trained_explainer if name == "auto" and s.trained_explainer else choose_explainer(name, s.bcos)
    if chosen != name and get(chosen).needs_bcos and not t.bcos:  # auto: W(x) needs a B-cos teacher as well
        chosen = "gradcam"
    for role, mi, model in (("student", s, student), ("teacher", t, teacher)):
        if get(chosen).needs_bcos and not mi.bcos:
            raise GteError(f"explainer '{chosen}' explains B-cos networks, the {role} {mi.arch} is not one "
                           "(use gradcam)")
        get(chosen).check(model)
    return chosen


# --------------------------------------------------------------------------------------------- per batch
def _class_stats(sums: dict[str, float], p: str, logits: torch.Tensor, labels: torch.Tensor, groups: list[int]) -> None:
    hit1, hit5 = M.topk_hits(logits, labels, 5)
    sums[f"{p}/correct1"] += int(hit1.sum())
    sums[f"{p}/correct5"] += int(hit5.sum())
    for j, g in enumerate(groups):
        if g >= 0:
            sums[f"{p}/g/{g}/correct"] += int(hit1[j])
    for c, h in zip(labels.tolist(), hit1.tolist()):  # per-class recall: balanced and worst-class accuracy
        sums[f"{p}/c/{c}/n"] += 1
        sums[f"{p}/c/{c}/correct"] += int(h)
    confidence = logits.float().softmax(1).amax(1).cpu().numpy()
    for (row, k), v in np.ndenumerate(M.calibration_bins(confidence, hit1.cpu().numpy())):
        sums[f"{p}/cal/{row}/{k}"] += float(v)


def _attribution(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """N×H×W map for EPG/IoU: Σ x·W(x) (B-cos) or the GradCAM map."""
    method = info(model).explainer
    return get(method).attribution(x, explain(model, x, classes, method))


def _box_pairs(batch: dict) -> list[tuple[int, int, list]]:
    """(sample index, ground-truth class, that class's boxes) for every sample with boxes."""
    pairs = []
    all_box_labels = batch.get("box_labels") or []
    for i, boxes in enumerate(batch.get("boxes") or []):
        if not boxes:
            continue
        box_labels = all_box_labels[i] if i < len(all_box_labels) and all_box_labels[i] else None
        box_labels = box_labels or [int(batch["label"][i])] * len(boxes)  # no box_labels: boxes of the cls label
        for c in sorted(set(box_labels)):
            pairs.append((i, int(c), [b for b, bl in zip(boxes, box_labels) if bl == c]))
    return pairs


def _localisation(sums: dict[str, float], p: str, model: nn.Module, x: torch.Tensor, pairs: list,
                  size: tuple[int, int] | None = None) -> None:
    idx = torch.tensor([i for i, _, _ in pairs], device=x.device)
    classes = torch.tensor([c for _, c, _ in pairs], device=x.device)
    attr = _attribution(model, x[idx], classes).float().cpu()
    if size is not None:  # a teacher run at its own side: the boxes are in the images' pixels
        attr = at_size(attr[:, None], size)[:, 0]
    h, w = attr.shape[-2:]
    for a, (_, _, boxes) in zip(attr, pairs):
        mask = M.box_mask(boxes, h, w)
        if mask.any():  # a box cropped away by the centre crop says nothing about this image
            sums[f"{p}/epg"] += M.energy_pointing_game(a, mask)
            sums[f"{p}/iou"] += M.box_iou(a, mask)
            sums[f"{p}/loc_n"] += 1


def _shift(sums: dict[str, float], p: str, model: nn.Module, images: torch.Tensor, classes: torch.Tensor,
           shift_max: int) -> None:
    mi = info(model)
    ref = explain(model, to_model_input(mi, images), classes, mi.explainer)
    for t in range(shift_max + 1):
        moved = ref if t == 0 else explain(model, to_model_input(mi, M.shift_images(images, t)), classes, mi.explainer)
        sums[f"{p}/shift/{t}"] += float(M.overlap_cosine(ref, moved, t).sum())


# --------------------------------------------------------------------------------------------- main loop
@torch.no_grad()
def run_eval(model: nn.Module, spec: str, *, data: DataConfig, teacher: nn.Module | None = None,
             device: torch.device | str = "cpu", options: EvalOptions | None = None) -> EvalOutput:
    """Evaluate ``model`` (and ``teacher``) on the shards ``spec`` with the eval transform; see :func:`evaluate`."""
    o = options or EvalOptions()
    rank, world = dist.group_rank_world()
    modes = [(m, m.training) for m in (model, teacher) if m is not None]
    for m, _ in modes:  # a teacher in train mode would normalise with each batch's statistics
        m.eval()
    mi = info(model)
    if teacher is not None and info(teacher).num_classes != mi.num_classes:
        raise GteError(f"teacher has {info(teacher).num_classes} classes, the model {mi.num_classes}")
    method = pair_explainer(model, teacher, o.explainer) if teacher is not None else mi.explainer
    teacher_size = run_size(info(teacher), o.teacher_size, data.image_size) if teacher is not None else 0
    sums: dict[str, float] = defaultdict(float)
    ml: dict[str, list[np.ndarray]] = defaultdict(list)  # multi-label scores/targets for mAP
    kept: dict[int, list[Example]] = defaultdict(list)
    shift_left = -(-o.shift_samples // world) if o.shift else 0
    shortcut_left = -(-o.shortcut_samples // world) if o.shortcut_samples else -1  # -1: every sample
    loader = make_loader(spec, train=False, image_size=data.image_size, eval_resize=data.eval_resize,
                         interpolation=data.interpolation, reduced_decode=data.reduced_decode,
                         decode_margin=data.decode_margin,
                         batch_size=o.batch_size, num_workers=min(data.num_workers, 2), world_size=world, rank=rank)
    try:
        for batch in loader:
            sums["skipped"] += int(batch.get("skipped", 0))  # reported by loaders that count unreadable samples
            images, labels = batch["image"].to(device), batch["label"].to(device)
            if len(labels) and int(labels.max()) >= mi.num_classes:  # would be counted as wrong, silently
                raise GteError(f"label {int(labels.max())} in {spec}, but the model has {mi.num_classes} classes")
            groups = [int(g) for g in batch["group"].tolist()]
            x_s = to_model_input(mi, images)
            runs = [("s", model, x_s)]
            if teacher is None:
                logits = model(x_s)
                explained = logits.argmax(1)
            else:
                x_t = to_model_input(info(teacher), images, teacher_size)
                runs.append(("t", teacher, x_t))
                t_maps, t_logits = explain_with_logits(teacher, x_t, None, method)
                t_maps = at_size(t_maps, images.shape[-2:])  # the teacher saw its own side: its map at the student's
                explained = t_logits.argmax(1)
                s_maps, logits = explain_with_logits(model, x_s, explained, method)
                cos = F.cosine_similarity(s_maps.flatten(1).float(), t_maps.flatten(1).float(), dim=1)
                sums["cos"] += cos.sum().item()
                agree = logits.argmax(1) == explained
                sums["agree"] += int(agree.sum())
                _class_stats(sums, "t", t_logits, labels, groups)
                for j, g in enumerate(groups):
                    if g >= 0:
                        sums[f"g/{g}/agree"] += int(agree[j])
            sums["n"] += labels.numel()
            _class_stats(sums, "s", logits, labels, groups)
            for g in groups:
                if g >= 0:
                    sums[f"g/{g}/n"] += 1

            multi = [i for i, lab in enumerate(batch.get("labels") or []) if lab is not None]
            if multi:
                top = max((max(batch["labels"][i], default=0) for i in multi), default=0)
                if top >= mi.num_classes:
                    raise GteError(f"json.labels has class {top} in {spec}, but the model has {mi.num_classes} classes")
                targets = torch.from_numpy(np.stack([M.multi_hot(batch["labels"][i], mi.num_classes) for i in multi]))
                sums["ml_n"] += len(multi)
                for p, lg in (("s", logits), ("t", t_logits if teacher is not None else None)):
                    if lg is not None:
                        scores = lg[multi].float().cpu()
                        for name, v in zip(("tp", "fp", "fn"), M.multilabel_counts(scores, targets)):
                            sums[f"{p}/{name}"] += v
                        ml[p].append(scores.numpy())
                ml["targets"].append(targets.numpy())

            pairs = _box_pairs(batch) if o.localisation else []
            if pairs:
                for p, m, x in runs:
                    _localisation(sums, p, m, x, pairs, tuple(images.shape[-2:]))

            if shift_left > 0:
                k = min(shift_left, labels.numel())
                shift_left -= k
                sums["shift_n"] += k
                for p, m, _ in runs:
                    _shift(sums, p, m, images[:k], explained[:k], o.shift_max)

            if o.shortcuts and shortcut_left:
                from gte.shortcut_eval import shortcut_batch

                k = labels.numel() if shortcut_left < 0 else min(shortcut_left, labels.numel())
                shortcut_left = shortcut_left - k if shortcut_left > 0 else -1
                shortcut_batch(sums, o.shortcuts, [(p, m, teacher_size if p == "t" else 0) for p, m, _ in runs],
                               images[:k], batch, labels[:k], explained[:k], method)

            if rank == 0 and o.examples:
                for j, g in enumerate(groups):
                    if len(kept[g]) < o.examples:
                        kept[g].append(Example(batch["key"][j], batch["image"][j].clone(), int(labels[j]), g))
    finally:
        for m, mode in modes:
            m.train(mode)

    total = dist.reduce_sums(sums)
    if total.get("n", 0) == 0:
        raise GteError(f"no samples could be read from {spec}")
    scores = {p: np.concatenate([a for part in dist.gather_object(ml.get(p, [])) for a in part] or [np.zeros((0, 1))])
              for p in ("s", "t", "targets")} if total.get("ml_n") else {}
    metrics = _finalise(total, scores, teacher is not None, mi.num_classes, o)
    if o.shortcuts:
        from gte.shortcut_eval import shortcut_metrics

        metrics["shortcuts"] = shortcut_metrics(total, o.shortcuts, teacher is not None, mi.num_classes, spec)
    if teacher_size:
        metrics["teacher_image_size"] = teacher_size
    metrics["explainer"] = method
    metrics["world_size"] = world
    examples = [e for row in _round_robin(kept) for e in row][: o.examples]
    return EvalOutput(metrics, examples)


def _round_robin(kept: dict[int, list[Example]]) -> list[list[Example]]:
    """Interleave the kept images group by group, so the grid shows every group."""
    lists = [kept[g] for g in sorted(kept)]
    return [[lst[i] for lst in lists if i < len(lst)] for i in range(max((len(x) for x in lists), default=0))]


def _model_metrics(t: dict[str, float], p: str, scores: dict, groups: list[int], waterbirds: bool,
                   train_sizes: dict[int, int]) -> dict:
    """Metrics of one model (prefix ``p``: "s" student, "t" teacher) from the reduced sums."""
    n = t["n"]
    out: dict = {"acc1": t.get(f"{p}/correct1", 0) / n, "acc5": t.get(f"{p}/correct5", 0) / n}
    classes = sorted(int(k.split("/")[2]) for k in t if k.startswith(f"{p}/c/") and k.endswith("/n"))
    out.update(M.class_accuracies({c: t.get(f"{p}/c/{c}/correct", 0) for c in classes},
                                  {c: t[f"{p}/c/{c}/n"] for c in classes}))
    if not t.get("ml_n"):  # softmax confidence means nothing for a multi-label (sigmoid) model: no ECE there
        cal = np.array([[t.get(f"{p}/cal/{r}/{k}", 0.0) for k in range(M.ECE_BINS)] for r in range(3)])
        out["ece"] = M.expected_calibration_error(cal)
        out["reliability"] = M.reliability(cal)
    if groups:
        counts = {g: t[f"g/{g}/n"] for g in groups}
        correct = {g: t.get(f"{p}/g/{g}/correct", 0) for g in groups}
        out["groups"] = {str(g): correct[g] / counts[g] for g in groups}
        out["group_counts"] = {str(g): int(counts[g]) for g in groups}
        out["worst_group_acc"] = min(out["groups"].values())
        if waterbirds:
            out["id_acc"] = M.pooled_accuracy(correct, counts, M.WATERBIRDS_ID_GROUPS)
            out["ood_acc"] = M.pooled_accuracy(correct, counts, M.WATERBIRDS_OOD_GROUPS)
            out["weighted_acc"] = M.weighted_group_accuracy({g: correct[g] / counts[g] for g in groups}, train_sizes)
    if t.get("ml_n"):
        out["f1"] = M.micro_f1(t.get(f"{p}/tp", 0), t.get(f"{p}/fp", 0), t.get(f"{p}/fn", 0))
        out["map"] = M.mean_average_precision(scores[p], scores["targets"])
        out["multilabel_n"] = int(t["ml_n"])
    if t.get(f"{p}/loc_n"):
        out["epg"] = t[f"{p}/epg"] / t[f"{p}/loc_n"]
        out["iou"] = t[f"{p}/iou"] / t[f"{p}/loc_n"]
        out["localisation_n"] = int(t[f"{p}/loc_n"])
    return out


def _finalise(t: dict[str, float], scores: dict, has_teacher: bool, num_classes: int, o: EvalOptions) -> dict:
    n = t["n"]
    groups = sorted(int(k.split("/")[1]) for k in t if k.startswith("g/") and k.endswith("/n"))
    waterbirds = M.is_waterbirds(groups, num_classes) if o.waterbirds is None else o.waterbirds
    if waterbirds and not set(M.WATERBIRDS_OOD_GROUPS) <= set(groups):
        raise GteError("--waterbirds needs json.group = 2·label + place with groups 1 and 2 present")
    train_sizes = o.train_group_sizes or M.WATERBIRDS_TRAIN_GROUP_SIZES
    student = _model_metrics(t, "s", scores, groups, waterbirds, train_sizes)
    out: dict = {"n": int(n), "acc1": student.pop("acc1"), "acc5": student.pop("acc5")}
    if has_teacher:
        out["agreement"] = t.get("agree", 0) / n
        out["explanation_similarity"] = t.get("cos", 0) / n
    if groups:
        out["groups"] = student.pop("groups")
        out["group_counts"] = student.pop("group_counts")
        out["worst_group_acc"] = student.pop("worst_group_acc")
        if has_teacher:
            out["group_agreement"] = {str(g): t.get(f"g/{g}/agree", 0) / t[f"g/{g}/n"] for g in groups}
        if waterbirds:
            out["waterbirds"] = True
            out["train_group_sizes"] = {str(g): int(v) for g, v in sorted(train_sizes.items())}
            out["train_group_sizes_from"] = "shards" if o.train_group_sizes else "waterbirds-official"
            if has_teacher:
                for name, gs in (("id", M.WATERBIRDS_ID_GROUPS), ("ood", M.WATERBIRDS_OOD_GROUPS)):
                    agree = {g: t.get(f"g/{g}/agree", 0) for g in groups}
                    out[f"{name}_agreement"] = M.pooled_accuracy(agree, {g: t[f"g/{g}/n"] for g in groups}, gs)
    out.update(student)
    if t.get("shift_n"):
        ts = list(range(o.shift_max + 1))
        out["shift"] = {"t": ts, "n": int(t["shift_n"]),
                        "student": [t[f"s/shift/{k}"] / t["shift_n"] for k in ts]}
        if has_teacher:
            out["shift"]["teacher"] = [t[f"t/shift/{k}"] / t["shift_n"] for k in ts]
    out["skipped"] = int(t.get("skipped", 0))
    if has_teacher:
        out["teacher"] = _model_metrics(t, "t", scores, groups, waterbirds, train_sizes)
    return out


def evaluate(model: nn.Module, spec: str, *, data: DataConfig, teacher: nn.Module | None = None,
             batch_size: int = 64, device: torch.device | str = "cpu", **options: object) -> dict:
    """Metrics of ``model`` on the shards ``spec`` (eval transform), optionally against ``teacher``.

    Always ``n, acc1, acc5`` (top-min(5, C)) and ``skipped``. With a teacher: ``agreement`` (top-1), and
    ``explanation_similarity`` (mean cosine of both models' explanations of the teacher's top-1 class, B-cos W(x) or
    GradCAM), and a ``teacher`` dict with the teacher's own metrics. With ``json.group``: ``groups`` ({group: acc}),
    ``group_counts``, ``worst_group_acc``, ``group_agreement``; for Waterbirds (see :class:`EvalOptions`) ``id_acc``,
    ``ood_acc`` (OOD = groups 1 and 2), ``weighted_acc`` (group accuracies weighted by the training split's group
    sizes, ``train_group_sizes``). Always ``balanced_acc`` (mean per-class recall), ``worst_class_acc`` and
    ``worst_class``; except on multi-label data ``ece`` (15 equal-width bins of the top-1 softmax probability) and
    ``reliability`` (per bin: lo, hi, count, confidence, accuracy). With ``json.labels``: ``f1`` (micro, logit > 0), ``map``. With
    ``json.boxes``: ``epg``, ``iou``. With ``shift=True``: ``shift`` ({t, student, teacher}). ``options`` are
    :class:`EvalOptions` fields. Under torch.distributed every rank must call this; all get the global result.
    """
    opts = EvalOptions(batch_size=batch_size, **options)  # type: ignore[arg-type]
    return run_eval(model, spec, data=data, teacher=teacher, device=device, options=opts).metrics
