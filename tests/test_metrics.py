"""Metric functions with known answers: hand-made maps and boxes, and scikit-learn as the oracle for F1 / mAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gte import metrics as M


def test_box_mask_integer_boxes_are_slices_and_union():
    mask = M.box_mask([[1, 2, 4, 5], [3, 0, 6, 1]], height=6, width=7)
    ref = torch.zeros(6, 7, dtype=torch.bool)
    ref[2:5, 1:4] = True
    ref[0:1, 3:6] = True
    assert torch.equal(mask, ref)


def test_box_mask_fractional_uses_pixel_centres():
    # columns with centres 0.5 .. 3.5 in [0.4, 2.6) -> 0, 1, 2 ; rows with centres in [1.5, 1.6) -> row 1
    mask = M.box_mask([[0.4, 1.5, 2.6, 1.6]], height=3, width=4)
    assert mask.nonzero().tolist() == [[1, 0], [1, 1], [1, 2]]
    assert not M.box_mask([[2.0, 2.0, 2.0, 3.0]], 4, 4).any()  # zero width: empty


def test_epg_hand_made():
    a = torch.tensor([[4.0, 0.0, -3.0],
                      [1.0, 2.0, 0.0],
                      [0.0, 0.0, 3.0]])
    mask = M.box_mask([[0, 0, 2, 2]], 3, 3)  # top-left 2×2: 4 + 0 + 1 + 2 = 7 of positive total 10
    assert M.energy_pointing_game(a, mask) == pytest.approx(0.7)
    assert M.energy_pointing_game(-a.abs(), mask) == 0.0  # no positive energy
    assert M.energy_pointing_game(a, torch.ones(3, 3, dtype=torch.bool)) == pytest.approx(1.0)


def test_iou_hand_made():
    a = torch.tensor([[-5.0, 0.0, 0.0, 0.0],
                      [0.0, 8.0, 6.0, 0.0],
                      [0.0, 4.0, 3.9, 0.0],
                      [0.0, 0.0, 0.0, 0.0]])
    # positive part min-max normalised: 8 -> 1, 6 -> .75, 4 -> .5 (kept, >= 0.5), 3.9 -> .4875 (dropped)
    box = M.box_mask([[1, 1, 3, 3]], 4, 4)  # the 2×2 centre block
    assert M.box_iou(a, box) == pytest.approx(3 / 4)
    wide = M.box_mask([[0, 1, 4, 2]], 4, 4)  # row 1: 8, 6 in the box (+2 box-only pixels), 4 outside
    assert M.box_iou(a, wide) == pytest.approx(2 / 5)
    assert M.box_iou(torch.zeros(4, 4), box) == 0.0  # a constant map selects nothing


@pytest.mark.parametrize("seed", [0, 1])
def test_micro_f1_and_map_match_sklearn(seed):
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(seed)
    n, c = 60, 7
    targets = (rng.random((n, c)) < 0.3).astype(np.float32)
    targets[:, 5] = 0  # a class without positives is left out of the mean
    scores = np.round(rng.normal(size=(n, c)) + 1.5 * targets, 1)  # rounding makes ties
    tp, fp, fn = M.multilabel_counts(torch.from_numpy(scores), torch.from_numpy(targets))
    assert M.micro_f1(tp, fp, fn) == pytest.approx(f1_score(targets, scores > 0, average="micro"))
    keep = targets.sum(0) > 0
    ref = average_precision_score(targets[:, keep], scores[:, keep], average="macro")
    assert M.mean_average_precision(scores, targets) == pytest.approx(ref, abs=1e-12)
    for k in range(c):
        if keep[k]:
            assert M.average_precision(scores[:, k], targets[:, k]) == pytest.approx(
                average_precision_score(targets[:, k], scores[:, k]), abs=1e-12)
    perm = rng.permutation(n)  # gathering across ranks changes the order: the result must not
    assert M.mean_average_precision(scores[perm], targets[perm]) == pytest.approx(ref, abs=1e-12)
    assert np.isnan(M.average_precision(scores[:, 5], targets[:, 5]))


def test_micro_f1_edge_cases():
    assert M.micro_f1(0, 0, 0) == 0.0
    assert M.micro_f1(3, 0, 0) == 1.0
    assert M.multi_hot([0, 2], 4).tolist() == [1, 0, 1, 0]


def test_shift_and_overlap_cosine():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    s = M.shift_images(x, 2)
    assert torch.equal(s[..., 2:, 2:], x[..., :4, :4])
    assert (s[..., :2, :] == 0).all() and (s[..., :, :2] == 0).all()
    assert torch.equal(M.shift_images(x, 0), x)
    # an explainer that moves with the image gives cosine 1 on the overlap, whatever the border holds
    moved = M.shift_images(x, 2, fill=7.0)
    assert torch.allclose(M.overlap_cosine(x, moved, 2), torch.ones(2, dtype=torch.float64))
    # a hand-made pair: overlap of ref is [[1, 0]], of shifted [[0, 1]] -> orthogonal
    ref = torch.tensor([[[[1.0, 0.0, 5.0], [0.0, 0.0, 5.0], [5.0, 5.0, 5.0]]]]).reshape(1, 1, 3, 3)
    sh = torch.zeros(1, 1, 3, 3)
    sh[..., 1, 2] = 1.0
    assert M.overlap_cosine(ref, sh, 1).item() == pytest.approx(0.0)


def test_topk_hits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    h1, h5 = M.topk_hits(logits, torch.tensor([1, 2]), 5)  # k is capped at the 3 classes
    assert h1.tolist() == [True, False] and h5.tolist() == [True, True]
    h1, h2 = M.topk_hits(logits, torch.tensor([1, 2]), 2)
    assert h2.tolist() == [True, False]


def test_waterbirds_groups():
    assert M.is_waterbirds([0, 1, 2, 3], 2) and not M.is_waterbirds([0, 1], 2) and not M.is_waterbirds([0, 1, 2, 3], 4)
    counts, correct = {0: 10, 1: 2, 2: 3, 3: 5}, {0: 9, 1: 1, 2: 0, 3: 5}
    assert M.pooled_accuracy(correct, counts, M.WATERBIRDS_OOD_GROUPS) == pytest.approx(1 / 5)
    assert M.pooled_accuracy(correct, counts, M.WATERBIRDS_ID_GROUPS) == pytest.approx(14 / 15)
