"""CRD: contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, arXiv:1910.10699).

The penultimate (pooled, flattened) features of student and teacher are embedded into a shared unit sphere,
``e = W f + b, e ← e / ‖e‖`` (one linear ``g^S``/``g^T`` each, both trained). A memory bank of every training
sample's past embeddings (one bank per network) supplies K negatives per anchor. With τ the temperature and N the
number of training samples, the score of an anchor e against a bank row m is

    P(m | e) = exp(m·e / τ) / Z,        Z = N · mean over the first batch of exp(m·e / τ)   (then fixed)

(Z estimates the softmax normaliser over the whole data set, fixed once as in the official code). The critic of
eq. 10, h = P / (P + K/N), turns scores into the probability that a pair is the positive one (noise density 1/N,
K noise samples per data sample), and the NCE objective (eq. 10; "eq. 18" in the official ContrastLoss)

    L_NCE = -(1/B) Σ_b [ log h(pos_b) + Σ_k log(1 - h(neg_bk)) ]

is computed twice: student anchors against the teacher bank, teacher anchors against the student bank
(``L_CRD = L_NCE(out_s) + L_NCE(out_t)``). After the step the positive rows are moved toward the new embeddings,
``m ← normalise(μ m + (1-μ) e)``. The total loss is ``ce_weight · CE + β · L_CRD``.

Defaults follow the official code (github.com/HobbitLong/RepDistiller, train_student.py: feat_dim 128,
nce_k 16384, nce_t 0.07, nce_m 0.5) and mdistiller's ImageNet R34→R18 CRD (engine/cfg.py: CRD.LOSS.FEAT_WEIGHT
0.8, CE_WEIGHT 1.0). The official loaders draw the K negatives among samples of other classes ("exact" mode): so
does gte's training, which reads every sample's label up front (``Context.labels``); ``negatives = "uniform"``
draws over the whole data set (the official AliasMethod over a uniform distribution), as does a method built
without labels (``gte bench``, the Python API without ``Context.labels``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as td
import torch.nn.functional as F
from torch import nn

from gte import dist as gte_dist  # not gte.methods.dist (the DIST method)
from gte.errors import GteError
from gte.methods.base import Method, Needs, at_least, option, positive, register
from gte.methods.features import pooled

FEAT_DIM = 128
NCE_K = 16384
NCE_T = 0.07
NCE_M = 0.5
CRD_WEIGHT = 0.8
CE_WEIGHT = 1.0
EPS = 1e-7  # the official ContrastLoss's guard in h's denominator

_STATE_KEYS = ("memory_s", "memory_t", "z", "rng_state")


class Embed(nn.Module):
    """Linear projection to ``dim_out`` followed by L2 normalisation (``g`` of the paper)."""

    def __init__(self, dim_in: int, dim_out: int = FEAT_DIM):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDHeads(nn.Module):
    """Both embeddings; all trainable parameters of CRD, so one DDP wrapper around this covers them."""

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int = FEAT_DIM):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_s, e_t): unit-norm embeddings of the student's and the teacher's pooled features."""
        return self.embed_s(f_s), self.embed_t(f_t)


class ContrastMemory:
    """The two memory banks, the fixed normalisers Z and the negative sampler (no parameters, no DDP buffers).

    A plain object on purpose: it must not be broadcast by DDP nor land in the student's state dict. Every rank
    holds an identical copy: :meth:`update` takes the all-gathered batch (:func:`gather_for_update`), Z is set
    from rank 0's first batch on all ranks, and :meth:`sample` draws from a generator that advances identically on every rank.
    """

    def __init__(self, feat_dim: int, n_data: int, nce_k: int = NCE_K, nce_t: float = NCE_T,
                 nce_m: float = NCE_M, *, generator: torch.Generator | None = None,
                 labels: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if nce_k < 1 or n_data < 2:
            raise GteError(f"CRD needs at least 2 training samples and 1 negative (got n_data={n_data}, nce_k={nce_k})")
        self.n_data, self.nce_k, self.nce_t, self.nce_m = n_data, nce_k, nce_t, nce_m
        # a CPU generator: its state is a plain uint8 tensor and its draws do not depend on the device
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        stdv = 1.0 / math.sqrt(feat_dim / 3)  # official init: uniform in ±sqrt(3/dim), i.e. unit expected norm
        self.memory_s = self._uniform(n_data, feat_dim, stdv, dtype).to(device)
        self.memory_t = self._uniform(n_data, feat_dim, stdv, dtype).to(device)
        self.z = torch.full((2,), -1.0, dtype=torch.float64)  # (Z_s, Z_t); negative = not estimated yet
        self._negatives = None if labels is None else _ClassNegatives(labels, n_data)

    def _uniform(self, rows: int, cols: int, stdv: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.rand(rows, cols, generator=self.generator, dtype=dtype).mul_(2 * stdv).sub_(stdv)

    def to(self, device: torch.device | str) -> ContrastMemory:
        self.memory_s, self.memory_t = self.memory_s.to(device), self.memory_t.to(device)
        return self

    def sample(self, indices: torch.Tensor, rank: int = 0, seed: int | None = None) -> torch.Tensor:
        """``(B, K+1)`` bank rows per anchor: column 0 the positive (``indices``), then K negatives.

        One draw from the shared generator seeds this step's stream, offset by ``rank``: every rank advances the
        shared state identically (so rank 0's saved state resumes them all) yet draws its own negatives. Each rank
        must call this once per step. ``seed`` given: the negatives are drawn from it alone (the shared generator is
        not used) — the training method seeds each batch by its content, so that a batch draws the same negatives on
        whichever rank or micro-batch it lands.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator)) + rank
        g = torch.Generator().manual_seed(seed)
        idx = indices.detach().to("cpu", torch.long).view(-1)
        if self._negatives is None:
            neg = torch.randint(0, self.n_data, (len(idx), self.nce_k), generator=g)
        else:
            neg = self._negatives.draw(idx, self.nce_k, g)
        return torch.cat([idx[:, None], neg], 1).to(self.memory_s.device)

    def scores(self, e_s: torch.Tensor, e_t: torch.Tensor,
               contrast_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out_s, out_t), each ``(B, K+1)``: ``P`` of student anchors against the teacher bank and of teacher
        anchors against the student bank; column 0 is the positive pair. Sets Z on the first call."""
        b, k1 = contrast_idx.shape
        flat = contrast_idx.reshape(-1)
        # scores in the bank's precision: exp(s/0.07) spans ~1e12 and autocast's bf16 would blur it
        with torch.autocast(e_s.device.type, enabled=False):
            rows_t = self.memory_t.index_select(0, flat).view(b, k1, -1)
            rows_s = self.memory_s.index_select(0, flat).view(b, k1, -1)
            out_s = torch.bmm(rows_t, e_s.to(rows_t.dtype).unsqueeze(2)).squeeze(2).div(self.nce_t).exp()
            out_t = torch.bmm(rows_s, e_t.to(rows_s.dtype).unsqueeze(2)).squeeze(2).div(self.nce_t).exp()
        if (self.z < 0).any():
            self._set_z(out_s.detach(), out_t.detach())
        return out_s / float(self.z[0]), out_t / float(self.z[1])

    def _set_z(self, out_s: torch.Tensor, out_t: torch.Tensor) -> None:
        means = torch.stack([out_s.double().mean(), out_t.double().mean()])
        if gte_dist.initialized() and td.get_world_size() > 1:
            # every rank must divide by the same Z: rank 0's first batch sets it, as the official (single-process)
            # code's first batch does — and as micro-batch 0 does in one process with gradient accumulation
            td.broadcast(means, src=0)
        self.z = means.cpu() * self.n_data

    @torch.no_grad()
    def update(self, e_s: torch.Tensor, e_t: torch.Tensor, indices: torch.Tensor) -> None:
        """Momentum update of the positive rows, ``m ← normalise(μ m + (1-μ) e)``, from the gathered batch."""
        idx = indices.to(self.memory_s.device, torch.long).view(-1)
        # a repeated index (DistributedSampler pads with repeats) keeps its last occurrence, on every device:
        # index_copy_ with duplicates is undefined on CUDA and would let ranks' banks drift apart
        uniq, inverse = torch.unique(idx, return_inverse=True)
        pos = torch.arange(len(idx), device=idx.device)
        last = torch.zeros(len(uniq), dtype=torch.long, device=idx.device).scatter_reduce_(0, inverse, pos, "amax")
        for bank, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
            rows = bank.index_select(0, uniq) * self.nce_m + e.detach()[last].to(bank) * (1 - self.nce_m)
            bank.index_copy_(0, uniq, rows / rows.norm(dim=1, keepdim=True))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors): both banks, Z and the generator's state."""
        return {"memory_s": self.memory_s, "memory_t": self.memory_t, "z": self.z.clone(),
                "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise GteError(f"CRD memory state lacks {', '.join(missing)}")
        for key in ("memory_s", "memory_t"):
            if tuple(state[key].shape) != tuple(self.memory_s.shape):
                raise GteError(f"CRD memory {key} has shape {tuple(state[key].shape)}, expected "
                               f"{tuple(self.memory_s.shape)} (another data set or feat_dim?)")
        self.memory_s = state["memory_s"].to(self.memory_s.device, self.memory_s.dtype).clone()
        self.memory_t = state["memory_t"].to(self.memory_t.device, self.memory_t.dtype).clone()
        self.z = state["z"].to("cpu", torch.float64).clone()
        self.generator.set_state(state["rng_state"].to("cpu", torch.uint8).clone())


class _ClassNegatives:
    """Uniform draws among the samples of the other classes (the official loaders' "exact" mode)."""

    def __init__(self, labels: torch.Tensor, n_data: int):
        labels = labels.detach().to("cpu", torch.long).view(-1)
        if len(labels) != n_data:
            raise GteError(f"CRD got {len(labels)} labels for {n_data} training samples")
        self.labels = labels
        self.by_class = torch.argsort(labels, stable=True)  # sample indices grouped by class
        counts = torch.bincount(labels)
        self.start = torch.cumsum(counts, 0) - counts
        self.count = counts
        if (counts == n_data).any():
            raise GteError("CRD with class-exclusive negatives needs at least two classes")

    def draw(self, idx: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
        cls = self.labels[idx]
        start, count = self.start[cls, None], self.count[cls, None]
        # a uniform position among the N - n_c others: positions past the class's block skip over it
        u = (torch.rand(len(idx), k, generator=g, dtype=torch.float64) * (len(self.labels) - count)).long()
        return self.by_class[u + (u >= start) * count]


def nce_loss(x: torch.Tensor, n_data: int, eps: float = EPS) -> torch.Tensor:
    """L_NCE of eq. 10 for scores ``x`` (B, K+1), positive first: ``-mean_b[log h⁺ + Σ_k log(1-h⁻)]``,
    ``h = P / (P + K/N)``."""
    noise = (x.shape[1] - 1) / n_data  # K · P_n with the uniform noise density P_n = 1/N
    log_h_pos = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_1m_h_neg = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_h_pos.sum() + log_1m_h_neg.sum()) / x.shape[0]


def crd_loss(out_s: torch.Tensor, out_t: torch.Tensor, n_data: int) -> torch.Tensor:
    """L_CRD: the NCE loss of the student anchors plus that of the teacher anchors (both directions)."""
    return nce_loss(out_s, n_data) + nce_loss(out_t, n_data)


def gather_for_update(e_s: torch.Tensor, e_t: torch.Tensor,
                      indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detached embeddings and indices of every rank, rank 0's first (identity without a process group).

    Each rank may hold a different batch size (a last short batch): sizes are gathered first and the rows padded.
    """
    e_s, e_t, indices = e_s.detach(), e_t.detach(), indices.detach().view(-1)
    if not gte_dist.initialized() or td.get_world_size() == 1:
        return e_s, e_t, indices
    world = td.get_world_size()
    device = e_s.device
    size = torch.tensor([len(indices)], device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    td.all_gather(sizes, size)
    sizes_l = [int(s) for s in sizes]
    pad = max(sizes_l) - len(indices)
    both = F.pad(torch.cat([e_s, e_t.to(e_s.dtype)], 1), (0, 0, 0, pad))
    idx = F.pad(indices.to(device, torch.long), (0, pad))
    both_all = [torch.empty_like(both) for _ in range(world)]
    idx_all = [torch.empty_like(idx) for _ in range(world)]
    td.all_gather(both_all, both)
    td.all_gather(idx_all, idx)
    both = torch.cat([t[:n] for t, n in zip(both_all, sizes_l)])
    idx = torch.cat([t[:n] for t, n in zip(idx_all, sizes_l)])
    d = e_s.shape[1]
    return both[:, :d].contiguous(), both[:, d:].to(e_t.dtype).contiguous(), idx


# --------------------------------------------------------------------------------------------- the method
@dataclass
class CRDOptions:
    """``[distill.options]`` of ``crd`` (the paper's and mdistiller's ImageNet setting)."""

    weight: float = option(CRD_WEIGHT, at_least(0), ">= 0")  # β of L = w_ce · CE + β · L_CRD
    feat_dim: int = option(FEAT_DIM, at_least(1), ">= 1")
    nce_k: int = option(NCE_K, at_least(1), ">= 1")  # negatives per anchor
    nce_t: float = option(NCE_T, positive, "> 0")
    nce_m: float = option(NCE_M, lambda v: 0 <= v < 1, "in [0, 1)")  # memory momentum
    # "other_classes": drawn among other classes' samples (the official loaders' "exact" mode; needs every sample's
    # label, which training gives); "uniform": over the whole data set (also where no labels are known)
    negatives: str = option("other_classes", choices=("other_classes", "uniform"))


@register("crd")
class CRD(Method):
    """Contrastive representation distillation: the student's and the teacher's pooled last-stage features, each
    embedded (trainable heads), contrasted against the other model's memory bank with one positive per anchor (its
    own sample) and ``nce_k`` negatives.

    Multi-process and gradient accumulation: a batch's negatives are drawn from a seed of its sample indices (the same
    on whichever rank or micro-batch it lands), and the memory update of a step is applied once, after the optimiser
    step, from every micro-batch of every rank in rank order — so every rank keeps an identical memory, and two
    processes equal one process accumulating the same two micro-batches.
    """

    needs = Needs(teacher=True, student_features="last", teacher_features="last", indices=True, frozen=False)
    Options = CRDOptions
    ce_default = CE_WEIGHT

    def __init__(self, cfg, student, teacher, **kw):
        super().__init__(cfg, student, teacher, **kw)
        n, o = self.context.n_data, self.options
        if n < 2:
            raise GteError("crd keeps one memory row per training sample: it needs local shards gte can count")
        device = next(student.parameters()).device
        labels = self.context.labels if o.negatives == "other_classes" else None
        if labels is not None:  # unknown labels (-1) form one more group: negatives for every class
            labels = torch.where(labels < 0, labels.max() + 1, labels)
        self.negatives = "other_classes" if labels is not None else "uniform"
        s_shapes, t_shapes = self.feature_shapes()
        if len(s_shapes) != 1 or len(t_shapes) != 1:
            raise GteError("crd embeds one feature map per model: give distill.student_layers / teacher_layers one "
                           f"layer each (got {len(s_shapes)} and {len(t_shapes)})")
        s_shape, t_shape = s_shapes[0], t_shapes[0]
        self.parts = CRDHeads(s_shape[0], t_shape[0], o.feat_dim)
        # the run's seeded RNG (set_seed: the same on every rank) seeds the memory and the negatives' stream
        self.seed = int(torch.randint(0, 2**62, (1,)))
        self.memory = ContrastMemory(o.feat_dim, n, o.nce_k, o.nce_t, o.nce_m, labels=labels,
                                     generator=torch.Generator().manual_seed(self.seed), device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def objective(self, batch, s, t):
        idx = batch.indices
        if idx is None:
            raise GteError("crd needs each sample's index: the loader gives it to methods whose needs ask for it")
        if len(idx) and int(idx.max()) >= self.memory.n_data:
            raise GteError(f"sample index {int(idx.max())} outside the {self.memory.n_data} samples counted in the "
                           "training shards")
        e_s, e_t = self.parts(pooled(s.features[-1]), pooled(t.features[-1]))
        contrast = self.memory.sample(idx, seed=_content_seed(self.seed, idx))
        out_s, out_t = self.memory.scores(e_s, e_t, contrast)
        crd = crd_loss(out_s, out_t, self.memory.n_data)
        self._pending.append((e_s.detach(), e_t.detach(), idx.detach()))
        logs = {"crd": crd.detach()}
        return self.with_labels(self.options.weight * crd, logs, s.logits, batch.labels), logs

    def end_step(self) -> None:
        if not self._pending:
            return
        e_s, e_t, idx = (torch.cat(x) for x in zip(*self._pending))
        self._pending.clear()
        self.memory.update(*gather_for_update(e_s, e_t, idx))

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"seed": torch.tensor(self.seed), **self.memory.state_dict()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if "seed" not in state:
            raise GteError("CRD state lacks its seed (a checkpoint of another method?)")
        state = dict(state)
        self.seed = int(state.pop("seed"))
        self.memory.load_state_dict(state)


def _content_seed(base: int, indices: torch.Tensor) -> int:
    """A seed from the run's seed and a batch's sample indices."""
    digest = hashlib.blake2b(indices.detach().cpu().to(torch.int64).numpy().tobytes(), digest_size=8,
                             key=base.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") >> 2
