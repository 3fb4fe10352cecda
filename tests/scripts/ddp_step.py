"""Run a few e2KD optimiser steps on fixed global batches; used by tests/test_scale.py.

Launched either as one process with grad_accum = 2, or under torchrun with 2 processes and grad_accum = 1: each rank
(or micro-batch) takes its half of every global batch, so both see the same global batch per step.
usage: ddp_step.py OUT.safetensors TEACHER.safetensors ACCUM
"""

import sys

import torch

from gte.config import from_dict
from gte.methods import build_method
from gte.models import build_model, freeze, load_model, save_model
from gte.optim import apply_update, build_optimizer
from gte.train import StopFlags, accumulate_gradients, make_accelerator

out, teacher_path, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
recipe = from_dict({"data": {"num_classes": 4, "image_size": 32}, "optim": {"batch_size": 4, "grad_accum": accum},
                    "distill": {"method": "e2kd", "lambda_exp": 5.0}, "run": {"seed": 0}})
acc = make_accelerator(recipe)
torch.manual_seed(0)
student = build_model("bcos_cifar_resnet20", 4)
teacher = freeze(load_model(teacher_path)).to(acc.device)
optimizer = build_optimizer(recipe, student.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
student, optimizer = acc.prepare(student, optimizer)
method = build_method(recipe.distill, student, teacher)
g = torch.Generator().manual_seed(123)
flags = StopFlags()
for step in range(3):
    images, labels = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    if acc.num_processes > 1:  # rank r takes half r of the global batch
        r = acc.process_index
        parts = [(images[4 * r:4 * r + 4], labels[4 * r:4 * r + 4])]
    else:  # micro-batch j is what rank j would take
        parts = [(images[4 * j:4 * j + 4], labels[4 * j:4 * j + 4]) for j in range(2)]
    batches = iter([{"image": x, "label": y} for x, y in parts])
    accumulate_gradients(acc, method, student, batches, recipe, step, flags)
    apply_update(acc, student, optimizer, scheduler, "agc", 0.01)
flags.restore()
if acc.is_main_process:
    save_model(acc.unwrap_model(student), out)
