"""The two forward passes of a training step: the student's (logits, tapped features, and explanations differentiable
in its parameters, all from one forward) and the teacher's (without graph, or its stored outputs).

Student explanations come from the same forward as its logits (each explainer's ``training_forward``: B-cos students
through :class:`gte.onepass.OnePass`, W(x) with the exact gradient of the official code; GradCAM students from the
hooked activations with ``create_graph=True``). B-cos CNN students that are not explained this step run :func:`gte.onepass.fused_layers`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from gte.errors import GteError
from gte.explain import explain_with_logits
from gte.explainers import get
from gte.explainers.base import Explain
from gte.methods.features import tap
from gte.models import at_size, info, to_model_input
from gte.onepass import fused_layers, is_bcos_cnn


class StudentPass:
    """One student forward: ``logits``, ``features`` (the tapped layers' outputs, in order), and :meth:`explain`."""

    def __init__(self, model: nn.Module, images: torch.Tensor, layers: list[str], explainer: str | None,
                 exp_grad: str = "exact"):
        self.model, self.explainer = model, explainer
        self.input = to_model_input(info(model), images)
        self._explain: Explain | None = None
        with tap(model, layers) as feats:
            if explainer is not None:
                self.logits, self._explain = get(explainer).training_forward(model, self.input, exp_grad)
            else:
                fused = fused_layers(model) if is_bcos_cnn(model) else contextlib.nullcontext()
                with fused:
                    self.logits = model(self.input)
        self.features = [feats[name] for name in layers]

    def explain(self, classes: torch.Tensor) -> torch.Tensor:
        """The student's explanation of ``classes`` (one per sample), differentiable in its parameters."""
        if self._explain is None:
            raise RuntimeError("this student pass was run without an explainer")
        return self._explain(classes)


@dataclass
class TeacherPass:
    """The teacher's outputs for one batch (no graph): logits, its explanation of its top-1 class when asked, and
    the tapped layers' outputs."""

    logits: torch.Tensor
    maps: torch.Tensor | None = None
    features: list[torch.Tensor] | None = None


def teacher_pass(teacher: nn.Module | None, images: torch.Tensor, layers: list[str], explainer: str | None,
                 frozen: dict[str, torch.Tensor] | None, num_classes: int, size: int = 0) -> TeacherPass:
    """The live teacher's pass, or the stored one (``frozen``: logits and, for explanations, the map of the
    un-augmented image cropped/flipped like ``images``). ``size``: the teacher sees the batch resized to size²
    (its own interpolation; its explanation is resized back to the batch's size)."""
    if frozen is not None:
        logits = frozen["logits"].to(images.device, torch.float32)
        if logits.shape != (len(images), num_classes):
            raise GteError(f"stored teacher logits have shape {tuple(logits.shape)}, expected "
                           f"({len(images)}, {num_classes}): precomputed for another task?")
        maps = frozen["map"].to(images.device, torch.float32) if explainer is not None else None
        return TeacherPass(logits, maps)
    if teacher is None:
        raise GteError("this method needs a teacher (set teacher.arch and teacher.weights, or distill.frozen)")
    x = to_model_input(info(teacher), images, size)
    with tap(teacher, layers) as feats:
        if explainer is not None:
            # The teacher explains its own top-1 class on this augmented batch: one forward, no graph kept.
            maps, logits = explain_with_logits(teacher, x, None, explainer)
            maps = at_size(maps, images.shape[-2:])
        else:
            with torch.no_grad():
                logits, maps = teacher(x), None
    return TeacherPass(logits, maps, [feats[name].detach() for name in layers])
