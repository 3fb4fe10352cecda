"""e2KD as a timm training task: swap ``LogitDistillationTask`` for :class:`E2KDTask` in a timm training script.

    loss = task_loss_weight · criterion(s, y)
         + distill_loss_weight · T² · KL(softmax(t/T) ‖ softmax(s/T))
         + λ · (1 − cos(E_S(x, ŷ_T), E_T(x, ŷ_T)))                      ŷ_T: the teacher's top-1 class

The KD and explanation terms are gte's own ``e2kd`` method (:mod:`gte.methods.e2kd`: the same code ``gte distill``
trains with, GradCAM for standard models, W(x) with the official exact gradient for B-cos students); this module only
adapts timm's calling convention to it: normalised input in, a dict of loss terms out, the student as the one
trainable (DDP-wrapped, checkpointed, EMA'd) module.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gte.config import DistillConfig, check_value
from gte.errors import GteError
from gte.io import is_file
from gte.losses import classification_loss
from gte.methods import Batch, build_method
from gte.models import describe, freeze, info
from gte.models.spec_values import checked_values

try:
    from timm.task import DistillationTeacher, TrainingTask
except ImportError:  # timm is a dependency; an environment may still lack it
    raise GteError("gte.timm_task needs timm >= 1.0.23 (a dependency of gte-distill): pip install 'timm>=1.0.23'") from None

_logger = logging.getLogger(__name__)


class LabelLoss(nn.Module):
    """The default task loss: gte's label loss (cross-entropy; the official B-cos BCE for B-cos students) for class
    indices, and for N×C soft targets (timm's Mixup/CutMix) −Σ y·log softmax(s), or BCE against y for B-cos."""

    def __init__(self, bcos: bool):
        super().__init__()
        self.bcos = bcos

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2 and not self.bcos:  # gte reads N×C labels as multi-hot (BCE): Mixup's are a distribution
            return F.cross_entropy(logits.float(), target.float())
        return classification_loss(logits, target, self.bcos)


def _check_teacher(teacher: object, pretrained_path: str | None) -> None:
    """A teacher module, or a timm name with local weights: timm would download a named teacher's weights (gte never
    downloads), and a Hub name would be looked up on the network."""
    if isinstance(teacher, (nn.Module, DistillationTeacher)):
        return
    if not isinstance(teacher, str) or not teacher:
        raise GteError(f"E2KDTask needs a teacher: a trained module, or a timm model name with "
                       f"teacher_pretrained_path (got {type(teacher).__name__})")
    if teacher.startswith(("hf-hub:", "hf_hub:", "timm/")):
        raise GteError(f"E2KDTask teacher '{teacher[:80]}': build it with gte.models.build_model('timm/hf-hub:…') "
                       "from the local Hugging Face cache and pass the module (gte never downloads)")
    if not pretrained_path or not is_file(pretrained_path):
        raise GteError(f"E2KDTask teacher '{teacher[:80]}' without a teacher_pretrained_path file: timm would "
                       "download its weights (gte never downloads); pass the file, or a trained module")


class E2KDTask(TrainingTask):
    """Explanation-enhanced KD (Parchami-Araghi et al., ECCV 2024) for timm's training loop.

    ``input`` is what a timm loader hands over: images normalised with the student's mean/std (``input_mean`` /
    ``input_std`` when the loader used others). gte's method takes images in [0, 1] and applies each model's own input
    spec, so the task first un-normalises, ``images = input · std + mean``; the student then sees ``input`` again
    (up to rounding), a teacher with another mean/std (or a B-cos teacher, ``[x, 1 − x]``) its own encoding.

    Args:
        student_model: the model to train (a timm model, or any model gte built; others need ``gte_info``,
            :func:`gte.models.describe`).
        teacher_model: a trained teacher module, a :class:`timm.task.DistillationTeacher`, or a timm model name
            (created with pretrained weights, or ``teacher_pretrained_path``, as timm's distillation tasks do).
        criterion: the task (label) loss ``criterion(logits, target)``; default :class:`LabelLoss` (hard and soft
            targets). Pass timm's train-script loss (e.g. ``SoftTargetCrossEntropy`` with Mixup) as for timm's tasks.
        distill_loss_weight / task_loss_weight: timm's weighting modes: both given, or only the distill weight (task
            weight 1); only the task weight w: distill weight 1 − w; neither: KD weight 1 and no label loss, the
            e2KD paper's (and ``gte distill``'s) setting. λ weights the explanation term on its own.
        lambda_exp, temperature, explainer: ``distill.lambda_exp`` / ``temperature`` / ``explainer`` (gte's
            defaults; ``"auto"``: W(x) for B-cos students, GradCAM otherwise).

    Returns from ``forward``: ``loss``, ``output`` (student logits), and the detached, unweighted ``task_loss``,
    ``kd_loss``, ``exp_loss``. Single-label data only (gte's multi-label KD is ``gte distill``'s).
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: str | nn.Module,
            criterion: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            teacher_pretrained_path: str | None = None,
            distill_loss_weight: float | None = None,
            task_loss_weight: float | None = None,
            lambda_exp: float = DistillConfig.lambda_exp,
            temperature: float = DistillConfig.temperature,
            explainer: str = DistillConfig.explainer,
            input_mean: Sequence[float] | None = None,
            input_std: Sequence[float] | None = None,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        check_value("distill.temperature", temperature)  # refused as a recipe refuses them
        check_value("distill.lambda_exp", lambda_exp)
        _check_teacher(teacher_model, teacher_pretrained_path)
        given = {k: list(v) if isinstance(v, (list, tuple)) else v
                 for k, v in (("mean", input_mean), ("std", input_std)) if v is not None}
        given = checked_values("E2KDTask: input_", given, 224, 0.875)  # three finite numbers each, std > 0
        s_info = describe(student_model)
        if isinstance(teacher_model, str):  # timm's own teacher creation (pretrained weights, student's classes)
            teacher_model = DistillationTeacher(teacher_model, s_info.num_classes, pretrained_path=teacher_pretrained_path,
                                                device=self.device, dtype=self.dtype)
        if isinstance(teacher_model, DistillationTeacher):
            teacher_model = teacher_model.model  # gte normalises for the teacher itself
        describe(teacher_model)
        self.trainable_module = student_model
        self.teacher = freeze(teacher_model)
        self.criterion = criterion if criterion is not None else LabelLoss(s_info.bcos)
        if isinstance(self.criterion, nn.Module):
            self.criterion = self.criterion.to(self.device)

        if distill_loss_weight is not None:
            task_loss_weight = 1.0 if task_loss_weight is None else task_loss_weight
        elif task_loss_weight is not None:
            distill_loss_weight = 1.0 - task_loss_weight
        else:
            distill_loss_weight, task_loss_weight = 1.0, 0.0
        self.distill_loss_weight, self.task_loss_weight = distill_loss_weight, task_loss_weight
        # ce_weight 0: the label loss is the criterion's (timm's Mixup/smoothing losses), not the method's
        cfg = DistillConfig(method="e2kd", options={"weight": distill_loss_weight}, lambda_exp=lambda_exp,
                            temperature=temperature, explainer=explainer, ce_weight=0.0)
        self.method = build_method(cfg, student_model, self.teacher)

        mean, std = given.get("mean", s_info.mean), given.get("std", s_info.std)
        self.register_buffer("input_mean", torch.tensor(mean, device=self.device, dtype=self.dtype).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", torch.tensor(std, device=self.device, dtype=self.dtype).view(1, -1, 1, 1),
                             persistent=False)
        if self.verbose:
            _logger.info(f"E2KDTask: {s_info.arch} <- {info(self.teacher).arch}, explainer={self.method.explanation.explainer}, "
                         f"task_weight={task_loss_weight}, distill_weight={distill_loss_weight}, λ={lambda_exp}, "
                         f"T={temperature}")

    def train(self, mode: bool = True) -> E2KDTask:
        """Set the training mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> E2KDTask:
        """Wrap the student in DistributedDataParallel; the frozen teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.teacher.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        self.method.attach(self.trainable_module, None)  # the method's student pass runs through the DDP wrapper
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module | None:
        """Not compiled: the explanation term back-propagates through a gradient (double backward), which
        ``torch.compile`` does not support. Training and evaluation run eagerly."""
        _logger.warning("E2KDTask does not compile: e2KD's explanation term needs a double backward")
        return None

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict:
        """The method's trainable parts and extra state (none for e2KD: the checkpoint is the student's)."""
        return {} if ema else self.method.state_dict()

    def load_task_state(self, state: dict | None, strict: bool = True, module: nn.Module | None = None,
                        ema: bool = False) -> None:
        if state and not ema:
            self.method.load_state_dict(state)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The e2KD loss of one batch of student-normalised ``input`` and its targets."""
        if input.ndim != 4 or input.shape[1] != 3:  # broadcasting would silently make a 1-channel batch 3 channels
            raise GteError(f"E2KDTask: input must be N×3×H×W images, got shape {tuple(input.shape)}")
        images = input * self.input_std + self.input_mean  # back to [0, 1]: gte applies each model's own spec
        # gte's method returns (loss, logs); timm also wants the student logits: take them from its one student forward
        outputs: list[torch.Tensor] = []
        hook = self.method.student.register_forward_hook(lambda m, i, o: outputs.append(o))
        try:
            # step=0: the explanation term every step (gte's distill.guided_every = 1); labels only feed the criterion
            method_loss, logs = self.method.loss(Batch(images, target))
        finally:
            hook.remove()
        if len(outputs) != 1:
            raise RuntimeError(f"expected one student forward in gte's e2kd loss, saw {len(outputs)}")
        logits = outputs[0]
        task_loss = self.criterion(logits, target)
        loss = method_loss + self.task_loss_weight * task_loss
        zero = torch.zeros((), device=loss.device)
        return {"loss": loss, "output": logits, "task_loss": task_loss.detach(),
                "kd_loss": logs.get("kd", zero), "exp_loss": logs.get("exp", zero)}

