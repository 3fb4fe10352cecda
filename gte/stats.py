"""Statistics of ``gte compare`` (pure numpy, no models, no I/O): paired bootstrap confidence intervals of a
difference between two methods, McNemar's test on paired binary outcomes, the Wilson interval of a proportion.

**Paired bootstrap** (:func:`paired_bootstrap`). Both methods were evaluated on the *same* test samples, so every
replicate draws one set of N sample indices with replacement and uses it for both methods (paired resampling: the
variation shared by both — an easy or hard test set — cancels in the difference). A method with several seeds
contributes, per sample, its mean over seeds. Where each method has at least 3 seeds the replicate also resamples
each method's seeds with replacement (a two-level bootstrap: seeds, then samples). Seeds are resampled independently
per method: two training runs with the same seed number under different methods share their initialisation, but
their trajectories diverge, so treating them as paired would understate the between-run variance; with fewer than 3
seeds a resample of seeds is too coarse to say anything and the interval covers test-sample noise only (``over``
says which). The interval is the percentile interval of the replicates' differences.

**McNemar** (:func:`mcnemar`). Of the samples on which exactly one of the two models is right (b: only A, c: only
B), under the null each is A's with probability 1/2. For ``b + c < 25`` the exact two-sided binomial p-value
``min(1, 2 · P[Bin(b + c, 1/2) ≤ min(b, c)])``; from 25 on the chi-square statistic with continuity correction
``(|b − c| − 1)² / (b + c)`` on one degree of freedom (Edwards 1948; the rule of 25 is statsmodels' ``mcnemar``
default switch).
"""

from __future__ import annotations

import math

import numpy as np

EXACT_BELOW = 25  # discordant pairs under which McNemar's p-value is the exact binomial one
MIN_SEEDS = 3  # seeds per method from which the bootstrap resamples seeds too


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, reps: int = 2000, seed: int = 0, level: float = 0.95,
                     chunk: int = 250) -> dict:
    """The difference ``mean(a) − mean(b)`` with a ``level`` bootstrap interval (see the module docstring).

    ``a``: S_a×N (or N) per-sample values of method A, one row per seed (0/1 correct, agreement, a cosine); ``b``:
    S_b×N of method B on the same N samples in the same order. Returns ``diff``, ``lo``, ``hi``, ``level``, ``reps``
    and ``over`` (``"samples"`` or ``"seeds+samples"``)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired samples differ: {a.shape[1]} vs {b.shape[1]}")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    seeds = a.shape[0] >= MIN_SEEDS and b.shape[0] >= MIN_SEEDS
    out = np.empty(reps)
    for start in range(0, reps, chunk):
        c = min(chunk, reps - start)
        if seeds:  # c×N per-sample means over each replicate's resampled seeds
            d = a[rng.integers(0, a.shape[0], (c, a.shape[0]))].mean(1) - \
                b[rng.integers(0, b.shape[0], (c, b.shape[0]))].mean(1)
        else:
            d = np.broadcast_to(a.mean(0) - b.mean(0), (c, n))
        idx = rng.integers(0, n, (c, n))  # the same sample indices for both methods: paired
        out[start:start + c] = np.take_along_axis(d, idx, axis=1).mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(out, [alpha, 1 - alpha])
    return {"diff": float(a.mean() - b.mean()), "lo": float(lo), "hi": float(hi), "level": level, "reps": reps,
            "over": "seeds+samples" if seeds else "samples"}


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """McNemar's test of paired binary outcomes ``a`` and ``b`` (bool N each): ``b`` = only A right, ``c`` = only B
    right, ``p`` the two-sided p-value and ``test`` (``"exact"`` or ``"chi2-cc"``), see the module docstring."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return {"b": 0, "c": 0, "p": 1.0, "test": "exact"}
    if n < EXACT_BELOW:
        k = min(only_a, only_b)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        return {"b": only_a, "c": only_b, "p": min(1.0, 2 * tail), "test": "exact"}
    stat = (abs(only_a - only_b) - 1) ** 2 / n
    return {"b": only_a, "c": only_b, "p": math.erfc(math.sqrt(stat / 2)), "test": "chi2-cc", "statistic": stat}


def wilson(k: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (95 % by default); (NaN, NaN) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
