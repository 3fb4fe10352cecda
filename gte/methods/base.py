"""The contract every training method implements, and the registry that names them.

A method is one file: a :class:`Method` subclass with a ``@register("name")`` line, what it ``needs`` (a teacher,
feature maps at named layers, sample indices, whether stored teacher outputs can replace the teacher), its
hyperparameters as an ``Options`` dataclass (``[distill.options]`` in a recipe, paper defaults), its trainable parts
(``self.parts``: optimised, checkpointed and DDP-wrapped with the student) and its extra state (``extra_state``).
It implements one function, ``objective(batch, student, teacher)``; :meth:`Method.loss` runs the passes it needs and
adds the e2KD explanation term when the method runs "+ e2KD". The loop never names a method.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from gte.config import DistillConfig, coerce
from gte.errors import GteError
from gte.losses import classification_loss
from gte.methods.explanation import ExplanationTerm
from gte.methods.features import INPUT, check_taps, layer_names, probe
from gte.methods.passes import StudentPass, TeacherPass, teacher_pass
from gte.models import info, to_model_input


@dataclass(frozen=True)
class Needs:
    """What a method asks of the loop and the models."""

    teacher: bool = False           # a (frozen) teacher's outputs
    student_features: str = ""      # "" | "stages" (every stage output) | "preact" (the same before the final ReLU)
                                    # | "last" (the deepest stage)
    teacher_features: str = ""
    indices: bool = False           # batch.indices: each sample's index in the training set (0..n_data-1)
    frozen: bool = True             # can run on stored teacher logits/maps (distill.frozen) instead of a teacher
    spatial: bool = False           # the tapped layers must give N×C×H×W maps (checked on a probe when built)


@dataclass
class Batch:
    """One micro-batch as a method sees it."""

    images: torch.Tensor            # N×3×H×W in [0, 1]; each model's input spec is applied by the passes
    labels: torch.Tensor            # N (class indices) or N×C (multi-hot)
    step: int = 0                   # optimiser step
    epoch: float = 0.0              # epochs done, fractional (warm-ups)
    indices: torch.Tensor | None = None
    frozen: dict[str, torch.Tensor] | None = None  # stored teacher outputs {"logits", "map"} (distill.frozen)


@dataclass(frozen=True)
class Context:
    """Facts about the run a method may size itself by."""

    n_data: int = 0                 # samples batch.indices ranges over
    image_size: int = 224
    epochs: int = 1
    teacher_size: int = 0           # the side the teacher sees batches at (0 = the batch's own)
    labels: torch.Tensor | None = None  # every sample's class, by batch.indices (methods whose needs ask for indices;
                                        # -1 = unknown)


class NoOptions:
    """A method without hyperparameters of its own."""


class Method(ABC):
    """A training objective over a student (and a frozen teacher, or its stored outputs)."""

    name: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()
    Options: ClassVar[type] = NoOptions
    ce_default: ClassVar[float] = 1.0  # label-loss weight when distill.ce_weight < 0 (the method paper's setting)
    multilabel: ClassVar[bool] = True  # works with multi-hot labels (distill.multilabel); False: one class per sample
    logit_std_setting: ClassVar[dict[str, Any]] = {}  # distill / option keys distill.logit_std sets unless given

    def __init__(self, cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 explanation: bool = False, context: Context = Context()):
        self.cfg, self.student, self.teacher, self.context = cfg, student, teacher, context
        self.student_info = info(student)
        if teacher is not None and info(teacher).num_classes != self.student_info.num_classes:
            raise GteError(f"teacher has {info(teacher).num_classes} classes, student {self.student_info.num_classes}")
        if cfg.multilabel and not self.multilabel:
            raise GteError(f"distill.method '{self.name}' needs one class per sample: it cannot train on multi-label "
                           "data (distill.multilabel)")
        self.options = parse_options(type(self), cfg.options)
        self.ce_weight = cfg.ce_weight if cfg.ce_weight >= 0 else self.ce_default
        self.explanation = ExplanationTerm(cfg, student, teacher) if explanation else None
        self.student_layers = layer_names(student, self.needs.student_features, cfg.student_layers, "student")
        self.teacher_layers = (layer_names(teacher, self.needs.teacher_features, cfg.teacher_layers, "teacher")
                               if teacher is not None else [])
        self.parts: nn.Module | None = None  # set by methods with trainable modules (in __init__)
        self._check_taps()

    # ------------------------------------------------------------------------------------------ the contract
    @abstractmethod
    def objective(self, batch: Batch, s: StudentPass, t: TeacherPass | None) -> tuple[torch.Tensor, dict]:
        """The method's loss of one batch and its logged (detached) terms."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups of the method's trainable parts (appended to the student's group; a method may
        give its parts their own ``lr`` / ``weight_decay`` here). Default: one group, the optimiser's settings."""
        return [{"params": list(self.parts.parameters()), "name": f"{self.name}.parts"}] if self.parts is not None else []

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter state saved with checkpoints (tensors only), e.g. a memory bank."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise GteError(f"method {self.name} keeps no extra state, the checkpoint has {sorted(state)[:3]}")

    # ------------------------------------------------------------------------------------------ the loop's side
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one micro-batch: the method's objective (+ λ · the explanation term)."""
        guided = self.explanation is not None and batch.step % self.cfg.guided_every == 0
        t = None
        if self.needs.teacher or self.explanation is not None:
            explainer = self.explanation.explainer if guided else None
            t = teacher_pass(self.teacher, batch.images, self.teacher_layers, explainer, batch.frozen,
                             self.student_info.num_classes, self.context.teacher_size)
        s = StudentPass(self.student, batch.images, self.student_layers,
                        self.explanation.explainer if guided else None, self.cfg.exp_grad)
        loss, logs = self.objective(batch, s, t)
        if guided:
            loss = loss + self.explanation(batch.images, s, t, logs, frozen=batch.frozen is not None)
        return loss, logs

    def attach(self, student: nn.Module, parts: nn.Module | None) -> None:
        """Use the prepared (DDP-wrapped) student and parts from now on."""
        self.student, self.parts = student, parts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parts (``parts.…``) and extra state (``state.…``), for checkpoints."""
        out = {}
        if self.parts is not None:
            inner = getattr(self.parts, "module", self.parts)
            out.update({f"parts.{k}": v for k, v in inner.state_dict().items()})
        out.update({f"state.{k}": v for k, v in self.extra_state().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parts = {k[6:]: v for k, v in state.items() if k.startswith("parts.")}
        if self.parts is not None:
            getattr(self.parts, "module", self.parts).load_state_dict(parts)
        elif parts:
            raise GteError(f"method {self.name} has no trainable parts, the checkpoint has some")
        self.load_extra_state({k[6:]: v for k, v in state.items() if k.startswith("state.")})

    def end_step(self) -> None:
        """Called on every rank once per optimiser step, after the update: state changes that must stay identical
        on all ranks (CRD's memory) happen here, from what the step's micro-batches left."""

    # ------------------------------------------------------------------------------------------ helpers
    def _probes(self) -> list[tuple[str, nn.Module, list[str], torch.Tensor, dict[str, torch.Tensor]]]:
        """(role, model, layers, model input, tapped outputs) of one probe forward per model at
        ``context.image_size``, in each model's device and dtype (the run's RNG untouched)."""
        size = self.context.image_size
        images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        out = []
        for role, model, layers in (("student", self.student, self.student_layers),
                                    ("teacher", self.teacher, self.teacher_layers)):
            if model is None:
                continue
            p = next(model.parameters())  # a float64 model takes float64 input
            x = to_model_input(info(model), images.to(p.device, p.dtype))
            # a compiled teacher is probed through its eager module: dynamo reuses a graph traced without hooks and
            # ignores hooks added later, so the probe would see no features (and cost a recompile per shape)
            eager = getattr(model, "_orig_mod", model)
            out.append((role, model, layers, x, probe(eager, layers, x)))
        return out

    def _check_taps(self) -> None:
        """Tapped layers never give the input image, and give maps where the method needs them (``needs.spatial``)."""
        layers = [*self.student_layers, *self.teacher_layers]
        if not layers or not (self.needs.spatial or any(x.endswith(INPUT) for x in layers)):
            return
        for role, _, _, x, feats in self._probes():
            check_taps(feats, x, role, self.name, self.needs.spatial)

    def feature_shapes(self) -> tuple[list[torch.Size], list[torch.Size]]:
        """Per-sample shapes of the tapped student and teacher layers at ``context.image_size`` (one probe forward
        each; for sizing trainable parts)."""
        shapes = {role: [feats[name].shape[1:] for name in layers] for role, _, layers, _, feats in self._probes()}
        return shapes["student"], shapes.get("teacher", [])

    def with_labels(self, loss: torch.Tensor, logs: dict, logits: torch.Tensor, labels: torch.Tensor,
                    weight: float | None = None) -> torch.Tensor:
        """Add ``weight ·`` the label loss (default: the resolved ``ce_weight``; skipped entirely at weight 0)."""
        weight = self.ce_weight if weight is None else weight
        if weight:
            ce = classification_loss(logits, labels, self.student_info.bcos)
            logs["ce"] = ce.detach()
            loss = loss + weight * ce
        return loss


def option(default: Any, ok: Any = None, what: str = "", *, choices: tuple[str, ...] = ()) -> Any:
    """An ``Options`` field with its range next to it: ``ok(value)`` must hold (``what`` says what it must be), or
    the value must be one of ``choices``. Checked by :func:`parse_options` for every given value."""
    if choices:
        ok, what = (lambda v: v in choices), " or ".join(repr(c) for c in choices)
    return dataclasses.field(default=default, metadata={"ok": ok, "what": what})


def at_least(low: float) -> Any:
    """A range test ``value >= low`` (for :func:`option`)."""
    return lambda v: v >= low


def positive(v: float) -> bool:
    return v > 0


def parse_options(cls: type[Method], given: dict[str, Any]) -> Any:
    """``distill.options`` as the method's ``Options`` dataclass: unknown keys named, types checked, every number
    finite and every value in its field's range (:func:`option`)."""
    if cls.Options is NoOptions:
        if given:
            raise GteError(f"distill.options: method '{cls.name}' takes no options, got {', '.join(given)}")
        return NoOptions()
    known = {f.name: f for f in dataclasses.fields(cls.Options)}
    values = {}
    for key, value in given.items():
        if key not in known:
            raise GteError(f"distill.options: method '{cls.name}' has no option '{key}' (known: {', '.join(known)})")
        name = f"distill.options.{key}"
        value = coerce(name, value, getattr(cls.Options(), key))
        if isinstance(value, float) and not math.isfinite(value):
            raise GteError(f"recipe key '{name}' must be a finite number, got {value!r}")
        ok, what = known[key].metadata.get("ok"), known[key].metadata.get("what", "")
        if ok is not None and not ok(value):
            raise GteError(f"recipe key '{name}' must be {what} for method '{cls.name}', got {value!r}")
        values[key] = value
    return cls.Options(**values)


METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a method available as ``distill.method = name``."""

    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add
