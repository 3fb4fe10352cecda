"""Section "correctness" of ``gte bench --suite gpu``: does gte's e2KD step compute the same thing on the device, and
does it train in bf16 and fp16?

- **step**: one e2KD step (loss and backward; B-cos student with W(x), standard student with GradCAM) on the device
  equals the same step on the CPU, from the same weights and batch, in fp32 with TF32 off while it runs. Measure: the
  worst, over the student's parameters, of ``‖g_device − g_cpu‖ / ‖g_cpu‖`` (:func:`relative_error`); pass at
  ≤ 1e-4. A *control* step, the same but with one weight tensor of the student moved by 1 % of its norm, must fail
  the same comparison: the check compares something.
- **bf16**: gte's training engine (Accelerate, ``run.mixed_precision = "bf16"``) for N optimiser steps on one fixed
  random batch: every loss finite and the explanation term lower over the last tenth of the steps than over the first.
- **fp16**: the same with ``run.mixed_precision = "fp16"``: Accelerate's GradScaler scales the loss, skips the steps
  whose gradients overflowed and lowers its scale; reported are the scale, the skipped steps and the losses; pass when
  every loss is finite, the final scale finite and some step not skipped. CUDA only: on CPU Accelerate runs "fp16"
  without a scaler, in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import torch
import torch.nn as nn

from gte.config import Recipe, from_dict
from gte.engine import StopFlags, build_models, setup
from gte.errors import GteError
from gte.methods import Batch, Context, build_method

TOLERANCE = 1e-4  # the bound, for gradients (this section) and weights after 3 steps (section "ddp")


def pair_recipe(teacher: str, student: str, size: int, classes: int, **sections: dict) -> Recipe:
    """An e2KD recipe for randomly initialised ``teacher`` → ``student`` at ``size``² (the explainer the student's
    own: W(x) for B-cos, GradCAM otherwise); ``sections`` add keys, e.g. ``optim={"batch_size": 8}``."""
    raw: dict[str, Any] = {"data": {"num_classes": classes, "image_size": size}, "teacher": {"arch": teacher},
                           "student": {"arch": student}, "distill": {"method": "e2kd"}}
    for name, keys in sections.items():
        raw[name] = {**raw.get(name, {}), **keys}
    return from_dict(raw)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for CUDA convolutions and matmuls (cuDNN convolutions default to TF32, ~1e-3 relative)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    old = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = old


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``rel``: the worst ``‖got − want‖ / ‖want‖`` over the tensors of ``want`` (``worst_parameter``: which, "" if
    all are equal); ``rel_all``: the same over all tensors as one vector. A tensor missing from ``got`` or of another
    shape counts as infinitely wrong, 0/0 as equal."""
    worst, where, diff2, norm2 = 0.0, "", 0.0, 0.0
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            return {"rel": math.inf, "worst_parameter": name, "rel_all": math.inf}
        diff, norm = float((g.double() - w.double()).norm()), float(w.double().norm())
        diff2, norm2 = diff2 + diff**2, norm2 + norm**2
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
        if rel > worst:
            worst, where = rel, name
    rel_all = math.sqrt(diff2 / norm2) if norm2 > 0 else (0.0 if diff2 == 0 else math.inf)
    return {"rel": worst, "worst_parameter": where, "rel_all": rel_all}


def step_gradients(student: nn.Module, teacher: nn.Module, recipe: Recipe, images: torch.Tensor,
                   labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, the student's parameter gradients on the CPU) of one e2KD step of ``recipe``'s method."""
    method = build_method(recipe.distill, student, teacher, Context(n_data=len(images), image_size=images.shape[-1]))
    loss, _ = method.loss(Batch(images, labels, 0, indices=torch.arange(len(images))))  # indices stay on the host
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def perturbed(model: nn.Module, scale: float = 0.01) -> nn.Module:
    """A copy of ``model`` whose first weight tensor is moved by ``scale`` of its norm (a fixed random direction)."""
    out = copy.deepcopy(model)
    weight = next(p for n, p in out.named_parameters() if p.ndim > 1)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(weight)
    with torch.no_grad():
        weight += scale * weight.norm() * direction / direction.norm()
    return out


def device_step(teacher_arch: str, student_arch: str, *, size: int, batch: int, classes: int,
                device: torch.device) -> dict[str, Any]:
    """One e2KD step on ``device`` against the CPU, and the control (see the module docstring)."""
    recipe = pair_recipe(teacher_arch, student_arch, size, classes)
    torch.manual_seed(0)
    student, teacher = build_models(recipe, pretrained=False, teacher=True)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)
    with exact_fp32():
        cpu_loss, want = step_gradients(copy.deepcopy(student).train(), teacher, recipe, images, labels)
        dev_teacher = copy.deepcopy(teacher).to(device)
        x, y = images.to(device), labels.to(device)
        dev_loss, got = step_gradients(copy.deepcopy(student).to(device).train(), dev_teacher, recipe, x, y)
        control_loss, control = step_gradients(perturbed(student).to(device).train(), dev_teacher, recipe, x, y)
    error = relative_error(got, want)
    control_rel = relative_error(control, want)["rel"]
    return {"name": f"e2KD step {student_arch} ← {teacher_arch}, {device.type} vs cpu",
            "explainer": "bcos" if student_arch.startswith("bcos") else "gradcam",
            "status": "pass" if error["rel"] <= TOLERANCE and control_rel > TOLERANCE else "fail",
            "measure": "max over parameters of |g_device - g_cpu| / |g_cpu| (fp32, TF32 off); rel_all: over all "
                       "parameters as one vector",
            **error, "tolerance": TOLERANCE, "loss_device": dev_loss, "loss_cpu": cpu_loss,
            "parameters_compared": len(want), "batch": batch, "image_size": size,
            "control": {"what": "one weight tensor of the student moved by 1 % of its norm", "rel": control_rel,
                        "loss": control_loss, "detected": control_rel > TOLERANCE}}


def train_fixed_batch(teacher_arch: str, student_arch: str, *, size: int, batch: int, classes: int, steps: int,
                      precision: str) -> dict[str, Any]:
    """``steps`` optimiser steps of gte's engine with ``run.mixed_precision = precision`` on one fixed random batch
    (losses, explanation terms, the loss scaler's scale and skipped steps where there is one)."""
    recipe = pair_recipe(teacher_arch, student_arch, size, classes,
                         optim={"batch_size": batch, "epochs": 1, "warmup_epochs": 0},
                         run={"seed": 0, "mixed_precision": precision})
    engine = setup(recipe, n_train=batch * steps)
    acc = engine.accelerator
    g = torch.Generator().manual_seed(0)
    item = {"image": torch.rand(batch, 3, size, size, generator=g),
            "label": torch.randint(0, classes, (batch,), generator=g), "index": torch.arange(batch)}
    losses, exp, scales, skipped, error = [], [], [], [], None
    flags = StopFlags()
    try:
        for step in range(steps):
            logs, _ = engine.accumulate(iter([item]), step, flags)
            engine.update()
            losses.append(float(logs["loss"]))
            exp.append(float(logs["exp"]))
            if acc.scaler is not None:
                scales.append(float(acc.scaler.get_scale()))
                if acc.optimizer_step_was_skipped:
                    skipped.append(step)
    except GteError as e:  # a non-finite loss stops the engine: that is this check failing
        error = str(e)
    finally:
        flags.restore()
    k = max(1, len(exp) // 10)
    falls = len(exp) >= 2 and sum(exp[-k:]) / k < sum(exp[:k]) / k
    out: dict[str, Any] = {
        "name": f"{precision} training {student_arch} ← {teacher_arch}, {steps} steps on one random batch",
        "precision": precision, "device": acc.device.type, "steps": steps, "batch": batch, "image_size": size,
        "loss": losses, "explanation_loss": exp, "error": error,
        "all_finite": error is None and all(math.isfinite(v) for v in losses + exp),
        "explanation_loss_falls": falls}
    if precision == "fp16":  # what is asked of fp16: no silent overflow (its explanation loss is reported)
        out.update(scaler=acc.scaler is not None, scale=scales, skipped_steps=skipped)
        ok = out["all_finite"] and acc.scaler is not None and bool(scales) and math.isfinite(scales[-1]) \
            and scales[-1] > 0 and len(skipped) < steps
    else:
        ok = out["all_finite"] and falls
    out["status"] = "pass" if ok else "fail"
    return out
