"""Training methods behind one interface: ``method.loss(images, labels, step) -> (loss, logs)``.

The loop calls only this; it never names a method. ``images`` are in [0, 1]; each method applies its models' input
specs. ``logs`` holds detached scalar terms for the progress bar and ``metrics.jsonl``.
"""

from __future__ import annotations

import torch.nn as nn

from gte.config import DistillConfig
from gte.errors import GteError
from gte.methods.base import Method
from gte.methods.ce import LabelsOnly
from gte.methods.e2kd import E2KD
from gte.methods.kd import KD

METHODS: dict[str, type[Method]] = {"ce": LabelsOnly, "kd": KD, "e2kd": E2KD}


def build_method(cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None) -> Method:
    """The method named by ``cfg.method``, wired to its (prepared) student and frozen teacher (None with
    ``cfg.frozen``: the loop then passes each batch's stored teacher outputs to ``method.loss(…, frozen=…)``)."""
    if cfg.method not in METHODS:
        raise GteError(f"unknown distill.method '{cfg.method}' (known: {', '.join(METHODS)})")
    cls = METHODS[cfg.method]
    if cfg.frozen and not cls.needs_teacher:
        raise GteError(f"distill.frozen needs a distillation method (kd or e2kd), not '{cfg.method}'")
    if cls.needs_teacher and teacher is None and not cfg.frozen:
        raise GteError(f"distill.method '{cfg.method}' needs a teacher (set teacher.arch and teacher.weights)")
    return cls(cfg, student, teacher)


__all__ = ["METHODS", "Method", "build_method"]
