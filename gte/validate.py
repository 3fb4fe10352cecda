"""Checks across a recipe's sections, before any work (``gte distill``/``train``, ``--dry-run``, ``gte bench``):
each thing a recipe gets wrong fails here with one clear line. Per-key type checks live in :mod:`gte.config`."""

from __future__ import annotations

from pathlib import Path

import torch

from gte import frozen, hub
from gte.config import Recipe
from gte.data.spec import expand_spec
from gte.errors import GteError
from gte.explain import choose_explainer
from gte.methods import METHODS
from gte.models import REGISTRY, check_arch
from gte.onepass import EXP_GRADS


def validate(recipe: Recipe) -> None:
    """Fail before any work on what a recipe gets wrong (one clear line each)."""
    d = recipe.distill
    if d.method not in METHODS:
        raise GteError(f"unknown distill.method '{d.method}' (known: {', '.join(METHODS)})")
    check_arch(recipe.student.arch)
    if d.exp_grad not in EXP_GRADS:
        raise GteError(f"distill.exp_grad must be {' or '.join(EXP_GRADS)}, got '{d.exp_grad}'")
    if d.exp_topk < 1 or d.exp_norm_weight < 0:
        raise GteError("distill.exp_topk must be >= 1 and distill.exp_norm_weight >= 0")
    if (d.exp_topk > 1 or d.exp_student_top1) and d.frozen:
        raise GteError("distill.exp_topk / exp_student_top1 need a live teacher: frozen shards store one map")
    if d.frozen:
        if not METHODS[d.method].needs_teacher:
            raise GteError(f"distill.frozen needs method kd or e2kd, not '{d.method}' (frozen teaching replaces a "
                           "teacher)")
        frozen.check_shards(recipe)
    elif METHODS[d.method].needs_teacher:
        _check_teacher(recipe)
    if recipe.student.weights and not Path(recipe.student.weights).is_file():
        raise GteError(f"student.weights: no such file: {recipe.student.weights}")
    choose_explainer(d.explainer, False)  # the name is checked here; the choice is made where the student is known
    if d.guided_every < 1:
        raise GteError("distill.guided_every must be >= 1")
    if recipe.run.compile_teacher and d.method == "e2kd" and not d.frozen:
        check_compilable_teacher(recipe)
    _check_run_and_optim(recipe)
    expand_spec(recipe.data.train)
    for spec in (recipe.data.val, recipe.data.test):
        if spec:
            expand_spec(spec)


def _check_teacher(recipe: Recipe) -> None:
    check_arch(recipe.teacher.arch)
    if not recipe.teacher.weights:
        raise GteError("teacher.weights is empty: a distillation teacher must be trained")
    if not Path(recipe.teacher.weights).is_file() and hub.resolve(recipe.teacher.weights) is None:
        # hub.resolve raises for a catalog name that is not downloaded
        raise GteError(f"teacher.weights: no such file or teacher name: {recipe.teacher.weights}")


def _check_run_and_optim(recipe: Recipe) -> None:
    if recipe.run.mixed_precision not in ("no", "bf16", "fp16"):
        raise GteError(f"run.mixed_precision must be no, bf16 or fp16, got '{recipe.run.mixed_precision}'")
    if recipe.run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise GteError("run.mixed_precision = 'fp16' needs a GPU (use 'bf16' on CPU)")
    if recipe.optim.grad_accum < 1 or recipe.optim.batch_size < 1:
        raise GteError("optim.batch_size and optim.grad_accum must be >= 1")
    if recipe.optim.clip not in ("auto", "agc", "norm", "none"):
        raise GteError(f"optim.clip must be auto, agc, norm or none, got '{recipe.optim.clip}'")


def check_compilable_teacher(recipe: Recipe) -> None:
    """``run.compile_teacher`` with explanations: only B-cos W(x) (call after ``check_arch(student.arch)``)."""
    if choose_explainer(recipe.distill.explainer, REGISTRY[recipe.student.arch][1]) == "gradcam":
        raise GteError("run.compile_teacher needs B-cos explanations: GradCAM's per-call hooks would make "
                       "torch.compile recompile the teacher every guided step")
