"""gte.losses against the formulas written out; AGC against the bcos package's own; the LR schedule's values."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gte.losses import classification_loss, explanation_loss, kd_loss, log_norm_gap
from gte.optim import adaptive_clip_grad_, warmup_cosine


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ KD
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_is_t2_kl_teacher_to_student(T):
    s = torch.randn(5, 7, generator=gen(0), dtype=torch.float64) * 3
    t = torch.randn(5, 7, generator=gen(1), dtype=torch.float64) * 3
    expected = 0.0
    for i in range(5):
        zs = [v / T for v in s[i].tolist()]
        zt = [v / T for v in t[i].tolist()]
        lse_s = math.log(sum(math.exp(v) for v in zs))
        lse_t = math.log(sum(math.exp(v) for v in zt))
        for c in range(7):
            log_ps, log_pt = zs[c] - lse_s, zt[c] - lse_t
            expected += math.exp(log_pt) * (log_pt - log_ps)
    expected = expected / 5 * T * T
    got = kd_loss(s.float(), t.float(), T)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Direction: KL(p_T || p_S), not the reverse (which differs for these logits).
    assert kd_loss(t.float(), s.float(), T).item() != pytest.approx(expected, rel=1e-3)
    assert kd_loss(s.float(), s.float(), T).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_reaches_student_only():
    s = torch.randn(4, 5, generator=gen(2), requires_grad=True)
    t = torch.randn(4, 5, generator=gen(3), requires_grad=True)
    kd_loss(s, t.detach(), 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    # d/ds of T²·KL = T · (p_S − p_T) / N
    expected = 2.0 * (torch.softmax(s.detach() / 2, 1) - torch.softmax(t.detach() / 2, 1)) / 4
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ explanation
def test_explanation_loss_is_mean_one_minus_cosine():
    a = torch.randn(3, 6, 5, 5, generator=gen(4), dtype=torch.float64)
    b = torch.randn(3, 6, 5, 5, generator=gen(5), dtype=torch.float64)
    expected = 0.0
    for i in range(3):
        x, y = a[i].flatten().tolist(), b[i].flatten().tolist()
        dot = sum(p * q for p, q in zip(x, y))
        nx, ny = math.sqrt(sum(p * p for p in x)), math.sqrt(sum(q * q for q in y))
        expected += 1.0 - dot / (nx * ny)
    expected /= 3
    assert explanation_loss(a.float(), b.float()).item() == pytest.approx(expected, rel=1e-5)
    # Per sample, over the whole flattened map (not per channel or per pixel): scale of one sample is irrelevant.
    a2 = a.clone()
    a2[0] *= 1000.0
    assert explanation_loss(a2.float(), b.float()).item() == pytest.approx(expected, rel=1e-5)
    assert explanation_loss(a.float(), a.float()).item() == pytest.approx(0.0, abs=1e-6)
    assert explanation_loss(a.float(), -a.float()).item() == pytest.approx(2.0, abs=1e-6)


def test_explanation_loss_zero_map_is_finite():
    # A positive GradCAM can be all zero; the loss must stay finite (cosine taken as 0).
    z = torch.zeros(2, 1, 4, 4)
    t = torch.rand(2, 1, 4, 4, generator=gen(6))
    assert explanation_loss(z, t).item() == pytest.approx(1.0)


def test_log_norm_gap_is_squared_log_ratio_of_map_norms():
    s = torch.randn(3, 6, 4, 4, generator=gen(9), dtype=torch.float64)
    t = torch.randn(3, 6, 4, 4, generator=gen(10), dtype=torch.float64)
    want = sum(math.log(s[i].norm().item() / t[i].norm().item()) ** 2 for i in range(3)) / 3
    assert log_norm_gap(s, t).item() == pytest.approx(want, rel=1e-12)
    assert log_norm_gap(3.0 * t, t).item() == pytest.approx(math.log(3.0) ** 2, rel=1e-12)
    assert log_norm_gap(3.0 * t, t).item() > 0 and explanation_loss(3.0 * t, t).item() < 1e-12  # what cos ignores


# ------------------------------------------------------------------------------------------------ labels
def test_classification_loss_bcos_is_bce_with_uniform_off_labels_mean_over_nc():
    """The official B-cos label loss: BCE-with-logits against one-hot targets clamped below at 1/C."""
    from bcos.modules.losses import UniformOffLabelsBCEWithLogitsLoss

    logits = torch.randn(4, 5, generator=gen(7), dtype=torch.float64) * 2
    labels = torch.tensor([0, 3, 4, 3])
    total = 0.0
    for i in range(4):
        for c in range(5):
            z = logits[i, c].item()
            y = 1.0 if labels[i].item() == c else 1.0 / 5
            sig = 1.0 / (1.0 + math.exp(-z))
            total += -(y * math.log(sig) + (1 - y) * math.log(1 - sig))
    expected = total / (4 * 5)
    assert classification_loss(logits, labels, bcos=True).item() == pytest.approx(expected, rel=1e-12)
    assert classification_loss(logits.float(), labels, bcos=True).item() == pytest.approx(expected, rel=1e-5)
    oracle = UniformOffLabelsBCEWithLogitsLoss()(logits, labels)  # the bcos package's own class
    assert classification_loss(logits, labels, bcos=True).item() == pytest.approx(oracle.item(), rel=1e-12)


def test_classification_loss_standard_is_cross_entropy():
    logits = torch.randn(4, 5, generator=gen(8), dtype=torch.float64) * 2
    labels = torch.tensor([1, 1, 0, 4])
    expected = 0.0
    for i in range(4):
        row = logits[i].tolist()
        lse = math.log(sum(math.exp(v) for v in row))
        expected += -(row[labels[i].item()] - lse)
    expected /= 4
    assert classification_loss(logits.float(), labels, bcos=False).item() == pytest.approx(expected, rel=1e-5)
    assert classification_loss(logits.float(), labels, bcos=True).item() != pytest.approx(expected, rel=1e-2)


# ------------------------------------------------------------------------------------------------ AGC
def _bcos_agc():
    """bcos.training.agc without importing bcos.training (whose __init__ pulls in pytorch_lightning)."""
    import bcos

    path = Path(bcos.__file__).parent / "training" / "agc.py"
    spec = importlib.util.spec_from_file_location("_bcos_agc_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.head = nn.Linear(8, 1)  # (1, 8): squeezes to 1-d, clipped as a whole
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)  # (8, 1, 3, 3)
        self.tok = nn.Parameter(torch.randn(4, 3, 5))  # 3-d (e.g. ViT tokens): per row of dim 1 in bcos
        self.unused = nn.Linear(2, 2)  # grad stays None


@pytest.mark.parametrize("clip_factor", [0.01, 0.1])
def test_adaptive_clip_grad_matches_bcos(clip_factor):
    reference = _bcos_agc().adaptive_clip_grad_
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
    g = gen(11)
    for name, p in model.named_parameters():
        if name.startswith("unused"):
            continue
        grad = torch.randn(p.shape, generator=g) * 10
        # Some units get tiny gradients so that both branches (clipped and untouched) occur.
        if p.ndim >= 2 and p.shape[0] > 1:
            grad[0] *= 1e-6
        p.grad = grad
    other = copy.deepcopy(model)  # deepcopy does not copy .grad
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    adaptive_clip_grad_(model.parameters(), clip_factor)
    reference(other.parameters(), clip_factor)

    changed = untouched = 0
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        if p.grad is None:
            assert q.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12, msg=f"AGC differs on {n}")
        same = torch.isclose(p.grad, before[n])
        changed += int((~same).any())
        untouched += int(same.any())
    assert changed >= 5 and untouched >= 3  # both branches were exercised


# ------------------------------------------------------------------------------------------------ schedule
def test_warmup_cosine_values():
    total, warm, decay = 100, 10, 0.01
    f = warmup_cosine(total, warm, decay)

    def formula(step):
        if step < warm:
            return decay + (1 - decay) * step / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))

    for step in (0, 1, 5, 9, 10, 11, 55, 99, 100, 150):
        assert f(step) == pytest.approx(formula(step), abs=1e-12), step
    assert f(0) == pytest.approx(decay)  # the first step runs at lr · warmup_decay
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12) and f(150) == pytest.approx(0.0, abs=1e-12)
    # Monotone: up during warm-up, down afterwards.
    vals = [f(s) for s in range(total + 1)]
    assert all(a < b for a, b in zip(vals[:warm], vals[1 : warm + 1]))
    assert all(a >= b for a, b in zip(vals[warm:], vals[warm + 1 :]))


def test_warmup_cosine_without_warmup_and_in_lambda_lr():
    f = warmup_cosine(10, 0, 0.01)
    assert f(0) == pytest.approx(1.0) and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0, abs=1e-12)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(20, 4, 0.1))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.05, 0.1625, 0.275, 0.3875, 0.5])
