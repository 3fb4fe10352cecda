"""e2KD (Parchami-Araghi et al., ECCV 2024): KD plus matching the teacher's explanation of its top-1 class.

L = T²·KL(p_T ‖ p_S) + λ · (1 − cos(E_T(x, ŷ_T), E_S(x, ŷ_T))), the explanation term on every K-th step only.

B-cos students: the KD term needs the logits' true parameter gradient, W(x) needs explanation mode (detached dynamic
scaling and normalisation). Taking the KD logits from an explanation-mode pass back-propagates through those detached
factors and the KD term stops fitting (README, "one pass, two derivatives"). gte's B-cos CNNs get both from ONE forward
(:mod:`gte.onepass`); other B-cos students (the ViT) use a normal forward for the logits plus a second forward in
explanation mode with running-statistics updates suspended — the same gradient, one forward dearer. GradCAM students
need one pass: the logits and the CAM come from the same forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from gte.errors import GteError
from gte.explain import explain_with_logits
from gte.losses import explanation_loss
from gte.methods.kd import KD
from gte.onepass import logits_and_explanation


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Batch norms keep normalising with batch statistics but do not update their running estimates."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class E2KD(KD):
    """Explanation-enhanced KD behind the same ``loss`` interface as :class:`KD`."""

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.explainer = cfg.explainer if cfg.explainer != "auto" else self.student_info.explainer
        self.one_pass = self.explainer == "bcos" and self.fused

    def loss(self, images: torch.Tensor, labels: torch.Tensor, step: int, frozen=None) -> tuple[torch.Tensor, dict]:
        if step % self.cfg.guided_every:
            return super().loss(images, labels, step, frozen)  # unguided step: no explanation work at all
        if frozen is not None:  # frozen e2KD: the stored explanation of the stored top-1 class (un-augmented image)
            t_logits = self.teacher_logits(images, frozen)
            t_maps = frozen["map"].to(images.device, torch.float32)
            want = 6 if self.explainer == "bcos" else 1
            if t_maps.shape[1] != want or t_maps.shape[-2:] != images.shape[-2:]:
                raise GteError(f"stored teacher maps are {tuple(t_maps.shape[1:])}, the '{self.explainer}' student "
                               f"explanation is ({want}, {images.shape[-2]}, {images.shape[-1]}): precomputed with "
                               "another explainer?")
        else:
            # The teacher explains its own top-1 class on this augmented batch: one forward, no graph kept.
            t_maps, t_logits = explain_with_logits(self.teacher, self.teacher_input(images), None, self.explainer)
        classes = t_logits.argmax(1)
        xs = self.student_input(images)
        if self.explainer == "gradcam":
            s_maps, s_logits = explain_with_logits(self.student, xs, classes, "gradcam", create_graph=True)
        elif self.one_pass:
            s_logits, s_maps = logits_and_explanation(self.student, xs, classes)
        else:
            s_logits = self.student(xs)
            with running_stats_frozen(self.student):
                s_maps, _ = explain_with_logits(self.student, xs, classes, "bcos", create_graph=True)
        loss, logs = self.logit_terms(s_logits, t_logits, labels)
        exp = explanation_loss(s_maps, t_maps)
        logs["exp"] = exp.detach()
        return loss + self.cfg.lambda_exp * exp, logs
