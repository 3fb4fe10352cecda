"""e2KD (Parchami-Araghi et al., ECCV 2024): KD plus matching the teacher's explanation of its top-1 class.

L = T²·KL(p_T ‖ p_S) + λ · (1 − cos(E_T(x, ŷ_T), E_S(x, ŷ_T))), the explanation term on every K-th step only.

B-cos students: one forward gives the training logits and W(x) (:mod:`gte.onepass`); the KD term gets the ordinary
gradient of the logits and the explanation term its exact derivative in θ — W(x) is taken with the dynamic factors
constant, and the outer derivative flows through them, as in the official code (``distill.exp_grad = "detached"``
keeps them constant there too: an ablation, docs/method.md "How gte computes e2KD"). GradCAM students need one pass
as well: the logits and the CAM come from the same forward, the CAM's gradient taken with ``create_graph=True``.

The explanation term itself (:mod:`gte.methods.explanation`) is the one any method gets with the ``+e2kd`` suffix
(``crd+e2kd``: the paper's CRD + e2KD row); ``e2kd`` is ``kd+e2kd``.
"""

from __future__ import annotations

from gte.methods.base import register
from gte.methods.kd import KD


@register("e2kd")
class E2KD(KD):
    """Explanation-enhanced KD: :class:`KD` with the explanation term on (whatever ``explanation`` says)."""

    def __init__(self, cfg, student, teacher, *, explanation: bool = True, **kw):
        super().__init__(cfg, student, teacher, explanation=True, **kw)
