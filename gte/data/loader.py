"""Streaming WebDataset shards (design.md format) into batches, exactly split over ranks × DataLoader workers.

``make_loader(data, train=…, image_size=…, batch_size=…, …)`` returns a :class:`Loader`: an iterator of batches
``{"image": N×3×S×S float in [0, 1], "label": N, "group": N (-1 = none), "key": [str], "labels", "boxes",
"box_labels": per-sample lists (None where the json lacks them), "skipped": int}`` with ``len(loader)`` batches.
``data`` is a spec or a :class:`~gte.data.index.ShardSet` resolved once; the settings that stay the same every epoch
form a :class:`LoaderConfig`.

Who reads what (details in gte.data.plan): every process of a launch builds the same plan; each (rank, worker) *slot*
reads its own part (gte.data.stream). **Evaluation**: every sample exactly once over all ranks and workers, whatever
the number and sizes of shards (also with fewer shards than slots). Each rank gets only its share — gather or
all-reduce sums across ranks, or pass ``world_size=1, rank=0`` to read everything in one process. **Training**: every
rank yields exactly ``len(loader) = floor(N / (world · batch))`` full batches per epoch (no DDP hang), ``N`` =
``train_size`` or the number of samples counted from tar headers; shard order, range boundaries and shuffle buffers
are seeded by (seed, epoch) and change every epoch; each epoch reads ``world · steps · batch`` distinct samples (up
to the ``< world · batch`` remainder, which moves every epoch).

Bad data is skipped, counted and bounded (gte.data.guard).

Never unpickled: only the image, ``cls``, ``json`` and requested ``.npy`` members (``allow_pickle=False``) are decoded;
``.pth``/pickle members are refused.
"""

from __future__ import annotations

import signal
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch

from gte import dist
from gte.data import plan as planning
from gte.data.guard import BadSampleGuard, DataWarning
from gte.data.index import ShardSet, count_samples, resolve_shards
from gte.data.plan import Piece
from gte.data.stream import ShardStream
from gte.data.transforms import SampleTransform
from gte.errors import GteError

UNSAFE_MEMBERS = ("pth", "pt", "pickle", "pkl", "pyd", "npz")


@dataclass(frozen=True)
class LoaderConfig:
    """How samples become batches: the loader settings that stay the same from epoch to epoch.

    ``train_size``: samples per epoch (0 = count them). ``members``: extra ``.npy`` members to return as stacked
    tensors. ``maps``: members among ``members`` holding maps of the eval view (frozen e2KD) that follow the image's
    crop and flip (C×S×S float32). ``float_images=False`` returns uint8 images (4× less inter-process traffic;
    convert on the device). ``indices``: each batch carries ``index``, every sample's position in the whole shard set
    (0..N-1, shards in spec order; methods with a per-sample memory, e.g. CRD). ``reduced_decode``: decode JPEGs at
    the smallest DCT scale the sample's crop allows, keeping ≥ ``decode_margin`` decoded pixels per output pixel
    (gte.data.transforms; False = always full size).
    """

    image_size: int
    batch_size: int
    eval_resize: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bilinear"
    num_workers: int = 0
    shuffle_buffer: int = 2000
    seed: int = 0
    train_size: int = 0
    max_bad_fraction: float = 0.01
    decoder: str = "pil"
    reduced_decode: bool = True
    decode_margin: float = 2.0
    members: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    float_images: bool = True
    indices: bool = False


def steps_per_epoch(data: str | ShardSet, batch_size: int, world_size: int | None = None, train_size: int = 0) -> int:
    """Steps per epoch every rank runs: ``floor(N / (world · batch))`` (N = ``train_size`` or the counted samples;
    ``world_size`` defaults to this launch's)."""
    world = world_size if world_size is not None else dist.world_size()
    n = train_size or count_samples(data)
    return planning.train_steps(n, batch_size, world)


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


def make_loader(data: str | ShardSet, config: LoaderConfig | None = None, *, train: bool, epoch: int = 0,
                start_batch: int = 0, world_size: int | None = None, rank: int | None = None, what: str = "",
                **settings: Any) -> Loader:
    """Batches of one epoch of this rank (see the module docstring).

    ``config`` and ``settings`` (:class:`LoaderConfig` fields, overriding ``config``'s) say how samples become
    batches. ``world_size``/``rank`` default to this process's (gte.dist: torch.distributed, else RANK /
    WORLD_SIZE). ``start_batch``: resume a training epoch after that many batches (they are passed over without
    decoding). ``what`` names the data in error messages.
    """
    c = replace(config, **settings) if config is not None else LoaderConfig(**settings)
    if c.batch_size < 1:
        raise GteError("batch size must be >= 1")
    _check_members(c.members)
    shards = resolve_shards(data)
    r, world = dist.rank_world()
    rank = r if rank is None else rank
    world = world if world_size is None else world_size
    if not 0 <= rank < world:
        raise GteError(f"rank {rank} outside world size {world}")
    workers = max(0, c.num_workers)
    slots = max(1, workers)  # slots per rank
    if rank == 0:
        _warn_truncated(shards)
    transform = SampleTransform(train, c.image_size, c.eval_resize, tuple(c.crop_scale), seed=c.seed, epoch=epoch,
                                decoder=c.decoder, members=tuple(c.members), maps=tuple(c.maps),
                                interpolation=c.interpolation, reduced_decode=c.reduced_decode,
                                decode_margin=c.decode_margin)
    sizes = shards.sizes
    quotas = None
    if train:
        steps = _train_steps(shards, c, world, start_batch)
        plans = planning.train_plan(shards.urls, sizes, steps=steps, batch_size=c.batch_size, world_size=world,
                                    workers=slots, seed=c.seed, epoch=epoch)
        quotas = planning.train_quotas(steps, c.batch_size, world, slots)
    else:
        if sizes is not None and sum(sizes) == 0:
            raise GteError(f"no samples in {shards.spec}")
        plans = planning.eval_plan(shards.urls, sizes, world, slots)
    mine = plans[rank * slots:(rank + 1) * slots]
    if train:
        n_batches = steps - start_batch
    else:  # unknown (0) for remote shards
        n_batches = _eval_batches(mine, c.batch_size) if sizes is not None else 0
    planned = sum(p.size() or 0 for slot in mine for p in slot) if sizes is not None else None
    dataset = ShardStream(plans, rank=rank, workers=slots, batch_size=c.batch_size, transform=transform,
                          train=train, quotas=quotas, shuffle_buffer=c.shuffle_buffer, seed=c.seed, epoch=epoch,
                          start_batch=start_batch if train else 0, float_images=c.float_images,
                          offsets=_offsets(shards) if c.indices else None)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                                             pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                             worker_init_fn=ignore_stop_signals if workers else None)
    guard = BadSampleGuard(c.max_bad_fraction, planned,
                           what or ("the training data" if train else "the evaluation data"))
    return Loader(dataset, dataloader, n_batches, guard, train)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker ignores SIGINT and SIGTERM: a stop sent to the whole process group (Ctrl-C, ``timeout``,
    SLURM's preemption and ``scancel``, systemd) is the main process's to act on — it finishes the step, saves a
    checkpoint and shuts its workers down. A worker ended by the signal instead makes PyTorch's SIGCHLD handler raise
    in the main process in the middle of the step ("DataLoader worker … is killed by signal"), before any checkpoint.
    Workers still exit when the main process goes (the DataLoader's shutdown, and its watchdog of the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _offsets(shards: ShardSet) -> dict[str, int]:
    """Index of each shard's first sample in the whole set (shards in spec order)."""
    sizes = shards.sizes
    if sizes is None:
        raise GteError(f"per-sample indices need local shards whose samples gte can count, not '{shards.spec}'")
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    return dict(zip(shards.urls, starts))


def _check_members(members: tuple[str, ...]) -> None:
    for name in members:
        if name.rsplit(".", 1)[-1].lower() in UNSAFE_MEMBERS:
            raise GteError(f"member '{name}' would need unpickling, which gte never does: store numeric .npy")
        if not name.endswith(".npy"):
            raise GteError(f"extra member '{name}': only .npy members are decoded")


def _warn_truncated(shards: ShardSet) -> None:
    for url, c in zip(shards.urls, shards.counts):
        if c is not None and c.truncated:
            warnings.warn(f"{url}: {c.detail}; using its first {c.n} complete samples and skipping the rest",
                          DataWarning, stacklevel=3)


def _train_steps(shards: ShardSet, c: LoaderConfig, world: int, start_batch: int) -> int:
    """Steps of this training epoch (checked: at least one full batch, ``start_batch`` inside the epoch)."""
    n = c.train_size or count_samples(shards)
    if not n:
        raise GteError(f"no samples in {shards.spec}")
    steps = planning.train_steps(n, c.batch_size, world)
    if steps == 0:
        raise GteError(f"{n} training samples make no full batch of {c.batch_size} × {world} processes")
    if not 0 <= start_batch <= steps:
        raise GteError(f"start_batch {start_batch} outside 0..{steps}")
    return steps


def _eval_batches(mine: list[list[Piece]], batch_size: int) -> int:
    """Batches this rank's slots yield at most (each slot ends with a partial batch)."""
    return sum(-(-sum(p.size() or 0 for p in slot) // batch_size) for slot in mine)
