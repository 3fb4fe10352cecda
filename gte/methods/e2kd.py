"""e2KD (Parchami-Araghi et al., ECCV 2024): KD plus matching the teacher's explanation of its top-1 class.

L = T²·KL(p_T ‖ p_S) + λ · (1 − cos(E_T(x, ŷ_T), E_S(x, ŷ_T))), the explanation term on every K-th step only.

B-cos students: one forward gives the training logits and W(x) (:mod:`gte.onepass`); the KD term gets the ordinary
gradient of the logits and the explanation term its exact derivative in θ — W(x) is taken with the dynamic factors
constant, and the outer derivative flows through them, as in the official code (``distill.exp_grad = "detached"``
keeps them constant there too: an ablation, README "How gte computes e2KD"). GradCAM students need one pass as well:
the logits and the CAM come from the same forward, the CAM's gradient taken with ``create_graph=True``.

Options beyond the paper (off by default, live B-cos students): more explained classes (the teacher's top-k, the
student's own top-1) and a magnitude term ``μ · (log‖W_S‖ − log‖W_T‖)²`` next to the scale-free cosine.
"""

from __future__ import annotations

import torch

from gte.errors import GteError
from gte.explain import choose_explainer, explain_with_logits
from gte.losses import explanation_loss, log_norm_gap
from gte.methods.kd import KD
from gte.onepass import OnePass, supports_one_pass


class E2KD(KD):
    """Explanation-enhanced KD behind the same ``loss`` interface as :class:`KD`."""

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.explainer = choose_explainer(cfg.explainer, self.student_info.bcos)
        if self.explainer == "bcos" and not supports_one_pass(student):
            raise GteError(f"e2KD with B-cos explanations needs a B-cos student gte can differentiate exactly; "
                           f"{self.student_info.arch} is not one")
        self.extra_classes = cfg.exp_topk > 1 or cfg.exp_student_top1
        if self.extra_classes and self.explainer != "bcos":
            raise GteError("distill.exp_topk / exp_student_top1 are implemented for B-cos students only")
        if cfg.exp_topk > self.student_info.num_classes:
            raise GteError(f"distill.exp_topk = {cfg.exp_topk} exceeds the {self.student_info.num_classes} classes")

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
            pairs = [(s_maps, t_maps)]
        else:
            one = OnePass(self.student, xs, self.cfg.exp_grad)
            s_logits, pairs = one.logits, [(one.explain(classes), t_maps)]
            if self.extra_classes:
                pairs += [(one.explain(c), self._teacher_map(images, c)) for c in self._extra(t_logits, one.logits)]
        loss, logs = self.logit_terms(s_logits, t_logits, labels)
        exp = sum(explanation_loss(s, t) for s, t in pairs) / len(pairs)
        logs["exp"] = exp.detach()
        loss = loss + self.cfg.lambda_exp * exp
        if self.cfg.exp_norm_weight:
            gap = sum(log_norm_gap(s, t) for s, t in pairs) / len(pairs)
            logs["exp_norm"] = gap.detach()
            loss = loss + self.cfg.exp_norm_weight * gap
        return loss, logs

    def _extra(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> list[torch.Tensor]:
        """The classes explained besides the teacher's top-1: its ranks 2..k, then the student's top-1."""
        extra = list(t_logits.topk(self.cfg.exp_topk, dim=1).indices.T[1:])
        if self.cfg.exp_student_top1:
            extra.append(s_logits.detach().argmax(1))
        return extra

    def _teacher_map(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return explain_with_logits(self.teacher, self.teacher_input(images), classes, self.explainer)[0]
