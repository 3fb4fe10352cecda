"""Training methods behind one interface: ``method.loss(batch) -> (loss, logs)`` (:mod:`gte.methods.base`).

``distill.method`` names a registered method; the suffix ``+e2kd`` adds the e2KD explanation term to any method
that uses a teacher (``crd+e2kd``); ``e2kd`` is KD + explanation and ``kd`` is plain KD whatever λ says. Adding a
method is one file with ``@register("name")`` and one import line below.
"""

from __future__ import annotations

import dataclasses
import difflib

import torch.nn as nn

from gte.config import DistillConfig
from gte.errors import GteError
from gte.methods import at, cat_kd, ce, crd, dist, dkd, e2kd, kd, reviewkd  # noqa: F401  (each registers itself)
from gte.methods.base import METHODS, Batch, Context, Method, Needs

SUFFIX = "+e2kd"


def parse_method(name: str) -> tuple[type[Method], bool]:
    """(method class, explanation term on) for a ``distill.method`` value; unknown names get close matches."""
    base, explanation = (name[: -len(SUFFIX)], True) if name.endswith(SUFFIX) else (name, name == "e2kd")
    if base not in METHODS:
        names = [*METHODS, *(f"{m}{SUFFIX}" for m, c in METHODS.items() if c.needs.teacher and m != "e2kd")]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise GteError(f"unknown distill.method '{name}' (known: {', '.join(METHODS)}, and any of them that uses a "
                       f"teacher with '{SUFFIX}'){hint}")
    cls = METHODS[base]
    if name.endswith(SUFFIX) and not cls.needs.teacher:
        raise GteError(f"distill.method '{name}': '{base}' uses no teacher, so there is no explanation to match")
    if name.endswith(SUFFIX) and base == "e2kd":
        raise GteError("distill.method 'e2kd+e2kd': e2kd already has the explanation term")
    return cls, explanation


def uses_teacher(name: str) -> bool:
    """Whether ``distill.method`` needs a teacher (or its stored outputs)."""
    cls, explanation = parse_method(name)
    return cls.needs.teacher or explanation


def _given(cfg: DistillConfig, key: str) -> bool:
    """Whether the recipe set ``distill.<key>`` itself (``DistillConfig.given``; built in Python: not at its
    default)."""
    if key == "ce_weight" and cfg.ce_weight != -1:  # -1 is the method's own weight
        return True
    if cfg.given is not None:
        return key in cfg.given
    return getattr(cfg, key) != getattr(DistillConfig, key)


def resolve(cfg: DistillConfig) -> DistillConfig:
    """``cfg`` with the method's paper setting for ``distill.logit_std`` filled into the keys the recipe left to it
    (``Method.logit_std_setting``: ``distill.temperature``, ``distill.ce_weight`` and option keys not in
    ``distill.options``); ``cfg`` itself when nothing changes (no logit_std, a method without such a setting, or an
    unknown method name, which the checks report). A copy otherwise, so it applies once however often it is called."""
    try:
        cls, _ = parse_method(cfg.method)
    except GteError:
        return cfg
    setting = cls.logit_std_setting if cfg.logit_std else {}
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    top = {k: v for k, v in setting.items() if k in fields and not _given(cfg, k)}
    options = {k: v for k, v in setting.items() if k not in fields and k not in cfg.options}
    if not top and not options:
        return cfg
    out = dataclasses.replace(cfg, options={**options, **cfg.options}, **top)
    out.given = cfg.given
    return out


def build_method(cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None,
                 context: Context = Context()) -> Method:
    """The method named by ``cfg.method``, wired to its student and frozen teacher (None with ``cfg.frozen``: the
    loop then hands each batch's stored teacher outputs in ``Batch.frozen``); keys the recipe left to the method are
    resolved first (:func:`resolve`)."""
    cfg = resolve(cfg)
    cls, explanation = parse_method(cfg.method)
    needs_teacher = cls.needs.teacher or explanation
    if cfg.frozen and not needs_teacher:
        raise GteError(f"distill.frozen needs a distillation method, not '{cfg.method}'")
    if cfg.frozen and (not cls.needs.frozen or cls.needs.teacher_features):
        raise GteError(f"distill.method '{cfg.method}' needs the live teacher's features: it cannot run on stored "
                       "teacher outputs (distill.frozen)")
    if needs_teacher and teacher is None and not cfg.frozen:
        raise GteError(f"distill.method '{cfg.method}' needs a teacher (set teacher.arch and teacher.weights)")
    method = cls(cfg, student, teacher, explanation=explanation, context=context)
    if method.parts is not None:  # trainable parts in the student's precision (float64 students: float64 parts)
        method.parts.to(dtype=next(student.parameters()).dtype)
    return method


__all__ = ["METHODS", "Batch", "Context", "Method", "Needs", "build_method", "parse_method", "resolve",
           "uses_teacher"]
