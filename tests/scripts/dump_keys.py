"""One epoch of the loader on this rank, under torchrun; used by tests/test_data_loader.py.

usage: dump_keys.py SPEC OUT_DIR MODE WORKERS BATCH [EPOCH]
Training steps all-reduce once per batch like DDP (uneven step counts would hang); writes ``OUT_DIR/rank<r>.json``
with the keys seen, the batch count and the skipped count.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gte.data.loader import make_loader

spec, out, mode, workers, batch = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
epoch = int(sys.argv[6]) if len(sys.argv) > 6 else 0
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
loader = make_loader(spec, train=mode == "train", image_size=16, batch_size=batch, num_workers=workers,
                     shuffle_buffer=50, seed=7, epoch=epoch)
keys, batches = [], 0
for b in loader:
    keys.extend(b["key"])
    batches += 1
    if world > 1 and mode == "train":
        dist.all_reduce(torch.ones(1))
if world > 1:
    dist.barrier()
(out / f"rank{rank}.json").write_text(json.dumps({"keys": keys, "batches": batches, "len": len(loader),
                                                  "skipped": loader.skipped}))
if world > 1:
    dist.destroy_process_group()
