"""The distillation baselines' pure losses (gte.methods.at / dkd / dist / logit_std / cat_kd) against oracles:
torchdistill 1.1.5's implementations (AT, DIST, logit standardisation, and KD as a sanity baseline) and formulas
written out from the papers with explicit loops (DKD, CAT-KD); gradient checks, dtypes, scalings, zero cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gte.losses import kd_loss
from gte.methods.at import at_loss, attention_map
from gte.methods.cat_kd import cat_loss, class_activation_maps
from gte.methods.dist import dist_loss
from gte.methods.dkd import dkd_loss, dkd_warmup
from gte.methods.logit_std import standardize, standardized_kd_loss


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype) * scale


@pytest.fixture(scope="module")
def td():
    """torchdistill's mid-level losses (the `test` extra pins torchdistill==1.1.5)."""
    return pytest.importorskip("torchdistill.losses.mid_level")


def io(**tensors) -> dict:
    """torchdistill's io_dict: {module path: {'output': tensor}}."""
    return {path: {"output": t} for path, t in tensors.items()}


def logit_kwargs() -> dict:
    """The logit losses' module paths: both logits under 'fc' → 'output' in their io_dicts."""
    return {"student_module_path": "fc", "student_module_io": "output",
            "teacher_module_path": "fc", "teacher_module_io": "output"}


def close(got: torch.Tensor, expected, tol: float = 1e-6) -> None:
    assert got.ndim == 0
    assert float(got) == pytest.approx(float(expected), abs=tol, rel=tol)


# ------------------------------------------------------------------------------------------------ KD (baseline)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_torchdistill(td, T):
    s, t = randn(6, 10, seed=0, scale=3), randn(6, 10, seed=1, scale=3)
    ref = td.KDLoss(temperature=T, alpha=None, beta=1.0, **logit_kwargs())(io(fc=s), io(fc=t))  # KL only, no T²
    close(kd_loss(s, t, T), T * T * ref)


# ------------------------------------------------------------------------------------------------ AT
def at_pairs(n: int) -> dict:
    return {f"pair{i}": {"student": {"io": "output", "path": f"s{i}"}, "teacher": {"io": "output", "path": f"t{i}"},
                         "weight": 1} for i in range(n)}


def test_at_matches_torchdistill_code_mode(td):
    """AT, Eq. 2 in the authors' code form (ATLoss mode='code'): Σ_j mean (Q̂_S − Q̂_T)², Q = mean_c A²."""
    fs = [randn(4, 3, 6, 6, seed=2), randn(4, 5, 3, 3, seed=3)]
    ft = [randn(4, 8, 6, 6, seed=4), randn(4, 2, 3, 3, seed=5)]
    ref = td.ATLoss(at_pairs(2), mode="code")(io(s0=fs[0], s1=fs[1]), io(t0=ft[0], t1=ft[1]))
    close(at_loss(fs, ft, p=2), ref)


def test_at_pools_the_larger_feature_map(td):
    """Different spatial sizes: the larger feature map is adaptive-average-pooled to the smaller one's H×W."""
    fs = [randn(3, 4, 8, 8, seed=6), randn(3, 4, 2, 2, seed=7)]
    ft = [randn(3, 6, 4, 4, seed=8), randn(3, 6, 4, 4, seed=9)]
    pooled_s0, pooled_t1 = F.adaptive_avg_pool2d(fs[0], 4), F.adaptive_avg_pool2d(ft[1], 2)
    ref = td.ATLoss(at_pairs(2), mode="code")(io(s0=pooled_s0, s1=fs[1]), io(t0=ft[0], t1=pooled_t1))
    close(at_loss(fs, ft), ref)


def test_attention_map_is_normalised_channel_mean_of_abs_power():
    f = randn(2, 3, 4, 5, seed=10)
    for p in (1.0, 2.0, 4.0):
        a = attention_map(f, p)
        assert a.shape == (2, 20)
        for n in range(2):
            q = [sum(abs(float(f[n, c, h, w])) ** p for c in range(3)) / 3 for h in range(4) for w in range(5)]
            norm = math.sqrt(sum(v * v for v in q))
            assert a[n].tolist() == pytest.approx([v / norm for v in q], rel=1e-9)
    # scale-free: the map of c·f is the map of f
    torch.testing.assert_close(attention_map(7.0 * f), attention_map(f))


def test_at_zero_for_identical_and_gradcheck():
    f = [randn(2, 3, 4, 4, seed=11), randn(2, 3, 2, 2, seed=12)]
    assert float(at_loss(f, f)) == 0.0
    fs = [randn(2, 3, 4, 4, seed=13).requires_grad_(), randn(2, 2, 4, 4, seed=14).requires_grad_()]
    ft = [randn(2, 5, 2, 2, seed=15), randn(2, 4, 4, 4, seed=16)]
    assert torch.autograd.gradcheck(lambda a, b: at_loss([a, b], ft), tuple(fs))


# ------------------------------------------------------------------------------------------------ DKD
def dkd_oracle(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float) -> tuple[float, float, list[float]]:
    """Batch means of TCKD = KL(b_T ‖ b_S) and NCKD = KL(p̂_T ‖ p̂_S), and each sample's teacher p_t, by hand."""
    def probs(row):
        e = [math.exp(v / T) for v in row.tolist()]
        return [v / sum(e) for v in e]
    tckd = nckd = 0.0
    pt_teacher = []
    for i in range(len(y)):
        ps, pt, g = probs(s[i]), probs(t[i]), int(y[i])
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd += sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2))
        for j in range(len(ps)):
            if j != g:
                hs, ht = ps[j] / (1 - ps[g]), pt[j] / (1 - pt[g])
                nckd += ht * math.log(ht / hs)
        pt_teacher.append(pt[g])
    return tckd / len(y), nckd / len(y), pt_teacher


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_is_weighted_tckd_plus_nckd(T):
    """DKD Eq. 8: α·TCKD + β·NCKD (×T², batch mean), TCKD over (b_t, b_\\t), NCKD over renormalised non-targets."""
    s, t = randn(5, 7, seed=20, scale=3), randn(5, 7, seed=21, scale=3)
    y = torch.tensor([0, 3, 6, 3, 1])
    tckd, nckd, _ = dkd_oracle(s, t, y, T)
    close(dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=T), T * T * tckd)
    close(dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=T), T * T * nckd)
    close(dkd_loss(s, t, y, alpha=0.7, beta=2.5, temperature=T), T * T * (0.7 * tckd + 2.5 * nckd))
    # float32 inputs agree with the float64 hand computation
    close(dkd_loss(s.float(), t.float(), y, 1.0, 8.0, T), T * T * (tckd + 8.0 * nckd), tol=1e-5)


def test_dkd_decomposition_recovers_kd():
    """DKD Eq. 7: KD = TCKD + (1 − p_t^T)·NCKD, per sample; with one sample, β = 1 − p_t^T gives KD back."""
    T = 2.0
    s, t = randn(1, 6, seed=22, scale=2), randn(1, 6, seed=23, scale=2)
    y = torch.tensor([2])
    _, _, pt = dkd_oracle(s, t, y, T)
    close(dkd_loss(s, t, y, alpha=1.0, beta=1 - pt[0], temperature=T), kd_loss(s, t, T))


def test_dkd_direction_zero_and_gradcheck():
    s, t = randn(4, 5, seed=24, scale=2), randn(4, 5, seed=25, scale=2)
    y = torch.tensor([1, 0, 4, 2])
    assert float(dkd_loss(s, s, y, 1.0, 8.0, 4.0)) == pytest.approx(0.0, abs=1e-12)
    tckd, nckd, _ = dkd_oracle(s, t, y, 1.0)
    swapped = dkd_loss(t, s, y, 1.0, 1.0, 1.0)  # KL(student ‖ teacher) is another number
    assert float(swapped) != pytest.approx(tckd + nckd, rel=1e-3)
    assert torch.autograd.gradcheck(lambda a: dkd_loss(a, t, y, 1.0, 2.0, 3.0), (s.clone().requires_grad_(),))


def test_dkd_temperature_scaling():
    s, t, y = randn(3, 6, seed=26, scale=4), randn(3, 6, seed=27, scale=4), torch.tensor([5, 0, 2])
    close(dkd_loss(s, t, y, 1.0, 8.0, 4.0), 16.0 * dkd_loss(s / 4, t / 4, y, 1.0, 8.0, 1.0))


def test_dkd_warmup():
    assert dkd_warmup(0.0, 20) == 0.0
    assert dkd_warmup(5.0, 20) == 0.25
    assert dkd_warmup(20.0, 20) == 1.0 and dkd_warmup(35.5, 20) == 1.0
    assert dkd_warmup(0.5, 1) == 0.5 and dkd_warmup(3.0, 0) == 1.0


# ------------------------------------------------------------------------------------------------ DIST
@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_torchdistill(td, beta, gamma, tau):
    s, t = randn(8, 10, seed=30, scale=3), randn(8, 10, seed=31, scale=3)
    ref = td.DISTLoss(beta=beta, gamma=gamma, tau=tau, **logit_kwargs())(io(fc=s), io(fc=t))
    close(dist_loss(s, t, beta, gamma, tau), ref)


def test_dist_terms_direction_zero_and_gradcheck(td):
    s, t = randn(6, 5, seed=32, scale=2), randn(6, 5, seed=33, scale=2)
    only_inter = td.DISTLoss(beta=1.0, gamma=0.0, tau=2.0, **logit_kwargs())(io(fc=s), io(fc=t))
    only_intra = td.DISTLoss(beta=0.0, gamma=1.0, tau=2.0, **logit_kwargs())(io(fc=s), io(fc=t))
    close(dist_loss(s, t, 1.0, 0.0, 2.0), only_inter)
    close(dist_loss(s, t, 0.0, 1.0, 2.0), only_intra)
    # zero up to the official eps: 1 − ‖u‖² / (‖u‖² + 1e-8) per row / column
    assert float(dist_loss(s, s, 1.0, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert torch.autograd.gradcheck(lambda a: dist_loss(a, t, 1.0, 2.0, 1.5), (s.clone().requires_grad_(),))


def test_dist_temperature_scaling():
    s, t = randn(5, 6, seed=34, scale=4), randn(5, 6, seed=35, scale=4)
    close(dist_loss(s, t, 1.0, 1.0, 3.0), 9.0 * dist_loss(s / 3, t / 3, 1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------------------ logit standardisation
def test_standardize_matches_torchdistill_and_uses_unbiased_std(td):
    z = randn(4, 9, seed=40, scale=5) + 3
    ref = td.LogitStdKDLoss(temperature=2.0, alpha=None, beta=1.0, **logit_kwargs()).standardize(z)
    torch.testing.assert_close(standardize(z), ref, rtol=1e-12, atol=1e-12)
    row = z[0].tolist()
    mean = sum(row) / 9
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / 8)  # ÷ (C − 1)
    assert standardize(z)[0].tolist() == pytest.approx([(v - mean) / (std + 1e-7) for v in row], rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
def test_standardized_kd_matches_torchdistill(td, T):
    s, t = randn(6, 10, seed=41, scale=3), randn(6, 10, seed=42, scale=7)
    ref = td.LogitStdKDLoss(temperature=T, alpha=None, beta=1.0, **logit_kwargs())(io(fc=s), io(fc=t))  # KL only, no T²
    close(standardized_kd_loss(s, t, T), T * T * ref)


def test_standardized_kd_ignores_logit_scale_and_shift_and_gradchecks():
    s, t = randn(4, 6, seed=43, scale=2), randn(4, 6, seed=44, scale=2)
    close(standardized_kd_loss(3.0 * s - 1.0, 0.5 * t + 4.0, 2.0), standardized_kd_loss(s, t, 2.0), tol=1e-6)
    assert float(standardized_kd_loss(s, 5.0 * s + 2.0, 2.0)) == pytest.approx(0.0, abs=1e-9)  # up to eps in the std
    assert torch.autograd.gradcheck(lambda a: standardized_kd_loss(a, t, 2.0), (s.clone().requires_grad_(),))


# ------------------------------------------------------------------------------------------------ CAT-KD
def block_mean(x: torch.Tensor, p: int) -> list[list[float]]:
    """p×p average pooling of one H×W map whose sides p divides, by hand."""
    h, w = x.shape
    bh, bw = h // p, w // p
    return [[sum(float(x[i * bh + a, j * bw + b]) for a in range(bh) for b in range(bw)) / (bh * bw)
             for j in range(p)] for i in range(p)]


def cat_oracle(a_s: torch.Tensor, a_t: torch.Tensor, p: int, normalize: bool) -> float:
    """CAT-KD's transfer loss: pooled (optionally L2-normalised) CAMs compared by mean squared error."""
    total, count = 0.0, 0
    for n in range(a_s.shape[0]):
        for c in range(a_s.shape[1]):
            ms, mt = block_mean(a_s[n, c], p), block_mean(a_t[n, c], p)
            if normalize:
                ns = math.sqrt(sum(v * v for r in ms for v in r))
                nt = math.sqrt(sum(v * v for r in mt for v in r))
                ms = [[v / ns for v in r] for r in ms]
                mt = [[v / nt for v in r] for r in mt]
            total += sum((ms[i][j] - mt[i][j]) ** 2 for i in range(p) for j in range(p))
            count += p * p
    return total / count


def test_class_activation_maps_are_bias_free_1x1_conv():
    """CAM (CAT-KD Sec. 3): A_c = Σ_k W_{c,k} F_k; the spatial mean of A is the bias-free logit of pooled F."""
    f, w = randn(2, 3, 4, 5, seed=50), randn(6, 3, seed=51)
    cams = class_activation_maps(f, w)
    assert cams.shape == (2, 6, 4, 5)
    for n in range(2):
        for c in range(6):
            expected = sum(float(w[c, k]) * f[n, k] for k in range(3))
            torch.testing.assert_close(cams[n, c], expected)
    torch.testing.assert_close(cams.mean(dim=(2, 3)), f.mean(dim=(2, 3)) @ w.T)
    torch.testing.assert_close(class_activation_maps(f, w[:, :, None, None]), cams)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pool", [1, 2])
def test_cat_loss_is_mse_of_pooled_cams(normalize, pool):
    """CAT-KD's L_CAT (official CAT_loss): average-pool to P×P, [normalise], MSE; different H×W are pooled each."""
    a_s, a_t = randn(2, 3, 4, 4, seed=52), randn(2, 3, 6, 6, seed=53)
    close(cat_loss(a_s, a_t, pool, normalize), cat_oracle(a_s, a_t, pool, normalize))
    a_t2 = randn(2, 3, 4, 4, seed=54)
    close(cat_loss(a_s, a_t2, pool, normalize), cat_oracle(a_s, a_t2, pool, normalize))


def test_cat_loss_normalisation_is_scale_free_zero_and_gradcheck():
    a_s, a_t = randn(2, 4, 4, 4, seed=55), randn(2, 4, 8, 8, seed=56)
    close(cat_loss(3.0 * a_s, a_t, 2, True), cat_loss(a_s, a_t, 2, True), tol=1e-9)
    assert float(cat_loss(3.0 * a_s, a_t, 2, False)) != pytest.approx(float(cat_loss(a_s, a_t, 2, False)), rel=1e-3)
    assert float(cat_loss(a_s, a_s, 2, False)) == 0.0
    for normalize in (True, False):
        a = a_s.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, nz=normalize: cat_loss(x, a_t, 2, nz), (a,))
    f, w = randn(2, 3, 4, 4, seed=57).requires_grad_(), randn(4, 3, seed=58).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v: cat_loss(class_activation_maps(x, v), a_t, 2, True), (f, w))


# ------------------------------------------------------------------------------------------------ dtypes
def test_bf16_inputs_are_computed_in_float32():
    """bf16 inputs give float32 results equal to those of the same values promoted first (no bf16 arithmetic)."""
    bf = torch.bfloat16
    s, t = randn(4, 6, seed=60, scale=3, dtype=bf), randn(4, 6, seed=61, scale=3, dtype=bf)
    y = torch.tensor([0, 1, 2, 3])
    fs, ft = randn(2, 3, 4, 4, seed=62, dtype=bf), randn(2, 5, 4, 4, seed=63, dtype=bf)
    w, big = randn(6, 3, seed=64, dtype=bf), randn(2, 5, 8, 8, seed=65, dtype=bf)
    calls = {
        "at": lambda c: at_loss([c(fs), c(fs)], [c(ft), c(big)]),  # the second pair is pooled
        "attention_map": lambda c: attention_map(c(fs)),
        "dkd": lambda c: dkd_loss(c(s), c(t), y, 1.0, 0.5, 1.0),
        "dist": lambda c: dist_loss(c(s), c(t), 1.0, 1.0, 1.0),
        "standardize": lambda c: standardize(c(s)),
        "logit_std": lambda c: standardized_kd_loss(c(s), c(t), 2.0),
        "cams": lambda c: class_activation_maps(c(fs), c(w)),
        "cat": lambda c: cat_loss(c(fs), c(ft[:, :3]), 2, True),
    }
    for name, call in calls.items():
        got, ref = call(lambda x: x), call(lambda x: x.float())
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=name)
    # float64 stays float64 (for the gradient checks above)
    assert dist_loss(s.double(), t.double(), 1.0, 1.0, 1.0).dtype == torch.float64
