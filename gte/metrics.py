"""Pure metric functions for ``gte eval`` (no I/O, no models): localisation, multi-label, shift test, groups.

Definitions follow docs/method notes (e2KD, ECCV 2024):

- **EPG** (energy pointing game): for one image and one ground-truth class, the positive attribution energy inside the
  union of that class's boxes divided by the total positive energy (0 where there is no positive energy).
- **IoU**: the positive attribution, min-max normalised per map, thresholded at ``>= 0.5``, against the box mask.
- **Box masks**: pixel ``(row r, column c)`` is inside box ``[x0, y0, x1, y1]`` (image pixels, x1/y1 exclusive) iff its
  centre ``(c + 0.5, r + 0.5)`` lies in ``[x0, x1) × [y0, y1)``; integer boxes are exactly ``mask[y0:y1, x0:x1]``.
- **Micro-F1** at logit threshold 0; **mAP**: mean over classes with at least one positive of the average precision
  ``Σ_n (R_n − R_{n−1}) P_n`` over distinct score thresholds (scikit-learn's ``average_precision_score``).
- **Shift test**: explanation of the image translated by ``t`` px right and down vs the unshifted explanation, cosine
  over the overlapping area.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

WATERBIRDS_OOD_GROUPS = (1, 2)  # group = 2·label + place: landbird-on-water (1), waterbird-on-land (2)
WATERBIRDS_ID_GROUPS = (0, 3)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-1 and top-``min(k, C)`` hits (bool N each)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return top[:, 0] == labels, (top == labels[:, None]).any(1)


def box_mask(boxes: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """Union of ``[x0, y0, x1, y1]`` boxes as an H×W bool mask (pixel-centre rule, see the module docstring)."""
    cy = torch.arange(height, dtype=torch.float64) + 0.5
    cx = torch.arange(width, dtype=torch.float64) + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        rows = (cy >= y0) & (cy < y1)
        cols = (cx >= x0) & (cx < x1)
        mask |= rows[:, None] & cols[None, :]
    return mask


def energy_pointing_game(attribution: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the positive energy of an H×W ``attribution`` inside ``mask`` (0 without positive energy)."""
    pos = attribution.double().clamp(min=0)
    total = float(pos.sum())
    return float(pos[mask].sum()) / total if total > 0 else 0.0


def box_iou(attribution: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU of the min-max-normalised positive attribution thresholded at ``threshold`` with ``mask``."""
    pos = attribution.double().clamp(min=0)
    lo, hi = float(pos.min()), float(pos.max())
    if hi <= lo:  # a constant map selects nothing
        pred = torch.zeros_like(mask)
    else:
        pred = (pos - lo) / (hi - lo) >= threshold
    union = int((pred | mask).sum())
    return int((pred & mask).sum()) / union if union else 0.0


def multi_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """A float32 multi-hot vector of ``labels``."""
    out = np.zeros(num_classes, dtype=np.float32)
    out[list(labels)] = 1.0
    return out


def multilabel_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int, int]:
    """(TP, FP, FN) of the predictions ``logits > 0`` against 0/1 ``targets`` (both N×C)."""
    pred, tgt = logits > 0, targets > 0.5
    return int((pred & tgt).sum()), int((pred & ~tgt).sum()), int((~pred & tgt).sum())


def micro_f1(tp: float, fp: float, fn: float) -> float:
    """Micro-averaged F1 from pooled counts (0 where there is nothing to count)."""
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class: ``Σ (R_n − R_{n−1}) P_n`` over distinct thresholds, ties grouped (order-independent)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(t)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over the classes (columns) that have at least one positive; NaN if none has."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def shift_images(x: torch.Tensor, t: int, fill: float = 0.0) -> torch.Tensor:
    """Translate N×C×H×W images by ``t`` px right and down; the uncovered border is ``fill``."""
    if t == 0:
        return x
    out = torch.full_like(x, fill)
    out[..., t:, t:] = x[..., : x.shape[-2] - t, : x.shape[-1] - t]
    return out


def overlap_cosine(reference: torch.Tensor, shifted: torch.Tensor, t: int) -> torch.Tensor:
    """Per-sample cosine of ``shifted`` (explanation of the image shifted by ``t``) and ``reference`` on their overlap.

    Pixel (r, c) of the original is pixel (r + t, c + t) of the shifted image, so the overlap is
    ``reference[..., :H−t, :W−t]`` against ``shifted[..., t:, t:]``.
    """
    h, w = reference.shape[-2:]
    a = reference[..., : h - t, : w - t].flatten(1).double()
    b = shifted[..., t:, t:].flatten(1).double()
    return F.cosine_similarity(a, b, dim=1)


def is_waterbirds(groups: Sequence[int], num_classes: int) -> bool:
    """Auto-detection: exactly the groups {0, 1, 2, 3} and a 2-class model (group = 2·label + place)."""
    return num_classes == 2 and set(groups) == {0, 1, 2, 3}


def pooled_accuracy(correct: dict[int, float], counts: dict[int, float], groups: Sequence[int]) -> float:
    """Sample-weighted accuracy over ``groups`` (NaN if they hold no samples)."""
    n = sum(counts.get(g, 0) for g in groups)
    return sum(correct.get(g, 0) for g in groups) / n if n else float("nan")


# Waterbirds' training split per group (group = 2·label + place), from the dataset's metadata.csv (Sagawa et al.,
# ICLR 2020): the weights of the "adjusted average accuracy" where the shards do not record their training split.
WATERBIRDS_TRAIN_GROUP_SIZES = {0: 3498, 1: 184, 2: 56, 3: 1057}
ECE_BINS = 15


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """3×``bins`` sums (count, Σ confidence, Σ correct) over equal-width confidence bins ``((k−1)/B, k/B]`` (a
    confidence of 0 falls in the first bin). Sums, so that batches and ranks add up."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    k = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = np.zeros((3, bins))
    np.add.at(out[0], k, 1.0)
    np.add.at(out[1], k, conf)
    np.add.at(out[2], k, np.asarray(correct, dtype=np.float64).reshape(-1))
    return out


def reliability(sums: np.ndarray) -> list[dict]:
    """The reliability diagram's bins from :func:`calibration_bins` sums: lo, hi, count, mean confidence, accuracy
    (confidence and accuracy None for an empty bin: JSON's null)."""
    bins = sums.shape[1]
    rows = []
    for k in range(bins):
        n = float(sums[0, k])
        rows.append({"lo": k / bins, "hi": (k + 1) / bins, "count": int(n),
                     "confidence": float(sums[1, k] / n) if n else None,
                     "accuracy": float(sums[2, k] / n) if n else None})
    return rows


def expected_calibration_error(sums: np.ndarray) -> float:
    """ECE = Σ_bins (n_b / N) · |accuracy_b − mean confidence_b| (Guo et al., ICML 2017), from
    :func:`calibration_bins` sums."""
    n = float(sums[0].sum())
    return float(np.abs(sums[2] - sums[1]).sum() / n) if n else float("nan")


def class_accuracies(correct: dict[int, float], counts: dict[int, float]) -> dict:
    """Balanced accuracy (mean recall over the classes present), the worst class and its accuracy."""
    recall = {c: correct.get(c, 0) / n for c, n in counts.items() if n}
    if not recall:
        return {}
    worst = min(sorted(recall), key=lambda c: recall[c])
    return {"balanced_acc": float(np.mean(list(recall.values()))), "worst_class_acc": recall[worst],
            "worst_class": int(worst)}


def weighted_group_accuracy(accuracy: dict[int, float], weights: dict[int, float]) -> float:
    """Group accuracies averaged with ``weights`` (Waterbirds: the training split's group sizes, so that a
    group-balanced test split is scored as if it had the training distribution); NaN if no weighted group is
    present."""
    w = {g: weights[g] for g in accuracy if weights.get(g, 0) > 0}
    total = sum(w.values())
    return sum(accuracy[g] * w[g] for g in w) / total if total else float("nan")
