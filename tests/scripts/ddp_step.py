"""Run a few e2KD optimiser steps on fixed global batches; used by tests/test_scale.py.

Launched either as one process with grad_accum = 2, or under torchrun with 2 processes and grad_accum = 1: each rank
(or micro-batch) takes its half of every global batch, so both see the same global batch per step.
usage: ddp_step.py OUT.safetensors TEACHER.safetensors ACCUM
"""

import sys

import torch

from gte.config import from_dict
from gte.engine import StopFlags, setup
from gte.models import save_model

out, teacher_path, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
recipe = from_dict({"data": {"num_classes": 4, "image_size": 32},
                    "student": {"arch": "bcos_cifar_resnet20"},
                    "teacher": {"arch": "bcos_cifar_resnet20", "weights": teacher_path},
                    "optim": {"batch_size": 4, "grad_accum": accum, "epochs": 1, "warmup_epochs": 0},
                    "distill": {"method": "e2kd", "lambda_exp": 5.0}, "run": {"seed": 0}})
engine = setup(recipe, n_train=24)  # the same training setup `gte distill` uses
g = torch.Generator().manual_seed(123)
flags = StopFlags()
for step in range(3):
    images, labels = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    if engine.accelerator.num_processes > 1:  # rank r takes half r of the global batch
        r = engine.accelerator.process_index
        parts = [(images[4 * r:4 * r + 4], labels[4 * r:4 * r + 4])]
    else:  # micro-batch j is what rank j would take
        parts = [(images[4 * j:4 * j + 4], labels[4 * j:4 * j + 4]) for j in range(2)]
    batches = iter([{"image": x, "label": y} for x, y in parts])
    engine.accumulate(batches, step, flags)
    engine.update()
flags.restore()
if engine.accelerator.is_main_process:
    save_model(engine.model(), out)
