"""Explainers behind one interface (:mod:`gte.explainers.base`): ``bcos`` (W(x) of B-cos networks) and ``gradcam``.
Adding one is one file with ``@register`` and one import line below."""

from __future__ import annotations

from gte.errors import GteError
from gte.explainers import bcos, gradcam  # noqa: F401  (each registers itself)
from gte.explainers.base import EXPLAINERS, Explainer, get
from gte.models import own_explainer


def choose_explainer(name: str, student_bcos: bool) -> str:
    """The explainer a run uses — decided here only: ``distill.explainer``, or for ``"auto"`` the student's own (W(x)
    for a B-cos student, GradCAM otherwise). Teacher maps (live, precomputed, evaluated) are made with the same one."""
    if name == "auto":
        return own_explainer(student_bcos)
    if name not in EXPLAINERS:
        raise GteError(f"unknown distill.explainer '{name}' (known: auto, {', '.join(EXPLAINERS)})")
    return name


__all__ = ["EXPLAINERS", "Explainer", "choose_explainer", "get"]
