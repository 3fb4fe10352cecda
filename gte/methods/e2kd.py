"""e2KD (Parchami-Araghi et al., ECCV 2024): KD plus matching the teacher's explanation of its top-1 class.

L = T²·KL(p_T ‖ p_S) + λ · (1 − cos(E_T(x, ŷ_T), E_S(x, ŷ_T))), the explanation term on every K-th step only.

B-cos students: one forward gives the training logits and W(x) (:mod:`gte.onepass`); the KD term gets the ordinary
gradient of the logits and the explanation term its exact derivative in θ — W(x) is taken with the dynamic factors
constant, and the outer derivative flows through them, as in the official code (``distill.exp_grad = "detached"``
keeps them constant there too: an ablation, README "How gte computes e2KD"). GradCAM students need one pass as well:
the logits and the CAM come from the same forward, the CAM's gradient taken with ``create_graph=True``.
"""

from __future__ import annotations

import torch

from gte.errors import GteError
from gte.explain import explain_with_logits
from gte.losses import explanation_loss
from gte.methods.kd import KD
from gte.onepass import logits_and_explanation, supports_one_pass


class E2KD(KD):
    """Explanation-enhanced KD behind the same ``loss`` interface as :class:`KD`."""

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.explainer = cfg.explainer if cfg.explainer != "auto" else self.student_info.explainer
        if self.explainer == "bcos" and not supports_one_pass(student):
            raise GteError(f"e2KD with B-cos explanations needs a B-cos student gte can differentiate exactly; "
                           f"{self.student_info.arch} is not one")

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
        else:
            s_logits, s_maps = logits_and_explanation(self.student, xs, classes, self.cfg.exp_grad)
        loss, logs = self.logit_terms(s_logits, t_logits, labels)
        exp = explanation_loss(s_maps, t_maps)
        logs["exp"] = exp.detach()
        return loss + self.cfg.lambda_exp * exp, logs
