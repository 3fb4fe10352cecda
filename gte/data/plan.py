"""Which samples each (rank, DataLoader worker) reads: the split plans behind exact multi-rank streaming.

Every process of a launch builds the same plan from the same inputs (shard list, per-shard sample counts, seed,
epoch, world size, workers per rank); a *slot* is one (rank, worker) pair, ``slot = rank * workers + worker``, and a
plan is a list of :class:`Piece` per slot.

**Counted shards (local files; counts come from tar headers, see gte.data.index).** The shards are laid end to end
(training: in an order shuffled per epoch) and slot ``s`` gets one *contiguous* range of that sequence. Ranges
partition the samples, so evaluation reads every sample exactly once however many shards there are and whatever
their sizes, and range sizes differ by at most one sample. A range that starts inside a shard is reached with seeks
over tar headers, so there is no read amplification. Training ranges are sized to the quotas below.

**Uncounted shards (remote URLs).** Whole shards round-robin when there are at least as many shards as slots;
otherwise shard ``j`` is shared by the slots ``s ≡ j (mod n)``, which keep its samples ``i ≡ s // n (mod m_j)``
(``m_j`` = number of slots sharing it): exact as well, at the price of reading shard ``j`` ``m_j`` times.

**Training quotas.** ``steps = floor(N / (world · batch))`` for ``N`` samples per epoch (``data.train_size`` or the
count). A DataLoader fetches batch ``b`` from worker ``b % workers``, so worker ``w`` of every rank delivers exactly
``len(range(w, steps, workers)) · batch`` samples and every rank runs exactly ``steps`` steps. The
``N − world · steps · batch`` (< world · batch) samples that no quota covers are spread over the slots as spare;
which samples they are changes every epoch with the shard order. A slot whose range runs out before its quota (bad
samples, or ``train_size`` above the count) reads its range again in a new order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Samples ``i`` of shard ``url`` with ``start <= i < stop`` and ``i % stride == offset`` (``stop`` None: to the
    end of the shard)."""

    url: str
    start: int = 0
    stop: int | None = None
    stride: int = 1
    offset: int = 0

    def size(self) -> int | None:
        if self.stop is None:
            return None
        first = self.start + (self.offset - self.start) % self.stride
        return max(0, -(-(self.stop - first) // self.stride))


def worker_batches(steps: int, workers: int, worker: int) -> int:
    """Batches a DataLoader takes from ``worker`` in ``steps`` batches (round-robin order)."""
    return len(range(worker, steps, workers))


def train_steps(n_samples: int, batch_size: int, world_size: int) -> int:
    """Optimiser-loop steps per epoch that every rank runs: ``floor(n / (world · batch))``."""
    return n_samples // (batch_size * world_size)


def epoch_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The training shard order of ``epoch`` (same on every rank)."""
    order = list(range(n_shards))
    random.Random(f"gte-shards/{seed}/{epoch}").shuffle(order)
    return order


def even_sizes(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def contiguous(urls: list[str], counts: list[int], sizes: list[int]) -> list[list[Piece]]:
    """Cut the end-to-end sequence of ``urls`` (with ``counts`` samples each) into consecutive ranges of ``sizes``."""
    assert sum(sizes) <= sum(counts), (sizes, counts)
    plans: list[list[Piece]] = []
    j, pos = 0, 0  # current shard, position inside it
    for want in sizes:
        pieces: list[Piece] = []
        while want > 0:
            while counts[j] - pos == 0:
                j, pos = j + 1, 0
            take = min(want, counts[j] - pos)
            pieces.append(Piece(urls[j], pos, pos + take))
            pos += take
            want -= take
        plans.append(pieces)
    return plans


def uncounted(urls: list[str], slots: int) -> list[list[Piece]]:
    """Exact split of shards of unknown sizes: whole shards round-robin, or shared shards with a sample stride."""
    n = len(urls)
    if n >= slots:
        return [[Piece(u) for u in urls[s::slots]] for s in range(slots)]
    plans = []
    for s in range(slots):
        j = s % n
        sharing = len(range(j, slots, n))
        plans.append([Piece(urls[j], stride=sharing, offset=s // n)])
    return plans


def eval_plan(urls: list[str], counts: list[int] | None, world_size: int, workers: int) -> list[list[Piece]]:
    """Every sample in exactly one slot; slot sizes within one sample of each other when counts are known."""
    slots = world_size * workers
    if counts is None:
        return uncounted(urls, slots)
    return contiguous(urls, counts, even_sizes(sum(counts), slots))


def train_quotas(steps: int, batch_size: int, world_size: int, workers: int) -> list[int]:
    """Samples each slot delivers in one epoch."""
    return [worker_batches(steps, workers, w) * batch_size for _ in range(world_size) for w in range(workers)]


def train_plan(urls: list[str], counts: list[int] | None, *, steps: int, batch_size: int, world_size: int,
               workers: int, seed: int, epoch: int) -> list[list[Piece]]:
    """Per-slot ranges for one training epoch, in this epoch's shard order (see the module docstring)."""
    order = epoch_order(len(urls), seed, epoch)
    urls = [urls[i] for i in order]
    slots = world_size * workers
    if counts is None:
        return uncounted(urls, slots)
    counts = [counts[i] for i in order]
    total = sum(counts)
    quotas = train_quotas(steps, batch_size, world_size, workers)
    if sum(quotas) <= total:
        spare = even_sizes(total - sum(quotas), slots)
        sizes = [q + e for q, e in zip(quotas, spare)]
        return contiguous(urls, counts, sizes)
    # train_size above the count: the samples are split evenly over the slots that have a quota, and each repeats
    # its own range; with fewer samples than such slots, each of them reads everything.
    active = [s for s in range(slots) if quotas[s] > 0]
    if total < len(active):
        everything = [Piece(u, 0, c) for u, c in zip(urls, counts) if c > 0]
        return [everything if quotas[s] > 0 else [] for s in range(slots)]
    share = iter(contiguous(urls, counts, even_sizes(total, len(active))))
    return [next(share) if quotas[s] > 0 else [] for s in range(slots)]
