"""``gte compare``: several students on the same shards in one pass, grouped by method, with paired statistics.

:func:`find_runs` turns run directories / model files into :class:`Run`s and groups runs whose saved ``recipe.toml``
differ only in ``[run]`` (seed, output directory, logging) under one method label. :func:`collect` reads each batch
once and runs every model on it, keeping per-sample records (prediction, top-5 hit, softmax confidence, agreement with
the teacher, explanation cosine); :func:`record_metrics` turns one model's records into ``gte eval``'s per-sample
metrics (acc@1/5, agreement, explanation similarity, groups, worst group, Waterbirds ID/OOD/weighted, balanced and
worst-class accuracy, ECE) with the same :mod:`gte.metrics` functions; :func:`summarise` gives mean ± std over seeds
per method and, per pair of methods, :func:`gte.stats.paired_bootstrap` intervals and :func:`gte.stats.mcnemar`
tests. EPG/IoU, F1/mAP and the shift test are ``gte eval``'s alone (they are not per-sample records here).
Single-process: the records of all models for the whole test set are kept in memory (a few numbers per sample).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gte import metrics as M
from gte import stats
from gte.config import DataConfig
from gte.errors import GteError

PAIRED = ("acc1", "agreement", "explanation_similarity")  # per-sample means: bootstrap intervals of differences
TESTED = ("acc1", "agreement")  # binary per sample: McNemar
SCALARS = ("acc1", "acc5", "agreement", "explanation_similarity", "worst_group_acc", "id_acc", "ood_acc",
           "weighted_acc", "balanced_acc", "worst_class_acc", "ece")


@dataclass
class Run:
    """One student: its model file, the method label it is grouped under, and its seed (None for a bare file)."""

    path: str
    model: str
    method: str = ""
    seed: int | None = None
    recipe: dict = field(default_factory=dict)


def find_runs(paths: Sequence[str]) -> list[Run]:
    """Runs from run directories (``OUT/model.safetensors`` + ``OUT/recipe.toml``) or model files, labelled by
    method: runs whose recipes differ only in ``[run]`` share a label (``distill.method``, with the differing keys
    where two groups share a method); a model file without a recipe beside it is its own group."""
    runs = []
    for p in paths:
        path = Path(p)
        model = path / "model.safetensors" if path.is_dir() else path
        if not model.is_file():
            raise GteError(f"{p}: no model.safetensors (give a run directory of gte distill or a model file)")
        recipe_file = model.parent / "recipe.toml"
        recipe: dict = {}
        if model.name == "model.safetensors" and recipe_file.is_file():
            try:
                recipe = tomllib.loads(recipe_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
                raise GteError(f"{recipe_file}: not a readable recipe ({e})") from None
        seed = recipe.get("run", {}).get("seed") if recipe else None
        runs.append(Run(str(p), str(model), seed=seed if isinstance(seed, int) else None, recipe=recipe))
    if len(runs) < 2:
        raise GteError(f"gte compare needs at least 2 models, got {len(runs)}")
    _label(runs)
    return runs


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _label(runs: list[Run]) -> None:
    """Set each run's method label (see :func:`find_runs`)."""
    keys = {}
    for r in runs:
        flat = {k: v for k, v in _flat(r.recipe).items() if not k.startswith("run.")} if r.recipe else {"file": r.model}
        keys[id(r)] = flat
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(json.dumps(keys[id(r)], sort_keys=True, default=str), []).append(r)
    by_method: dict[str, list[str]] = {}
    for key, members in groups.items():
        r = members[0]
        base = str(r.recipe.get("distill", {}).get("method", "?")) if r.recipe else Path(r.path).name
        by_method.setdefault(base, []).append(key)
    for base, group_keys in by_method.items():
        for key in group_keys:
            flat = json.loads(key)
            differ = sorted(k for k in flat if any(json.loads(o).get(k) != flat[k] for o in group_keys if o != key))
            label = base if len(group_keys) == 1 else f"{base} ({', '.join(f'{k}={flat[k]}' for k in differ[:3])})"
            for r in groups[key]:
                r.method = label
    for members in groups.values():
        seen: dict[int | None, Run] = {}
        for r in members:
            if r.seed in seen:  # a file given twice, or a run copied: its statistics would count twice
                raise GteError(f"{seen[r.seed].path} and {r.path}: the same model" if r.seed is None else
                               f"{seen[r.seed].path} and {r.path}: two runs of method '{r.method}' with seed {r.seed}")
            seen[r.seed] = r


@dataclass
class Records:
    """Per-sample records of one pass: shared labels/groups/keys, per model (and the teacher) arrays of N."""

    labels: np.ndarray
    groups: np.ndarray
    keys: list[str]
    models: list[dict[str, np.ndarray]]  # pred, hit5, conf, and with a teacher agree, cos
    teacher: dict[str, np.ndarray] | None = None


def _cat(parts: dict[str, list]) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v) for k, v in parts.items()}


@torch.no_grad()
def collect(models: Sequence[nn.Module], spec: str, *, data: DataConfig, teacher: nn.Module | None = None,
            device: torch.device | str = "cpu", batch_size: int = 64, explainer: str = "auto") -> Records:
    """Evaluate every model on the shards ``spec`` in one pass (each batch read once); per-sample records."""
    from gte.data.loader import make_loader
    from gte.evaluate import pair_explainer
    from gte.explain import explain_with_logits
    from gte.models import at_size, info, run_size, to_model_input

    n_classes = {info(m).num_classes for m in models}
    if teacher is not None:
        n_classes.add(info(teacher).num_classes)
    if len(n_classes) > 1:
        raise GteError(f"the models have different class counts ({', '.join(map(str, sorted(n_classes)))}): "
                       "compare students of one task")
    num_classes = n_classes.pop()
    methods = [pair_explainer(m, teacher, explainer) if teacher is not None else "" for m in models]
    t_size = run_size(info(teacher), 0, data.image_size) if teacher is not None else 0
    modes = [(m, m.training) for m in (*models, teacher) if m is not None]
    for m, _ in modes:
        m.eval()
    parts: list[dict[str, list]] = [{} for _ in models]
    t_parts: dict[str, list] = {}
    labels, groups, keys = [], [], []
    loader = make_loader(spec, train=False, image_size=data.image_size, eval_resize=data.eval_resize,
                         interpolation=data.interpolation, batch_size=batch_size,
                         num_workers=min(data.num_workers, 2), world_size=1, rank=0)
    try:
        for batch in loader:
            images, y = batch["image"].to(device), batch["label"].to(device)
            if len(y) and int(y.max()) >= num_classes:
                raise GteError(f"label {int(y.max())} in {spec}, but the models have {num_classes} classes")
            labels.append(y.cpu().numpy())
            groups.append(batch["group"].cpu().numpy())
            keys += list(batch["key"])
            t_maps: dict[str, torch.Tensor] = {}
            if teacher is not None:
                x_t = to_model_input(info(teacher), images, t_size)
                for how in sorted(set(methods)):  # the teacher's maps once per explainer the students need
                    maps, t_logits = explain_with_logits(teacher, x_t, None, how)
                    t_maps[how] = at_size(maps, images.shape[-2:])
                explained = t_logits.argmax(1)
                _append(t_parts, t_logits, y)
            for i, m in enumerate(models):
                x = to_model_input(info(m), images)
                if teacher is None:
                    logits = m(x)
                else:
                    s_maps, logits = explain_with_logits(m, x, explained, methods[i])
                    cos = F.cosine_similarity(s_maps.flatten(1).float(), t_maps[methods[i]].flatten(1).float(), dim=1)
                    parts[i].setdefault("cos", []).append(cos.cpu().numpy().astype(np.float64))
                    parts[i].setdefault("agree", []).append((logits.argmax(1) == explained).cpu().numpy())
                _append(parts[i], logits, y)
    finally:
        for m, mode in modes:
            m.train(mode)
    if not labels or sum(len(x) for x in labels) == 0:
        raise GteError(f"no samples could be read from {spec}")
    return Records(np.concatenate(labels), np.concatenate(groups), keys, [_cat(p) for p in parts],
                   _cat(t_parts) if teacher is not None else None)


def _append(parts: dict[str, list], logits: torch.Tensor, labels: torch.Tensor) -> None:
    hit1, hit5 = M.topk_hits(logits, labels, 5)
    parts.setdefault("pred", []).append(logits.argmax(1).cpu().numpy())
    parts.setdefault("hit5", []).append(hit5.cpu().numpy())
    parts.setdefault("conf", []).append(logits.float().softmax(1).amax(1).cpu().numpy().astype(np.float64))


def record_metrics(rec: dict[str, np.ndarray], labels: np.ndarray, groups: np.ndarray, *, num_classes: int,
                   waterbirds: bool | None = None, train_sizes: dict[int, int] | None = None) -> dict:
    """``gte eval``'s per-sample metrics of one model from its records (see the module docstring)."""
    correct = rec["pred"] == labels
    out: dict = {"n": int(labels.size), "acc1": float(correct.mean()), "acc5": float(rec["hit5"].mean())}
    if "agree" in rec:
        out["agreement"] = float(rec["agree"].mean())
        out["explanation_similarity"] = float(rec["cos"].mean())
    present = sorted(int(g) for g in np.unique(groups) if g >= 0)
    if present:
        counts = {g: float((groups == g).sum()) for g in present}
        hits = {g: float(correct[groups == g].sum()) for g in present}
        out["groups"] = {str(g): hits[g] / counts[g] for g in present}
        out["group_counts"] = {str(g): int(counts[g]) for g in present}
        out["group_correct"] = {str(g): int(hits[g]) for g in present}
        out["worst_group_acc"] = min(out["groups"].values())
        if "agree" in rec:
            out["group_agreement"] = {str(g): float(rec["agree"][groups == g].mean()) for g in present}
        if M.is_waterbirds(present, num_classes) if waterbirds is None else waterbirds:
            out["waterbirds"] = True
            out["id_acc"] = M.pooled_accuracy(hits, counts, M.WATERBIRDS_ID_GROUPS)
            out["ood_acc"] = M.pooled_accuracy(hits, counts, M.WATERBIRDS_OOD_GROUPS)
            out["weighted_acc"] = M.weighted_group_accuracy({g: hits[g] / counts[g] for g in present},
                                                            train_sizes or M.WATERBIRDS_TRAIN_GROUP_SIZES)
    classes = np.unique(labels)
    out.update(M.class_accuracies({int(c): float(correct[labels == c].sum()) for c in classes},
                                  {int(c): float((labels == c).sum()) for c in classes}))
    cal = M.calibration_bins(rec["conf"], correct)
    out["ece"] = M.expected_calibration_error(cal)
    out["reliability"] = M.reliability(cal)
    return out


def summarise(runs: Sequence[Run], records: Records, *, num_classes: int, waterbirds: bool | None = None,
              train_sizes: dict[int, int] | None = None, reps: int = 2000, seed: int = 0) -> dict:
    """Per-run metrics, per-method mean ± std (sample std over seeds; 0 for one seed) and per pair of methods the
    paired differences with bootstrap intervals and McNemar tests (per pair of runs with the same seed, else in
    order)."""
    per_run = [record_metrics(r, records.labels, records.groups, num_classes=num_classes, waterbirds=waterbirds,
                              train_sizes=train_sizes) for r in records.models]
    methods: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        methods.setdefault(run.method, []).append(i)
    out: dict = {"n": int(records.labels.size), "methods": {}, "pairs": []}
    for name, idx in methods.items():
        rows = [per_run[i] for i in idx]
        keys = [k for k in SCALARS if all(k in r for r in rows)]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        std = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in keys}
        if all("groups" in r for r in rows):
            for g in rows[0]["groups"]:
                vals = [r["groups"][g] for r in rows]
                mean[f"group/{g}"] = float(np.mean(vals))
                std[f"group/{g}"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out["methods"][name] = {"runs": [runs[i].path for i in idx], "seeds": [runs[i].seed for i in idx],
                                "mean": mean, "std": std, "per_run": rows}
    for a, b in combinations(methods, 2):
        ia, ib = methods[a], methods[b]
        for metric in PAIRED:
            va, vb = _values(records, ia, metric), _values(records, ib, metric)
            if va is None or vb is None:
                continue
            pair = {"a": a, "b": b, "metric": metric, **stats.paired_bootstrap(va, vb, reps=reps, seed=seed)}
            if metric in TESTED:
                pair["mcnemar"] = [{"seed_a": runs[i].seed, "seed_b": runs[j].seed, **stats.mcnemar(va[k], vb[k2])}
                                   for (k, i), (k2, j) in _seed_pairs(runs, ia, ib)]
            out["pairs"].append(pair)
    return out


def _values(records: Records, idx: list[int], metric: str) -> np.ndarray | None:
    """S×N per-sample values of ``metric`` for the runs ``idx`` (None where the records lack it)."""
    rows = []
    for i in idx:
        r = records.models[i]
        if metric == "acc1":
            rows.append(r["pred"] == records.labels)
        elif metric == "agreement" and "agree" in r:
            rows.append(r["agree"])
        elif metric == "explanation_similarity" and "cos" in r:
            rows.append(r["cos"])
        else:
            return None
    return np.stack(rows).astype(np.float64)


def _seed_pairs(runs: Sequence[Run], ia: list[int], ib: list[int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((row in A, run), (row in B, run)) pairs: runs with the same seed where both have seeds, else in order."""
    seeds_b = {runs[j].seed: (k, j) for k, j in enumerate(ib) if runs[j].seed is not None}
    same = [((k, i), seeds_b[runs[i].seed]) for k, i in enumerate(ia) if runs[i].seed in seeds_b]
    return same or list(zip(enumerate(ia), enumerate(ib)))
