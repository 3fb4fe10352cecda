"""Streaming WebDataset shards (design.md format) into batches, exactly split over ranks × DataLoader workers.

``make_loader(spec, train=…, image_size=…, batch_size=…, …)`` returns a :class:`Loader`: an iterator of batches
``{"image": N×3×S×S float in [0, 1], "label": N, "group": N (-1 = none), "key": [str], "labels", "boxes",
"box_labels": per-sample lists (None where the json lacks them), "skipped": int}`` with ``len(loader)`` batches.

Who reads what (details in gte.data.plan): every process of a launch builds the same plan; each (rank, worker) *slot*
reads its own part. **Evaluation**: every sample exactly once over all ranks and workers, whatever the number and
sizes of shards (also with fewer shards than slots). Each rank gets only its share — gather or all-reduce sums
across ranks, or pass ``world_size=1, rank=0`` to read everything in one process. **Training**: every rank yields
exactly ``len(loader) = floor(N / (world · batch))`` full batches per epoch (no DDP hang), ``N`` =
``train_size`` or the number of samples counted from tar headers; shard order, range boundaries and shuffle buffers
are seeded by (seed, epoch) and change every epoch; each epoch reads ``world · steps · batch`` distinct samples (up
to the ``< world · batch`` remainder, which moves every epoch).

Bad data: a sample whose image does not decode (corrupt, truncated), or that lacks ``cls``, or has invalid json is
skipped and counted (``batch["skipped"]``, ``loader.skipped``); a truncated or corrupt tar ends that shard with a
warning (found from the tar headers before reading when the shard is local); empty / 0-byte shards hold no samples.
More than ``max_bad_fraction`` (default 1 %) of the epoch's share unreadable stops with a :class:`GteError` naming an
example. A missing shard or a pattern matching nothing fails in ``make_loader`` (``expand_spec``), before any work.

Never unpickled: only the image, ``cls``, ``json`` and requested ``.npy`` members (``allow_pickle=False``) are decoded;
``.pth``/pickle members are refused.
"""

from __future__ import annotations

import itertools
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from gte.data import plan as planning
from gte.data.plan import Piece
from gte.data.tario import (IMAGE_EXTS, ReadProblem, count_samples, expand_spec, iter_samples,  # noqa: F401
                            shard_counts)
from gte.data.transforms import BadSample, SampleTransform
from gte.errors import GteError

UNSAFE_MEMBERS = ("pth", "pt", "pickle", "pkl", "pyd", "npz")
MAX_EXAMPLES = 3


class DataWarning(UserWarning):
    """A data problem that does not stop the run (a truncated shard, …)."""


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def train_steps(spec: str, batch_size: int, world_size: int | None = None, train_size: int = 0) -> int:
    """Steps per epoch every rank runs: ``floor(N / (world · batch))`` (N = ``train_size`` or the counted samples)."""
    world = world_size if world_size is not None else distributed_rank_world()[1]
    n = train_size or count_samples(spec)
    return planning.train_steps(n, batch_size, world)


# ------------------------------------------------------------------------------------------------ bad-sample guard


class BadSampleGuard:
    """Counts skipped samples of one epoch (one rank) and stops when more than ``max_fraction`` of it is bad.

    ``planned`` is the number of samples this rank's share holds (known when shards were counted). With it the check
    is exact at any time — the epoch *will* exceed the fraction as soon as ``skipped > max_fraction · planned`` — so
    a broken dataset stops at once; without it, the check runs on what was read, at the end of the epoch.
    :class:`Loader` runs one itself; a training loop can also feed batches from elsewhere through :meth:`update`.
    """

    def __init__(self, max_fraction: float = 0.01, planned: int | None = None, what: str = "the data") -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise GteError(f"data.max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction, self.planned, self.what = max_fraction, planned, what
        self.samples = 0
        self.skipped = 0
        self.examples: list[str] = []

    def update(self, batch: dict[str, Any]) -> None:
        """Add a batch's counts (``batch["skipped"]``, its size); raises :class:`GteError` past the limit."""
        self.samples += len(batch["label"])
        self.add(int(batch.get("skipped", 0)), batch.get("_examples", ()))

    def add(self, skipped: int, examples=()) -> None:
        self.skipped += skipped
        for e in examples:
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(e)
        if self.planned:
            self._check(self.planned)

    def finish(self) -> None:
        """End-of-epoch check (also covers shares of unknown size)."""
        self._check(self.planned or self.samples + self.skipped)

    @property
    def fraction(self) -> float:
        total = self.planned or self.samples + self.skipped
        return self.skipped / total if total else 0.0

    def _check(self, total: int) -> None:
        if total and self.skipped > self.max_fraction * total:
            example = f"; e.g. {self.examples[0]}" if self.examples else ""
            raise GteError(f"{self.skipped} of {total} samples ({100 * self.skipped / total:.1f} %) of {self.what} "
                           f"are unreadable, more than data.max_bad_fraction = {100 * self.max_fraction:g} % "
                           f"(corrupt files or a wrong path?){example}")


# ------------------------------------------------------------------------------------------------- the dataset


def _collate(samples: list[dict[str, Any]], float_images: bool, members: tuple[str, ...]) -> dict[str, Any]:
    if samples:
        images = torch.stack([s["image"] for s in samples])
    else:
        images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    if float_images:
        images = images.float().div_(255.0)
    out = {
        "image": images,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "group": torch.tensor([s["group"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "boxes": [s["boxes"] for s in samples],
        "box_labels": [s["box_labels"] for s in samples],
    }
    for name in members:
        out[name] = torch.stack([s[name] for s in samples]) if samples else torch.empty(0)
    return out


@dataclass
class _SlotState:
    """Per-worker bookkeeping, shipped to the main process inside the batches."""

    bad: set = field(default_factory=set)          # distinct (url, index) skipped this epoch
    pending: int = 0                               # skipped since the last batch
    examples: list = field(default_factory=list)   # first few problems, for error messages
    warned: set = field(default_factory=set)

    def skip(self, ident: tuple[str, int], why: str, key: str = "") -> None:
        if ident in self.bad:
            return
        self.bad.add(ident)
        self.pending += 1
        if len(self.examples) < MAX_EXAMPLES:
            what = f"'{key}' (sample {ident[1]})" if key else f"sample {ident[1]}"
            self.examples.append(f"{what} of {ident[0]}: {why}")

    def take(self) -> tuple[int, list[str]]:
        n, ex = self.pending, self.examples
        self.pending, self.examples = 0, []
        return n, ex


class ShardStream(torch.utils.data.IterableDataset):
    """Yields whole batches (dicts) of one rank; each DataLoader worker reads its slot of the plan."""

    def __init__(self, plans: list[list[Piece]], *, rank: int, workers: int, batch_size: int,
                 transform: SampleTransform, train: bool, quotas: list[int] | None, shuffle_buffer: int, seed: int,
                 epoch: int, start_batch: int = 0, float_images: bool = True) -> None:
        super().__init__()
        self.plans, self.rank, self.workers, self.batch_size = plans, rank, workers, batch_size
        self.transform, self.train, self.quotas = transform, train, quotas
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.start_batch, self.float_images = start_batch, float_images

    # physical worker w plays logical worker (w + start_batch) % W, so that a resumed epoch interleaves its
    # workers' batches exactly as the uninterrupted one did (DataLoader always starts with worker 0)
    def _slot(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers, runs in {nw}")
        logical = (w + self.start_batch) % nw
        return self.rank * nw + logical, logical

    def _one_pass(self, pieces: list[Piece], slot: int, state: _SlotState, repeat: int, read: list[int]) -> Iterator[dict]:
        """Raw samples of the slot's pieces (in a new order on repeats); read problems end a shard, counted."""
        order = list(pieces)
        if repeat:
            random.Random(f"gte-pieces/{self.seed}/{self.epoch}/{slot}/{repeat}").shuffle(order)
        for piece in order:
            got = 0
            for item in iter_samples(piece.url, piece.start, piece.stop, piece.stride, piece.offset):
                if isinstance(item, ReadProblem):
                    if item.url not in state.warned:
                        state.warned.add(item.url)
                        warnings.warn(f"{item.url}: {item.error} (at sample {item.index}); "
                                      "skipping the rest of this shard", DataWarning, stacklevel=2)
                    # what the plan expected from this piece and did not get counts as skipped
                    expected = piece.size()
                    first = piece.start + (piece.offset - piece.start) % piece.stride
                    missing = range(got, expected) if expected is not None else range(got, got + 1)
                    for k in missing:
                        state.skip((item.url, first + k * piece.stride), item.error)
                    break
                got += 1
                yield item
            read[0] += got

    def _shuffled(self, source: Iterator, size: int, slot: int, repeat: int) -> Iterator:
        if not self.train or size <= 1:
            yield from source
            return
        rng = random.Random(f"gte-buffer/{self.seed}/{self.epoch}/{slot}/{repeat}")
        buf: list = []
        for item in source:
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            out, buf[j] = buf[j], item
            yield out
        rng.shuffle(buf)
        yield from buf

    def _stream(self, pieces: list[Piece], slot: int, state: _SlotState, buffer: int) -> Iterator[tuple[int, dict]]:
        """(pass number, raw sample). Training repeats the slot's range, each pass shuffled on its own (so one pass
        never repeats a sample), until the consumer stops; evaluation reads it once, in order."""
        for repeat in itertools.count() if self.train else (0,):
            read = [0]
            for raw in self._shuffled(self._one_pass(pieces, slot, state, repeat, read), buffer, slot, repeat):
                yield repeat, raw
            if self.train and read[0] == 0:
                raise GteError(f"no samples could be read from {', '.join(p.url for p in pieces[:3])}"
                               f"{' …' if len(pieces) > 3 else ''} (empty or unreadable shards)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, logical = self._slot()
        pieces = [p for p in self.plans[slot] if p.size() != 0]
        state = _SlotState()
        b = self.batch_size
        if self.train:
            assert self.quotas is not None
            n_batches = self.quotas[slot] // b - planning.worker_batches(self.start_batch, self.workers, logical)
            if n_batches <= 0:
                return
            share = sum(p.size() or 0 for p in pieces) or self.shuffle_buffer
            skip = planning.worker_batches(self.start_batch, self.workers, logical) * b
        else:
            n_batches, share, skip = -1, 0, 0
        if not pieces:
            if self.train:
                raise GteError(f"slot {slot} of the training plan has no samples")
            return
        source = self._stream(pieces, slot, state, min(self.shuffle_buffer, share))
        batch: list[dict] = []
        done, consecutive_bad = 0, 0
        for repeat, raw in source:
            if skip:  # resuming mid-epoch: the batches already trained on are passed over without decoding
                skip -= 1
                continue
            try:
                batch.append(self.transform(raw, repeat))
                consecutive_bad = 0
            except BadSample as e:
                state.skip((raw["__url__"], raw["__index__"]), str(e), raw["__key__"])
                consecutive_bad += 1
                if self.train and consecutive_bad > max(share, 100):
                    raise GteError(f"the last {consecutive_bad} samples read were all unreadable, e.g. "
                                   f"{raw['__key__']} in {raw['__url__']}: {e}") from None
                continue
            if len(batch) == b:
                yield self._emit(batch, state)
                batch = []
                done += 1
                if done == n_batches:
                    return
        if batch or state.pending:
            yield self._emit(batch, state)

    def _emit(self, samples: list[dict], state: _SlotState) -> dict[str, Any]:
        out = _collate(samples, self.float_images, self.transform.members)
        out["skipped"], out["_examples"] = state.take()
        return out


# --------------------------------------------------------------------------------------------------- the loader


def _identity(x):
    return x


def _clean(e: GteError) -> GteError:
    """A GteError re-raised by the DataLoader from a worker carries the worker's traceback: keep its one line."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split("GteError: ", 1)[-1]
    return GteError(text)


class Loader:
    """Iterator over one epoch's batches of this rank; ``len()`` batches (exact in training; in evaluation an upper
    bound that bad samples can lower). ``skipped``, ``samples``, :meth:`stats` report what was read so far."""

    def __init__(self, dataset: ShardStream, dataloader: torch.utils.data.DataLoader, n_batches: int,
                 guard: BadSampleGuard, train: bool) -> None:
        self.dataset, self._dataloader, self._n, self.guard, self.train = dataset, dataloader, n_batches, guard, train
        self._it: Iterator | None = None
        self.batches = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> "Loader":
        return self

    @property
    def skipped(self) -> int:
        return self.guard.skipped

    @property
    def samples(self) -> int:
        return self.guard.samples

    def stats(self) -> dict[str, Any]:
        """``{"samples", "skipped", "bad_fraction"}`` of this rank so far (for progress bars and metrics)."""
        return {"samples": self.samples, "skipped": self.skipped, "bad_fraction": round(self.guard.fraction, 6)}

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self._dataloader)
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = _Exhausted()
                self.guard.finish()
                if self.train and self.batches != self._n:  # defensive: never hand DDP an uneven epoch silently
                    raise GteError(f"training loader gave {self.batches} batches instead of {self._n}") from None
                raise
            except GteError as e:
                raise _clean(e) from None
            examples = batch.pop("_examples", ())
            if len(batch["label"]) == 0:  # a worker's trailing counts, no samples
                self.guard.add(int(batch.get("skipped", 0)), examples)
                continue
            batch["_examples"] = examples
            self.guard.update(batch)
            del batch["_examples"]
            self.batches += 1
            return batch


class _Exhausted:
    def __next__(self):
        raise StopIteration


def make_loader(
    spec: str,
    *,
    train: bool,
    image_size: int,
    batch_size: int,
    eval_resize: int = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    num_workers: int = 0,
    shuffle_buffer: int = 2000,
    seed: int = 0,
    epoch: int = 0,
    train_size: int = 0,
    world_size: int | None = None,
    rank: int | None = None,
    max_bad_fraction: float = 0.01,
    start_batch: int = 0,
    decoder: str = "pil",
    members: tuple[str, ...] = (),
    maps: tuple[str, ...] = (),
    float_images: bool = True,
    what: str = "",
) -> Loader:
    """Batches of one epoch of this rank (see the module docstring).

    ``world_size``/``rank`` default to torch.distributed (or RANK/WORLD_SIZE). ``train_size``: samples per epoch
    (0 = count them). ``start_batch``: resume a training epoch after that many batches (they are passed over
    without decoding). ``members``: extra ``.npy`` members to return as stacked tensors. ``float_images=False``
    returns uint8 images (4× less inter-process traffic; convert on the device). ``maps``: members among
    ``members`` holding maps of the eval view (frozen e2KD) that follow the image's crop and flip (C×S×S float32).
    """
    if batch_size < 1:
        raise GteError("batch size must be >= 1")
    for name in members:
        if name.rsplit(".", 1)[-1].lower() in UNSAFE_MEMBERS:
            raise GteError(f"member '{name}' would need unpickling, which gte never does: store numeric .npy")
        if not name.endswith(".npy"):
            raise GteError(f"extra member '{name}': only .npy members are decoded")
    urls = expand_spec(spec)
    r, world = distributed_rank_world()
    rank = r if rank is None else rank
    world = world if world_size is None else world_size
    if not 0 <= rank < world:
        raise GteError(f"rank {rank} outside world size {world}")
    workers = max(0, num_workers)
    slots_per_rank = max(1, workers)
    counted = shard_counts(urls)
    counts = None if any(c is None for c in counted) else [c.n for c in counted]  # type: ignore[union-attr]
    if rank == 0:
        for url, c in zip(urls, counted):
            if c is not None and c.truncated:
                warnings.warn(f"{url}: {c.detail}; using its first {c.n} complete samples and skipping the rest",
                              DataWarning, stacklevel=2)
    what = what or ("the training data" if train else "the evaluation data")
    transform = SampleTransform(train, image_size, eval_resize, tuple(crop_scale), seed=seed, epoch=epoch,
                                decoder=decoder, members=tuple(members), maps=tuple(maps))
    if train:
        n = train_size or (sum(counts) if counts is not None else 0)
        if not n:
            if counts is None:
                raise GteError(f"cannot count the samples of remote shards in '{spec}': set data.train_size")
            raise GteError(f"no samples in {spec}")
        steps = planning.train_steps(n, batch_size, world)
        if steps == 0:
            raise GteError(f"{n} training samples make no full batch of {batch_size} × {world} processes")
        if not 0 <= start_batch <= steps:
            raise GteError(f"start_batch {start_batch} outside 0..{steps}")
        plans = planning.train_plan(urls, counts, steps=steps, batch_size=batch_size, world_size=world,
                                    workers=slots_per_rank, seed=seed, epoch=epoch)
        quotas = planning.train_quotas(steps, batch_size, world, slots_per_rank)
        n_batches = steps - start_batch
    else:
        if counts is not None and sum(counts) == 0:
            raise GteError(f"no samples in {spec}")
        plans = planning.eval_plan(urls, counts, world, slots_per_rank)
        quotas = None
        mine = plans[rank * slots_per_rank:(rank + 1) * slots_per_rank]
        if counts is not None:
            n_batches = sum(-(-sum(p.size() or 0 for p in slot) // batch_size) for slot in mine)
        else:
            n_batches = 0  # unknown for remote shards
    mine = plans[rank * slots_per_rank:(rank + 1) * slots_per_rank]
    planned = sum(p.size() or 0 for slot in mine for p in slot) if counts is not None else None
    dataset = ShardStream(plans, rank=rank, workers=slots_per_rank, batch_size=batch_size, transform=transform,
                          train=train, quotas=quotas, shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch,
                          start_batch=start_batch if train else 0, float_images=float_images)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                                             pin_memory=torch.cuda.is_available(), persistent_workers=False)
    guard = BadSampleGuard(max_bad_fraction, planned, what)
    return Loader(dataset, dataloader, n_batches, guard, train)
