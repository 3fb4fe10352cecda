"""One training setup for every caller: ``gte distill`` / ``gte train``, ``gte bench`` and the multi-process test
script build their models, method and optimiser here, and step through :class:`Engine`.

A step: ``grad_accum`` micro-batches, each ``method.loss(Batch)`` under autocast and
``accelerator.backward(loss / accum)`` (gradients synchronised on the last micro-batch only); then one agreement
between ranks (stop signal, non-finite loss — the step's only host sync); then clip, optimiser and schedule steps.
The optimiser holds the student's parameters and the method's trainable parts (CRD's heads, ReviewKD's fusion);
both are prepared (DDP-wrapped) by Accelerate.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from gte import dist, frozen
from gte.config import ModelConfig, Recipe
from gte.errors import GteError
from gte.explainers import choose_explainer
from gte.methods import Batch, Context, Method, build_method, parse_method, uses_teacher
from gte.models import build_model, freeze, info, run_size, with_spec
from gte.optim import apply_update, build_optimizer, warmup_cosine


def make_accelerator(recipe: Recipe):
    """An Accelerator for this launch; refuses launches whose processes did not join one process group."""
    from accelerate import Accelerator  # ~1 s of imports: only commands that train pay for them
    from accelerate.state import AcceleratorState, GradientState

    # Several trainings in one process (the demo, the tests) each set their own precision; the process group
    # (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    kwargs: dict[str, Any] = {}
    if recipe.run.trackers:
        kwargs = {"log_with": recipe.run.trackers, "project_dir": recipe.run.out}
    try:
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=recipe.run.mixed_precision, **kwargs)
    except (ValueError, ImportError) as e:  # e.g. a tracker whose package is not installed
        raise GteError(f"cannot set up Accelerate: {e}") from None
    n = _processes_asked_of_accelerate_cpu()
    if n > 1:
        raise GteError(f"`accelerate launch --num_processes {n}` started ONE process here (on a machine without a GPU, "
                       f"or with --cpu, accelerate runs a single CPU process): use `accelerate launch --multi_gpu "
                       f"--num_processes {n}` (CPU is used when there is no GPU) or torchrun")
    world = dist.launched_world_size()
    if acc.num_processes != world:
        raise GteError(f"launched {world} processes but Accelerate joined {acc.num_processes}: "
                       "use torchrun or `accelerate launch --multi_gpu`, not `--cpu`")
    return acc


def _processes_asked_of_accelerate_cpu() -> int:
    """--num_processes of a parent `accelerate launch --cpu` that started this single process (0 if none)."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:
        return 0
    args = dist.parent_args()
    for i, a in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            value = a[len(flag) + 1:] if a.startswith(flag + "=") else (args[i + 1] if a == flag and i + 1 < len(args)
                                                                         else None)
            if value is not None and value.isdigit() and "--multi_gpu" not in args:
                return int(value)
    return 0


class StopFlags:
    """SIGINT/SIGTERM become a flag checked between steps, agreed on by all ranks together with non-finite losses."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def agree(self, accelerator, nonfinite: torch.Tensor) -> tuple[bool, bool]:
        """(stop requested on any rank, a non-finite loss on any rank) — one tiny all-reduce when distributed."""
        flags = torch.stack([torch.tensor(float(self.signal is not None), device=nonfinite.device),
                             nonfinite.float()])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        stop, bad = flags.tolist()
        return stop > 0, bad > 0


def build_models(recipe: Recipe, *, pretrained: bool = True, teacher: bool | None = None
                 ) -> tuple[nn.Module, nn.Module | None]:
    """(student, frozen teacher or None). ``teacher=None``: built when the method needs one and it is not frozen
    teaching (whose shards carry its outputs). ``pretrained=False`` (``gte bench``) skips the weights: the cost of a
    step does not depend on them."""
    d = recipe.data
    student = build_model(recipe.student.arch, d.num_classes, (recipe.student.weights or None) if pretrained else None)
    # the student's spec is this run's geometry: what eval, explain and precompute use for model.safetensors
    with_spec(student, input_size=d.image_size, crop_pct=d.image_size / (d.eval_resize or d.image_size / 0.875),
              interpolation=d.interpolation, trained_explainer=trained_explainer(recipe, info(student).bcos),
              **layer_spec(recipe.student))
    if teacher is None:
        teacher = uses_teacher(recipe.distill.method) and not recipe.distill.frozen
    if teacher:
        t = build_model(recipe.teacher.arch, d.num_classes, (recipe.teacher.weights or None) if pretrained else None)
        return student, freeze(with_spec(t, **layer_spec(recipe.teacher)))
    return student, None


def trained_explainer(recipe: Recipe, student_bcos: bool) -> str:
    """The explainer the run's explanation term uses ("" for a method without one): recorded in the student's spec."""
    return choose_explainer(recipe.distill.explainer, student_bcos) if parse_method(recipe.distill.method)[1] else ""


def layer_spec(model: ModelConfig) -> dict[str, str]:
    """``explain_layer`` as a spec change (checked: the layer must exist)."""
    return {"gradcam_layer": model.explain_layer} if model.explain_layer else {}


def teacher_size(recipe: Recipe, teacher: nn.Module | None) -> int:
    """The side the teacher sees batches at: ``teacher.image_size``, else its spec's size when it runs at that size
    only (ViT), else 0 (the batch as it is)."""
    return 0 if teacher is None else run_size(info(teacher), recipe.teacher.image_size, recipe.data.image_size)


def apply_run_options(recipe: Recipe, student: nn.Module, teacher: nn.Module | None) -> nn.Module | None:
    """``run.channels_last`` (convolutions run NHWC; inputs follow the weights' format) and ``run.compile_teacher``
    (the student cannot be compiled: torch.compile has no double backward). Returns the (compiled) teacher."""
    if recipe.run.channels_last:
        for m in (student, teacher):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    if recipe.run.compile_teacher and teacher is not None:
        teacher = torch.compile(teacher)
    return teacher


def multilabel_targets(batch: dict, num_classes: int, source: str) -> torch.Tensor:
    """N×C targets from each sample's ``json.labels`` (multi-label data such as VOC)."""
    out = torch.zeros(len(batch["labels"]), num_classes)
    for i, labels in enumerate(batch["labels"]):
        if labels is None:
            raise GteError(f"distill.multilabel is set but a sample in {source} has no json.labels")
        if any(not 0 <= c < num_classes for c in labels):
            raise GteError(f"label {max(labels)} in {source}, but data.num_classes = {num_classes}")
        out[i, list(labels)] = 1.0
    return out


@dataclass
class Engine:
    """Everything one training run steps with (built by :func:`setup`)."""

    recipe: Recipe
    accelerator: Any
    student: nn.Module  # prepared (DDP-wrapped when distributed)
    teacher: nn.Module | None
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    clip: str
    clip_value: float

    @property
    def per_step(self) -> int:
        """Samples per optimiser step over all processes."""
        o = self.recipe.optim
        return o.batch_size * self.accelerator.num_processes * o.grad_accum

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.recipe.optim.epochs

    @property
    def trainable(self) -> list[nn.Module]:
        """The prepared modules the optimiser updates: the student, and the method's parts if it has any."""
        return [self.student] + ([self.method.parts] if self.method.parts is not None else [])

    def model(self) -> nn.Module:
        """The student without DDP/compile wrappers (for saving and evaluation)."""
        return self.accelerator.unwrap_model(self.student)

    def accumulate(self, loader: Iterator[dict], step: int, flags: StopFlags) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward/backward over ``grad_accum`` micro-batches; returns (mean logged terms, stop requested)."""
        acc, d, accum = self.accelerator, self.recipe.data, self.recipe.optim.grad_accum
        totals: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
        for j in range(accum):
            try:
                batch = next(loader)
            except StopIteration:
                raise GteError(f"{d.train} ran out of samples before the epoch's last step "
                               "(data.train_size larger than the shards?)") from None
            labels = multilabel_targets(batch, d.num_classes, d.train) if self.recipe.distill.multilabel else batch["label"]
            if labels.ndim == 1 and (labels.min() < 0 or labels.max() >= d.num_classes):
                raise GteError(f"label {int(labels.max())} in {d.train}, but data.num_classes = {d.num_classes}")
            images = batch["image"].to(acc.device, non_blocking=True)
            labels = labels.to(acc.device, non_blocking=True)
            index = batch.get("index")
            # sample indices stay on the host: methods use them for bookkeeping (CRD's seeds and memory rows)
            item = Batch(images, labels, step, step / self.steps_per_epoch, index, frozen.from_batch(batch, acc.device))
            with contextlib.ExitStack() as sync:
                if j < accum - 1:  # gradients are synchronised on the last micro-batch only
                    for m in self.trainable:
                        sync.enter_context(acc.no_sync(m))
                with acc.autocast():
                    loss, logs = self.method.loss(item)
                nonfinite |= ~torch.isfinite(loss.detach())
                acc.backward(loss / accum)
            for k, v in {"loss": loss.detach(), **logs}.items():
                totals[k] = totals.get(k, 0.0) + v.float() / accum
        stop, bad = flags.agree(acc, nonfinite)  # the step's one host sync
        if bad:
            raise GteError(f"non-finite loss at step {step}: stopped; the last good checkpoint is kept "
                           "(lower optim.lr, or check the data)")
        return totals, stop

    def update(self) -> None:
        """Clip, optimiser and schedule steps, gradients cleared; on CPU, freed heap memory handed back."""
        # optim.clip is the student's (AGC for B-cos students): a method's parts train unclipped, as in their papers
        apply_update(self.accelerator, [self.student], self.optimizer, self.scheduler, self.clip, self.clip_value)
        self.method.end_step()
        if self.accelerator.device.type == "cpu":
            release_host_memory()


def release_host_memory() -> None:
    """glibc ``malloc_trim(0)``: return freed heap pages to the system.

    A CPU training step frees hundreds of activation-sized tensors; glibc's adaptive mmap threshold soon serves them
    from the heap, whose free pages it keeps. Measured here (e2KD, B-cos ResNet-20, batch 64 at 32 px, 24 steps): the
    resident set grew from 0.76 to 2.8 GB without a trim (the demo reached 13 GB) and stays at 1.3 GB with one per
    step, at no measurable cost in step time. No-op where the C library has no ``malloc_trim``.
    """
    if _TRIM is not None:
        _TRIM(0)


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


_TRIM = _malloc_trim()


def setup(recipe: Recipe, n_train: int, n_data: int = 0, labels: torch.Tensor | None = None) -> Engine:
    """Accelerator, seeded models, method (with its trainable parts), optimiser over both, warm-up + cosine
    schedule over ``n_train`` samples an epoch. ``n_data``: the samples ``Batch.indices`` ranges over; ``labels``:
    their classes, in that order (for methods that need indices)."""
    from accelerate.utils import set_seed

    o = recipe.optim
    accelerator = make_accelerator(recipe)
    set_seed(recipe.run.seed)
    student, teacher = build_models(recipe)
    if teacher is not None:
        teacher.to(accelerator.device)
    size = teacher_size(recipe, teacher)  # before compiling: the spec lives on the uncompiled module
    teacher = apply_run_options(recipe, student, teacher)
    student.to(accelerator.device)
    context = Context(n_data=n_data or n_train, image_size=recipe.data.image_size, epochs=o.epochs,
                      teacher_size=size, labels=labels)
    method = build_method(recipe.distill, student, teacher, context)
    parts = method.parts
    if parts is not None:
        parts.to(accelerator.device)
    optimizer = build_optimizer(recipe, [{"params": list(student.parameters()), "name": "student"},
                                         *method.param_groups()])
    per_step = o.batch_size * accelerator.num_processes * o.grad_accum
    steps_per_epoch = n_train // per_step
    if steps_per_epoch == 0:
        raise GteError(f"{n_train} training samples make no global batch of {per_step} "
                       f"({o.batch_size} × {accelerator.num_processes} processes × {o.grad_accum} accumulation)")
    total = steps_per_epoch * o.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, round(o.warmup_epochs * steps_per_epoch), o.warmup_decay))
    if parts is not None:
        student, parts, optimizer = accelerator.prepare(student, parts, optimizer)
    else:
        student, optimizer = accelerator.prepare(student, optimizer)
    method.attach(student, parts)
    clip = o.clip if o.clip != "auto" else ("agc" if info(student).bcos else "norm")
    return Engine(recipe, accelerator, student, teacher, method, optimizer, scheduler, steps_per_epoch, clip,
                  o.clip_value or (0.01 if clip == "agc" else 1.0))
