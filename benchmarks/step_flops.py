"""Convolution and matrix-product FLOPs of one training step per method (forward + backward), per image, counted by
``torch.utils.flop_counter.FlopCounterMode`` on gte bench's pair: the work a method cannot avoid, next to the times
``gte bench`` measures (e.g. ReviewKD's fusion modules at 224²).

    python benchmarks/step_flops.py [--recipe benchmarks/e2kd_step.toml] [--methods ce,kd,dkd,dist,reviewkd]

Explanation steps (e2KD) are not countable this way: the counter's hooks refuse ``autograd.grad`` inside a backward.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from gte.config import DistillConfig, load_recipe
from gte.engine import build_models
from gte.methods import Batch, Context, build_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="benchmarks/e2kd_step.toml")
    ap.add_argument("--methods", default="ce,kd,dkd,dist,at,reviewkd")
    ap.add_argument("--batch", type=int, default=2, help="FLOPs per image do not depend on it")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    torch.manual_seed(0)
    student, teacher = build_models(recipe, pretrained=False, teacher=True)
    student.train()
    size = recipe.data.image_size
    images = torch.rand(args.batch, 3, size, size)
    labels = torch.randint(0, recipe.data.num_classes, (args.batch,))
    context = Context(n_data=1024, image_size=size)
    flops = {}
    for name in args.methods.split(","):
        method = build_method(DistillConfig(method=name), student, None if name == "ce" else teacher, context)
        with FlopCounterMode(display=False) as counter:
            method.loss(Batch(images, labels, indices=torch.arange(args.batch)))[0].backward()
        student.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops() / args.batch / 1e9
    kd = flops.get("kd")
    print(f"{recipe.student.arch} ← {recipe.teacher.arch}, {size}², GFLOP per image and step (forward + backward)")
    for name, f in flops.items():
        print(f"{name:10s} {f:7.2f}" + (f"   {f / kd:.2f}× KD" if kd else ""))


if __name__ == "__main__":
    main()
