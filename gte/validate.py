"""Checks across a recipe's sections, before any work (``gte distill``/``train``, ``--dry-run``, ``gte bench``).

:func:`problems` runs every check and lists what is wrong, one line each (``--dry-run`` prints them all);
:func:`validate` raises the first. Value ranges of single keys are checked when the recipe loads (:mod:`gte.config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from gte import frozen, hub
from gte.config import Recipe, range_problems
from gte.data.spec import expand_spec
from gte.errors import GteError
from gte.explainers import EXPLAINERS, choose_explainer, get
from gte.io import check_writable, is_file
from gte.methods import parse_method, uses_teacher
from gte.methods.base import parse_options
from gte.methods.features import layer_names
from gte.models import check_arch, create, hfhub, info, is_bcos, with_spec
from gte.onepass import EXP_GRADS


def validate(recipe: Recipe) -> None:
    """Fail before any work on the first thing a recipe gets wrong (one clear line)."""
    found = problems(recipe)
    if found:
        raise GteError(found[0])


def problems(recipe: Recipe) -> list[str]:
    """Every problem of ``recipe`` (empty when it can run), in the order a run would meet them."""
    out = list(range_problems(recipe))
    for check in _CHECKS:
        try:
            check(recipe)
        except GteError as e:
            out.append(str(e))
    return out


def _method(recipe: Recipe) -> None:
    d = recipe.distill
    cls, _ = parse_method(d.method)
    parse_options(cls, d.options)
    if d.exp_grad not in EXP_GRADS:
        raise GteError(f"distill.exp_grad must be {' or '.join(EXP_GRADS)}, got '{d.exp_grad}'")
    if (d.exp_topk > 1 or d.exp_student_top1) and d.frozen:
        raise GteError("distill.exp_topk / exp_student_top1 need a live teacher: frozen shards store one map")
    choose_explainer(d.explainer, False)  # the name is checked here; the choice is made where the student is known


def _student(recipe: Recipe) -> None:
    _check_arch("student", recipe.student.arch)
    if recipe.student.weights and not is_file(recipe.student.weights):
        raise GteError(f"student.weights: no such file: {recipe.student.weights}")


def _check_arch(role: str, arch: str) -> None:
    if not arch:
        raise GteError(f"{role}.arch is not set (a model name: `gte recipes` lists recipes that set one)")
    check_arch(arch)


def _teacher(recipe: Recipe) -> None:
    d = recipe.distill
    try:
        cls, explanation = parse_method(d.method)
    except GteError:  # an unknown name is _method's problem
        return
    if not uses_teacher(d.method):
        if d.frozen:
            raise GteError(f"distill.frozen needs a distillation method, not '{d.method}' (frozen teaching replaces a "
                           "teacher)")
        return
    if d.frozen and (not cls.needs.frozen or cls.needs.teacher_features):
        raise GteError(f"distill.method '{d.method}' needs the live teacher's features: it cannot run on stored "
                       "teacher outputs (distill.frozen)")
    if d.frozen:
        frozen.check_shards(recipe)
        return
    _check_arch("teacher", recipe.teacher.arch)
    if not recipe.teacher.weights and hfhub.is_hf_hub(recipe.teacher.arch):
        _hub_teacher(recipe.teacher.arch, recipe.data.num_classes)
        return
    if not recipe.teacher.weights:
        raise GteError("teacher.weights is empty: a distillation teacher must be trained")
    if not is_file(recipe.teacher.weights) and hub.resolve(recipe.teacher.weights) is None:
        # hub.resolve raises for a catalog name that is not downloaded
        raise GteError(f"teacher.weights: no such file or teacher name: {recipe.teacher.weights}")


def _hub_teacher(arch: str, n: int) -> None:
    """A Hub teacher without teacher.weights is its repo's weights: its head must be the pretrained one."""
    if (have := hfhub.repo_classes(arch)) != n:
        raise GteError(f"teacher.weights is empty and {arch} has {have} classes, data.num_classes {n}: its head would "
                       "be untrained (give teacher.weights fine-tuned for these classes)")


def _explainer_pair(recipe: Recipe) -> None:
    """B-cos explanations need a B-cos teacher as well as a B-cos student (e2KD compares W(x) of both)."""
    d, s, t = recipe.distill, recipe.student.arch, recipe.teacher.arch
    if not _explained(d.method) or d.frozen or not s or not t:
        return
    if d.explainer not in ("auto", *EXPLAINERS):  # an unknown name is _method's problem
        return
    explainer = choose_explainer(d.explainer, is_bcos(s))
    if get(explainer).needs_bcos and not is_bcos(t):
        raise GteError(f"e2KD with B-cos explanations needs a B-cos teacher too; {t} is a standard network "
                       "(use a bcos_* teacher, or distill.explainer = 'gradcam')")
    if recipe.run.compile_teacher:
        check_compilable_teacher(recipe)


def _explained(method: str) -> bool:
    try:
        return parse_method(method)[1]
    except GteError:
        return False


def _layers(recipe: Recipe) -> None:
    """The layers a feature method taps exist in both models (checked on parameter-free 'meta' copies)."""
    d = recipe.distill
    try:
        cls, _ = parse_method(d.method)
    except GteError:
        return
    n = cls.needs
    gradcam = _explained(d.method) and d.explainer in ("auto", *EXPLAINERS) and \
        choose_explainer(d.explainer, is_bcos(recipe.student.arch)) == "gradcam"
    live_teacher = uses_teacher(d.method) and not d.frozen
    roles = [("student", recipe.student, n.student_features, d.student_layers, True),
             ("teacher", recipe.teacher, n.teacher_features if n.teacher else "", d.teacher_layers, live_teacher)]
    for role, model_cfg, which, override, used in roles:
        try:
            check_arch(model_cfg.arch)
        except GteError:  # an unknown or missing name is _student's / _teacher's problem
            continue
        if not (which or (used and (model_cfg.explain_layer or gradcam))):
            continue
        with torch.device("meta"):
            model = create(model_cfg.arch, max(2, recipe.data.num_classes))
        if which:
            layer_names(model, which, override, role)
        if used and model_cfg.explain_layer:
            try:
                with_spec(model, gradcam_layer=model_cfg.explain_layer)
            except GteError as e:
                raise GteError(f"{role}.explain_layer: {e}") from None
            if role == "student" and gradcam:  # trained through its CAM: a random-weight copy takes the 2nd derivative
                real = with_spec(create(model_cfg.arch, max(2, recipe.data.num_classes)),
                                 gradcam_layer=model_cfg.explain_layer)
                get("gradcam").check_student(real)
        elif used and gradcam and info(model).gradcam_layer is None:
            raise GteError(f"{role} {model_cfg.arch} has no GradCAM layer gte can find: name one with "
                           f"{role}.explain_layer (a module whose output is a feature map or patch tokens)")


def _run(recipe: Recipe) -> None:
    out = Path(recipe.run.out)
    if out.exists() and not out.is_dir():
        raise GteError(f"run.out {out} is a file, not a directory (choose another --out)")
    check_writable(out, "run.out")
    if recipe.run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise GteError("run.mixed_precision = 'fp16' needs a GPU (use 'bf16' on CPU)")


def _data(recipe: Recipe) -> None:
    if not recipe.data.train:
        raise GteError("data.train is not set (a shard spec: braces, globs or a directory)")
    expand_spec(recipe.data.train)


def _eval_data(recipe: Recipe) -> None:
    for spec in (recipe.data.val, recipe.data.test):
        if spec:
            expand_spec(spec)


_CHECKS: tuple[Callable[[Recipe], None], ...] = (_method, _student, _teacher, _explainer_pair, _layers, _run, _data,
                                                  _eval_data)


def check_compilable_teacher(recipe: Recipe) -> None:
    """``run.compile_teacher`` with explanations: only B-cos W(x) (call after ``check_arch(student.arch)``)."""
    if choose_explainer(recipe.distill.explainer, is_bcos(recipe.student.arch)) == "gradcam":
        raise GteError("run.compile_teacher needs B-cos explanations: GradCAM's per-call hooks would make "
                       "torch.compile recompile the teacher every guided step")
