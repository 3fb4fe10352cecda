"""Which process am I, and the few collectives gte needs — answered here only.

Inside a launch (torchrun, ``accelerate launch``) a process reads its identity from the process group once it is
initialised, and from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) before that (e.g. while
the loader plans shards). Outside a launch it is rank 0 of 1.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _td():
    import torch.distributed as td  # here: light commands (a recipe's one-line error) never need torch's import

    return td


def initialized() -> bool:
    """True when a torch.distributed process group is up (never before torch.distributed was imported)."""
    td = sys.modules.get("torch.distributed")
    return td is not None and td.is_available() and td.is_initialized()


def rank() -> int:
    """Global rank of this process."""
    return _td().get_rank() if initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes in this launch."""
    return _td().get_world_size() if initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank_world() -> tuple[int, int]:
    """(rank, world size)."""
    return rank(), world_size()


def group_rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one: the processes collectives span (evaluation
    splits its data by this, so that a process outside any group still counts every sample)."""
    return (_td().get_rank(), _td().get_world_size()) if initialized() else (0, 1)


def local_rank() -> int:
    """Rank on this machine (selects the GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on global rank 0."""
    return rank() == 0


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``), whether or not they joined a process group yet."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    """This process's device: its local GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def init_process_group() -> None:
    """Join the launch's process group when launched with several processes (no-op otherwise or when joined)."""
    if launched_world_size() > 1 and not initialized():
        import torch

        td = _td()
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def gather_object(obj: object) -> list:
    """``[obj of rank 0, obj of rank 1, …]`` (``[obj]`` in a single process)."""
    if not initialized() or _td().get_world_size() == 1:
        return [obj]
    td = _td()
    out: list = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """Sum ``sums`` over ranks (keys may differ between ranks: a group seen by one rank only)."""
    if not initialized() or _td().get_world_size() == 1:
        return dict(sums)
    import torch

    td = _td()
    keys = sorted(set().union(*gather_object(sorted(sums))))
    vec = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if td.get_backend() == "nccl":
        vec = vec.cuda()
    td.all_reduce(vec)
    return dict(zip(keys, vec.cpu().tolist()))


def parent_args() -> list[str]:
    """The command line of the process that started this one ([] where /proc cannot tell): how gte recognises the
    launcher it runs under (``accelerate launch``'s single-process one, for its errors and its ``--num_processes``)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return []
