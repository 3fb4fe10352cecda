"""The e2KD explanation term, added to any method that runs "+ e2KD" (Parchami-Araghi et al., ECCV 2024):

    λ · (1 − cos(E_T(x, ŷ_T), E_S(x, ŷ_T)))     with ŷ_T the teacher's top-1 class, on every K-th step only.

Options beyond the paper (off by default, live B-cos students): more explained classes (the teacher's top-k, the
student's own top-1) and a magnitude term ``μ · (log‖W_S‖ − log‖W_T‖)²`` next to the scale-free cosine.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gte.config import DistillConfig
from gte.errors import GteError
from gte.explain import explain_with_logits
from gte.explainers import choose_explainer, get
from gte.losses import explanation_loss, log_norm_gap
from gte.models import info, to_model_input
from gte.methods.passes import StudentPass, TeacherPass
from gte.onepass import supports_one_pass


class ExplanationTerm:
    """λ · (1 − cos) between the student's and the teacher's explanations of the teacher's top-1 class."""

    def __init__(self, cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None):
        self.cfg, self.teacher = cfg, teacher
        s = info(student)
        self.explainer = choose_explainer(cfg.explainer, s.bcos)
        get(self.explainer).check(student)
        get(self.explainer).check_student(student)
        if self.explainer == "bcos" and not supports_one_pass(student):
            raise GteError(f"e2KD with B-cos explanations needs a B-cos student gte can differentiate exactly; "
                           f"{s.arch} is not one")
        if teacher is not None:
            get(self.explainer).check(teacher)
        self.extra_classes = cfg.exp_topk > 1 or cfg.exp_student_top1
        if self.extra_classes and self.explainer != "bcos":
            raise GteError("distill.exp_topk / exp_student_top1 are implemented for B-cos students only")
        if cfg.exp_topk > s.num_classes:
            raise GteError(f"distill.exp_topk = {cfg.exp_topk} exceeds the {s.num_classes} classes")

    def __call__(self, images: torch.Tensor, s: StudentPass, t: TeacherPass, logs: dict,
                 frozen: bool = False) -> torch.Tensor:
        """The weighted term for a batch of ``images`` (logged as ``exp`` and, with μ > 0, ``exp_norm``); ``frozen``:
        the teacher's maps are stored ones."""
        if frozen:  # the stored explanation of the stored top-1 class (un-augmented image)
            want = get(self.explainer).channels
            if t.maps.shape[1] != want or t.maps.shape[-2:] != images.shape[-2:]:
                raise GteError(f"stored teacher maps are {tuple(t.maps.shape[1:])}, the '{self.explainer}' student "
                               f"explanation is ({want}, {images.shape[-2]}, {images.shape[-1]}): precomputed with "
                               "another explainer?")
        classes = t.logits.argmax(1)
        pairs = [(s.explain(classes), t.maps)]
        if self.extra_classes:
            pairs += [(s.explain(c), self._teacher_map(images, c)) for c in self._extra(t.logits, s.logits)]
        exp = sum(explanation_loss(a, b) for a, b in pairs) / len(pairs)
        logs["exp"] = exp.detach()
        term = self.cfg.lambda_exp * exp
        if self.cfg.exp_norm_weight:
            gap = sum(log_norm_gap(a, b) for a, b in pairs) / len(pairs)
            logs["exp_norm"] = gap.detach()
            term = term + self.cfg.exp_norm_weight * gap
        return term

    def _extra(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> list[torch.Tensor]:
        """The classes explained besides the teacher's top-1: its ranks 2..k, then the student's top-1."""
        extra = list(t_logits.topk(self.cfg.exp_topk, dim=1).indices.T[1:])
        if self.cfg.exp_student_top1:
            extra.append(s_logits.detach().argmax(1))
        return extra

    def _teacher_map(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        x = to_model_input(info(self.teacher), images)
        return explain_with_logits(self.teacher, x, classes, self.explainer)[0]
