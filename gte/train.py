"""The training loop: recipe → teacher/student/data → method.loss(batch) → optimiser step → artifacts.

Runs on HF Accelerate (CPU, one or more GPUs; the WebDataset loader is split by rank itself and is not passed through
``accelerator.prepare``). Artifacts in ``run.out``: ``model.safetensors`` (with metadata), ``recipe.toml`` (resolved),
``metrics.jsonl`` (one JSON object per log step and per epoch).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gte import checkpoint
from gte.config import Recipe
from gte.data.shards import count_samples, expand_spec, make_loader
from gte.errors import GteError
from gte.methods import METHODS, build_method
from gte.models import REGISTRY, build_model, check_arch, freeze, info, save_model
from gte.onepass import EXP_GRADS
from gte.optim import apply_update, build_optimizer, warmup_cosine


def validate(recipe: Recipe) -> None:
    """Fail before any work on what a recipe gets wrong (one clear line each)."""
    d = recipe.distill
    if d.method not in METHODS:
        raise GteError(f"unknown distill.method '{d.method}' (known: {', '.join(METHODS)})")
    check_arch(recipe.student.arch)
    if d.exp_grad not in EXP_GRADS:
        raise GteError(f"distill.exp_grad must be {' or '.join(EXP_GRADS)}, got '{d.exp_grad}'")
    if d.exp_topk < 1 or d.exp_norm_weight < 0:
        raise GteError("distill.exp_topk must be >= 1 and distill.exp_norm_weight >= 0")
    if (d.exp_topk > 1 or d.exp_student_top1) and d.frozen:
        raise GteError("distill.exp_topk / exp_student_top1 need a live teacher: frozen shards store one map")
    if d.frozen:
        if not METHODS[d.method].needs_teacher:
            raise GteError(f"distill.frozen needs method kd or e2kd, not '{d.method}' (frozen teaching replaces a "
                           "teacher)")
        from gte.precompute import check_frozen_shards

        check_frozen_shards(recipe)
    elif METHODS[d.method].needs_teacher:
        check_arch(recipe.teacher.arch)
        if not recipe.teacher.weights:
            raise GteError("teacher.weights is empty: a distillation teacher must be trained")
        if not Path(recipe.teacher.weights).is_file():
            from gte.teachers import resolve

            if resolve(recipe.teacher.weights) is None:  # raises for a catalog name that is not downloaded
                raise GteError(f"teacher.weights: no such file or teacher name: {recipe.teacher.weights}")
    if recipe.student.weights and not Path(recipe.student.weights).is_file():
        raise GteError(f"student.weights: no such file: {recipe.student.weights}")
    if d.explainer not in ("auto", "bcos", "gradcam"):
        raise GteError(f"unknown distill.explainer '{d.explainer}' (known: auto, bcos, gradcam)")
    if d.guided_every < 1:
        raise GteError("distill.guided_every must be >= 1")
    if recipe.run.compile_teacher and d.method == "e2kd" and not d.frozen:
        check_compilable_teacher(recipe)
    if recipe.run.mixed_precision not in ("no", "bf16", "fp16"):
        raise GteError(f"run.mixed_precision must be no, bf16 or fp16, got '{recipe.run.mixed_precision}'")
    if recipe.run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise GteError("run.mixed_precision = 'fp16' needs a GPU (use 'bf16' on CPU)")
    if recipe.optim.grad_accum < 1 or recipe.optim.batch_size < 1:
        raise GteError("optim.batch_size and optim.grad_accum must be >= 1")
    if recipe.optim.clip not in ("auto", "agc", "norm", "none"):
        raise GteError(f"optim.clip must be auto, agc, norm or none, got '{recipe.optim.clip}'")
    expand_spec(recipe.data.train)
    for spec in (recipe.data.val, recipe.data.test):
        if spec:
            expand_spec(spec)


def check_compilable_teacher(recipe: Recipe) -> None:
    """``run.compile_teacher`` with explanations: only B-cos W(x) (call after ``check_arch(student.arch)``)."""
    d = recipe.distill
    explainer = d.explainer if d.explainer != "auto" else ("bcos" if REGISTRY[recipe.student.arch][1] else "gradcam")
    if explainer == "gradcam":
        raise GteError("run.compile_teacher needs B-cos explanations: GradCAM's per-call hooks would make "
                       "torch.compile recompile the teacher every guided step")


def make_accelerator(recipe: Recipe):
    """An Accelerator for this launch; refuses launches whose processes did not join one process group."""
    from accelerate import Accelerator
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
        raise GteError(f"`accelerate launch --cpu --num_processes {n}` starts ONE process: "
                       f"use `accelerate launch --multi_gpu --num_processes {n}` (CPU is used when there is no GPU) "
                       "or torchrun")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world:
        raise GteError(f"launched {world} processes but Accelerate joined {acc.num_processes}: "
                       "use torchrun or `accelerate launch --multi_gpu`, not `--cpu`")
    return acc


def _processes_asked_of_accelerate_cpu() -> int:
    """--num_processes of a parent `accelerate launch --cpu` that started this single process (0 if none)."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:
        return 0
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return 0
    for i, a in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            value = a[len(flag) + 1:] if a.startswith(flag + "=") else (args[i + 1] if a == flag and i + 1 < len(args)
                                                                         else None)
            if value is not None and value.isdigit() and "--multi_gpu" not in args:
                return int(value)
    return 0


def training_digest(recipe: Recipe) -> str:
    """Digest of everything that shapes the training trajectory (not paths, logging or checkpoint cadence)."""
    import hashlib

    d = recipe.to_dict()
    d["run"] = {"seed": recipe.run.seed, "mixed_precision": recipe.run.mixed_precision}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


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

    def agree(self, accelerator, loss: torch.Tensor) -> tuple[bool, bool]:
        """(stop requested on any rank, loss non-finite on any rank) — one tiny all-reduce when distributed."""
        flags = torch.stack([torch.tensor(float(self.signal is not None), device=loss.device),
                             (~torch.isfinite(loss.detach())).float()])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        stop, bad = flags.tolist()
        return stop > 0, bad > 0


@dataclass
class TrainResult:
    out: Path
    model: nn.Module
    metrics: dict


class Interrupted(GteError):
    """SIGINT/SIGTERM: a checkpoint was saved; the exit code is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _logged_step(line: str) -> float:
    """Step of a metrics.jsonl line; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _position(step: int, epoch: int, batch: int, digest: str) -> dict[str, Any]:
    return {"step": step, "epoch": epoch, "batch": batch, "digest": digest}


def train(recipe: Recipe, console: Console | None = None) -> TrainResult:
    """Train ``recipe.student`` with ``recipe.distill.method``; resumes from ``OUT/checkpoints`` when it can."""
    from accelerate.utils import gather_object, set_seed

    console = console or Console(stderr=True)
    validate(recipe)
    accelerator = make_accelerator(recipe)
    set_seed(recipe.run.seed)
    d, o, r = recipe.data, recipe.optim, recipe.run
    out, digest = Path(r.out), training_digest(recipe)
    ckpt_dir = out / "checkpoints"
    main = accelerator.is_main_process

    student = build_model(recipe.student.arch, d.num_classes, recipe.student.weights or None)
    teacher = None  # frozen teaching: never built nor loaded, the shards carry its outputs
    if METHODS[recipe.distill.method].needs_teacher and not recipe.distill.frozen:
        teacher = freeze(build_model(recipe.teacher.arch, d.num_classes, recipe.teacher.weights))
        teacher.to(accelerator.device)
    if r.channels_last:  # convolutions then run NHWC (inputs follow the weights' format)
        for m in (student, teacher):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    if r.compile_teacher and teacher is not None:  # the student cannot be: torch.compile has no double backward
        teacher = torch.compile(teacher)
    optimizer = build_optimizer(recipe, student.parameters())
    n_train = d.train_size or count_samples(d.train)
    per_step = o.batch_size * accelerator.num_processes * o.grad_accum
    steps_per_epoch = n_train // per_step
    if steps_per_epoch == 0:
        raise GteError(f"{n_train} training samples make no global batch of {per_step} "
                       f"({o.batch_size} × {accelerator.num_processes} processes × {o.grad_accum} accumulation)")
    total = steps_per_epoch * o.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, round(o.warmup_epochs * steps_per_epoch), o.warmup_decay))
    student, optimizer = accelerator.prepare(student, optimizer)
    method = build_method(recipe.distill, student, teacher)
    clip = o.clip if o.clip != "auto" else ("agc" if info(student).bcos else "norm")
    clip_value = o.clip_value or (0.01 if clip == "agc" else 1.0)

    position = None
    found = checkpoint.checkpoints(ckpt_dir)
    if found and not r.resume:
        raise GteError(f"{ckpt_dir} holds checkpoints and run.resume is false: choose another --out")
    if found:
        position = checkpoint.load(found[-1], model=accelerator.unwrap_model(student), optimizer=optimizer,
                                   scheduler=scheduler)
        if position["digest"] != digest:
            raise GteError(f"{ckpt_dir} holds checkpoints of a different recipe: choose another --out")
        if main:
            console.print(f"resuming from {found[-1]} (step {position['step']})")
    step = position["step"] if position else 0
    log_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.toml").write_text(recipe.to_toml())
        if position and log_path.exists():  # drop lines of steps that will be run again
            kept = [x for x in log_path.read_text().splitlines() if _logged_step(x) <= step]
            log_path.with_suffix(".tmp").write_text("".join(f"{x}\n" for x in kept))
            os.replace(log_path.with_suffix(".tmp"), log_path)
    if r.trackers:
        accelerator.init_trackers("gte", config=json.loads(json.dumps(recipe.to_dict()["optim"])))

    def save_checkpoint(epoch: int, batch: int, epoch_rng: dict) -> None:
        rngs = gather_object([epoch_rng])
        if main:
            checkpoint.save(ckpt_dir, model=accelerator.unwrap_model(student), optimizer=optimizer,
                            scheduler=scheduler, position=_position(step, epoch, batch, digest), rng=rngs,
                            keep=r.keep_checkpoints)
        accelerator.wait_for_everyone()

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not main, transient=True)
    flags = StopFlags()
    t0, epoch_record = time.time(), {}
    try:
        with progress, open(log_path if main else os.devnull, "a") as log:
            task = progress.add_task(f"{recipe.distill.method} {recipe.student.arch}", total=total, completed=step,
                                     stats="")
            start_epoch = position["epoch"] if position else 0
            for epoch in range(start_epoch, o.epochs):
                resume_here = position is not None and epoch == start_epoch
                if resume_here:
                    checkpoint.set_rng_state(position["rng"][accelerator.process_index])
                epoch_rng = checkpoint.rng_state()
                first = position["batch"] if resume_here else 0
                student.train()
                loader = make_loader(d.train, train=True, image_size=d.image_size, batch_size=o.batch_size,
                                     crop_scale=tuple(d.crop_scale), num_workers=d.num_workers,
                                     shuffle_buffer=d.shuffle_buffer, seed=r.seed, epoch=epoch,
                                     train_size=d.train_size, max_bad_fraction=d.max_bad_fraction,
                                     start_batch=first * o.grad_accum,  # resume: skips without decoding
                                     **frozen_members(recipe))
                sums: dict[str, torch.Tensor] = {}
                t_epoch = time.time()
                for i in range(first, steps_per_epoch):
                    logs, stop = accumulate_gradients(accelerator, method, student, loader, recipe, step, flags)
                    apply_update(accelerator, student, optimizer, scheduler, clip, clip_value)
                    step += 1
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v
                    ips = (i + 1 - first) * per_step / max(time.time() - t_epoch, 1e-9)
                    if step % r.log_every == 0 or i == steps_per_epoch - 1:
                        record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                                  "img_per_s": round(ips, 1), "skipped": loader.skipped,
                                  **{k: round(float(v), 6) for k, v in logs.items()}}
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        if r.trackers:
                            accelerator.log(record, step=step)
                        stats = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k in logs)
                        bad = f" {loader.skipped} skipped" if loader.skipped else ""
                        progress.update(task, stats=f"ep {epoch + 1}/{o.epochs} {stats} {ips:.0f} img/s{bad}")
                    progress.update(task, advance=1)
                    if stop:
                        save_checkpoint(epoch, i + 1, epoch_rng)
                        raise Interrupted(f"interrupted at step {step}: checkpoint saved in {ckpt_dir}; "
                                          "run the same command again to resume", flags.signal or signal.SIGTERM)
                    if r.checkpoint_every and step % r.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                        save_checkpoint(epoch, i + 1, epoch_rng)
                n = max(1, steps_per_epoch - first)
                skipped = int(accelerator.reduce(torch.tensor(loader.skipped, device=accelerator.device), "sum"))
                epoch_record = {"epoch": epoch, "step": step, "time_s": round(time.time() - t0, 2),
                                "train_skipped": skipped,
                                **{f"train_{k}": round(float(v) / n, 6) for k, v in sums.items()}}
                if d.val:
                    from gte.evaluate import evaluate

                    metrics = evaluate(accelerator.unwrap_model(student), d.val, data=d,
                                       batch_size=o.batch_size, device=accelerator.device)
                    epoch_record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                log.write(json.dumps(epoch_record) + "\n")
                log.flush()
                if main:  # the bar is transient (an error leaves one clean line): keep a summary
                    console.print(f"{recipe.distill.method} epoch {epoch + 1}/{o.epochs}: " + " ".join(
                        f"{k} {v:.4g}" for k, v in epoch_record.items() if isinstance(v, float)))
                save_checkpoint(epoch + 1, 0, checkpoint.rng_state())
    finally:
        flags.restore()
        if r.trackers:
            accelerator.end_training()

    model = accelerator.unwrap_model(student)
    if main:
        save_model(model, out / "model.safetensors", recipe_digest=recipe.digest(),
                   method=recipe.distill.method, teacher=recipe.teacher.arch or "")
    accelerator.wait_for_everyone()
    return TrainResult(out=out, model=model, metrics=epoch_record)


def frozen_members(recipe: Recipe) -> dict[str, tuple[str, ...]]:
    """``make_loader`` arguments that read the stored teacher outputs (frozen teaching), else none."""
    if not recipe.distill.frozen:
        return {}
    from gte.precompute import LOGITS, MAP

    members = (LOGITS, MAP) if recipe.distill.method == "e2kd" else (LOGITS,)
    return {"members": members, "maps": (MAP,) if MAP in members else ()}


def frozen_batch(batch: dict, device) -> dict[str, torch.Tensor] | None:
    """The batch's stored teacher outputs as ``method.loss(…, frozen=…)`` takes them (None when not frozen)."""
    from gte.precompute import LOGITS, MAP

    if LOGITS not in batch:
        return None
    out = {"logits": batch[LOGITS].to(device, non_blocking=True)}
    if MAP in batch:
        out["map"] = batch[MAP].to(device, non_blocking=True)
    return out


def multi_hot(batch: dict, num_classes: int, source: str) -> torch.Tensor:
    """N×C targets from each sample's ``json.labels`` (multi-label data such as VOC)."""
    out = torch.zeros(len(batch["labels"]), num_classes)
    for i, labels in enumerate(batch["labels"]):
        if labels is None:
            raise GteError(f"distill.multilabel is set but a sample in {source} has no json.labels")
        if any(not 0 <= c < num_classes for c in labels):
            raise GteError(f"label {max(labels)} in {source}, but data.num_classes = {num_classes}")
        out[i, list(labels)] = 1.0
    return out


def accumulate_gradients(accelerator, method, student, loader, recipe: Recipe, step: int,
                         flags: StopFlags) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward/backward over ``grad_accum`` micro-batches (gradients synchronised on the last one only)."""
    import contextlib

    d, accum = recipe.data, recipe.optim.grad_accum
    totals: dict[str, torch.Tensor] = {}
    stop = False
    for j in range(accum):
        try:
            batch = next(loader)
        except StopIteration:
            raise GteError(f"{d.train} ran out of samples before the epoch's last step "
                           "(data.train_size larger than the shards?)") from None
        labels = multi_hot(batch, d.num_classes, d.train) if recipe.distill.multilabel else batch["label"]
        if labels.ndim == 1 and (labels.min() < 0 or labels.max() >= d.num_classes):
            raise GteError(f"label {int(labels.max())} in {d.train}, but data.num_classes = {d.num_classes}")
        images = batch["image"].to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        sync = contextlib.nullcontext() if j == accum - 1 else accelerator.no_sync(student)
        with sync:
            with accelerator.autocast():
                loss, logs = method.loss(images, labels, step, frozen=frozen_batch(batch, accelerator.device))
            stop_any, bad = flags.agree(accelerator, loss)
            if bad:
                raise GteError(f"non-finite loss at step {step}: stopped; the last good checkpoint is kept "
                               "(lower optim.lr, or check the data)")
            accelerator.backward(loss / accum)
        stop = stop or stop_any
        for k, v in {"loss": loss.detach(), **logs}.items():
            totals[k] = totals.get(k, 0.0) + v.float() / accum
    return totals, stop
