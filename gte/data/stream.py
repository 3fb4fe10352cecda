"""One rank's batches, read by DataLoader workers: each (rank, worker) slot streams its pieces of the plan.

Training repeats the slot's range, each pass shuffled on its own (so one pass never repeats a sample), until the
slot's quota of batches is delivered; evaluation reads it once, in order. Shard order, range boundaries and shuffle
buffers are seeded by (seed, epoch). Read problems and undecodable samples are counted per slot and shipped to the
main process inside the batches (gte.data.guard decides when they stop the run).
"""

from __future__ import annotations

import itertools
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from gte.data import plan as planning
from gte.data.guard import MAX_EXAMPLES, DataWarning
from gte.data.plan import Piece
from gte.data.tar import ReadProblem, iter_samples
from gte.data.transforms import BadSample, SampleTransform
from gte.errors import GteError


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
    if samples and "index" in samples[0]:
        out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
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
                 epoch: int, start_batch: int = 0, float_images: bool = True,
                 offsets: dict[str, int] | None = None) -> None:
        super().__init__()
        self.plans, self.rank, self.workers, self.batch_size = plans, rank, workers, batch_size
        self.transform, self.train, self.quotas = transform, train, quotas
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.start_batch, self.float_images = start_batch, float_images
        self.offsets = offsets  # shard URL -> index of its first sample in the set (per-sample indices), or None

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
                sample = self.transform(raw, repeat)
                if self.offsets is not None:
                    sample["index"] = self.offsets[raw["__url__"]] + raw["__index__"]
                batch.append(sample)
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
