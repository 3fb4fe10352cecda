"""Run a few e2KD optimiser steps on fixed global batches; used by tests/test_scale.py.

Launched either as one process with grad_accum = 2, or under torchrun with 2 processes and grad_accum = 1: each rank
(or micro-batch) takes its half of every global batch, so both see the same global batch per step.
usage: ddp_step.py OUT.safetensors TEACHER.safetensors ACCUM [METHOD]
With METHOD (default e2kd), each rank also writes its method's state (CRD: the memory) to OUT.rank<r>.method.
"""

import sys

import torch

from gte.config import from_dict
from gte.engine import StopFlags, setup
from gte.models import save_model
from safetensors.torch import save_file

out, teacher_path, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
method = sys.argv[4] if len(sys.argv) > 4 else "e2kd"
recipe = from_dict({"data": {"num_classes": 4, "image_size": 32},
                    "student": {"arch": "bcos_cifar_resnet20"},
                    "teacher": {"arch": "bcos_cifar_resnet20", "weights": teacher_path},
                    "optim": {"batch_size": 4, "grad_accum": accum, "epochs": 1, "warmup_epochs": 0},
                    "distill": {"method": method, "lambda_exp": 5.0,
                                "options": {"nce_k": 16} if method.startswith("crd") else {}},
                    "run": {"seed": 0}})
engine = setup(recipe, n_train=24)  # the same training setup `gte distill` uses
g = torch.Generator().manual_seed(123)
flags = StopFlags()
for step in range(3):
    images, labels = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    index = torch.arange(8 * step, 8 * step + 8)
    if engine.accelerator.num_processes > 1:  # rank r takes half r of the global batch
        r = engine.accelerator.process_index
        halves = [slice(4 * r, 4 * r + 4)]
    else:  # micro-batch j is what rank j would take
        halves = [slice(4 * j, 4 * j + 4) for j in range(2)]
    batches = iter([{"image": images[h], "label": labels[h], "index": index[h]} for h in halves])
    engine.accumulate(batches, step, flags)
    engine.update()
flags.restore()
if engine.accelerator.is_main_process:
    save_model(engine.model(), out)
state = engine.method.state_dict()
if state:
    save_file(state, f"{out}.rank{engine.accelerator.process_index}.method")
