"""The training loop: recipe → teacher/student/data → method.loss(batch) → optimiser step → artifacts.

Runs on HF Accelerate (CPU, one or more GPUs; the WebDataset loader is split by rank itself and is not passed through
``accelerator.prepare``). Artifacts in ``run.out``: ``model.safetensors`` (with metadata), ``recipe.toml`` (resolved),
``metrics.jsonl`` (one JSON object per log step and per epoch).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gte.config import Recipe
from gte.data.shards import count_samples, expand_spec, make_loader
from gte.errors import GteError
from gte.methods import METHODS, build_method
from gte.models import build_model, check_arch, freeze, info, save_model


def adaptive_clip_grad_(parameters: Iterable[nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise as in the B-cos v2 trainer."""

    def unitwise_norm(t: torch.Tensor) -> torch.Tensor:
        if t.squeeze().ndim <= 1:
            return torch.linalg.vector_norm(t)
        dim = 1 if t.ndim in (2, 3) else tuple(range(1, t.ndim))  # per output unit (row / filter)
        return torch.linalg.vector_norm(t, dim=dim, keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
        grad_norm = unitwise_norm(p.grad.detach())
        scale = (max_norm / grad_norm.clamp(min=1e-6)).clamp(max=1.0)
        p.grad.detach().mul_(scale)


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_decay: float):
    """LR factor: linear from ``warmup_decay`` to 1 over the warm-up, then cosine to 0 (per optimiser step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_decay + (1.0 - warmup_decay) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(recipe: Recipe, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    o = recipe.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay, nesterov=True)
    raise GteError(f"unknown optim.name '{o.name}' (known: adam, adamw, sgd)")


def validate(recipe: Recipe) -> None:
    """Fail before any work on what a recipe gets wrong (one clear line each)."""
    d = recipe.distill
    if d.method not in METHODS:
        raise GteError(f"unknown distill.method '{d.method}' (known: {', '.join(METHODS)})")
    check_arch(recipe.student.arch)
    if METHODS[d.method].needs_teacher:
        check_arch(recipe.teacher.arch)
        if not recipe.teacher.weights:
            raise GteError("teacher.weights is empty: a distillation teacher must be trained")
    if d.explainer not in ("auto", "bcos", "gradcam"):
        raise GteError(f"unknown distill.explainer '{d.explainer}' (known: auto, bcos, gradcam)")
    if d.guided_every < 1:
        raise GteError("distill.guided_every must be >= 1")
    if recipe.run.mixed_precision not in ("no", "bf16", "fp16"):
        raise GteError(f"run.mixed_precision must be no, bf16 or fp16, got '{recipe.run.mixed_precision}'")
    if recipe.optim.clip not in ("auto", "agc", "norm", "none"):
        raise GteError(f"optim.clip must be auto, agc, norm or none, got '{recipe.optim.clip}'")
    expand_spec(recipe.data.train)
    for spec in (recipe.data.val, recipe.data.test):
        if spec:
            expand_spec(spec)


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=recipe.run.mixed_precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world:
        raise GteError(f"launched {world} processes but Accelerate joined {acc.num_processes}: "
                       "use torchrun or `accelerate launch --multi_gpu`, not `--cpu`")
    return acc


@dataclass
class TrainResult:
    out: Path
    model: nn.Module
    metrics: dict


def train(recipe: Recipe, console: Console | None = None) -> TrainResult:
    """Train ``recipe.student`` with ``recipe.distill.method``; returns the trained (unwrapped) student."""
    console = console or Console(stderr=True)
    validate(recipe)
    accelerator = make_accelerator(recipe)
    from accelerate.utils import set_seed

    set_seed(recipe.run.seed)
    out = Path(recipe.run.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.toml").write_text(recipe.to_toml())

    d, o = recipe.data, recipe.optim
    student = build_model(recipe.student.arch, d.num_classes, recipe.student.weights or None)
    teacher = None
    if METHODS[recipe.distill.method].needs_teacher:
        teacher = freeze(build_model(recipe.teacher.arch, d.num_classes, recipe.teacher.weights))
        teacher.to(accelerator.device)
    optimizer = build_optimizer(recipe, student.parameters())
    student, optimizer = accelerator.prepare(student, optimizer)
    method = build_method(recipe.distill, student, teacher)

    n_train = d.train_size or count_samples(d.train)
    steps_per_epoch = n_train // (o.batch_size * accelerator.num_processes)
    if steps_per_epoch == 0:
        raise GteError(f"{n_train} training samples make no full batch of {o.batch_size} × {accelerator.num_processes}")
    total = steps_per_epoch * o.epochs
    schedule = warmup_cosine(total, round(o.warmup_epochs * steps_per_epoch), o.warmup_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    clip = o.clip if o.clip != "auto" else ("agc" if info(student).bcos else "norm")
    clip_value = o.clip_value or (0.01 if clip == "agc" else 1.0)

    log_path = out / "metrics.jsonl"
    step, t0 = 0, time.time()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not accelerator.is_main_process, transient=True)
    with progress, open(log_path, "a") if accelerator.is_main_process else open(os.devnull, "w") as log:
        task = progress.add_task(f"{recipe.distill.method} {recipe.student.arch}", total=total, stats="")
        for epoch in range(o.epochs):
            student.train()
            sums: dict[str, float] = {}
            seen, t_epoch = 0, time.time()
            loader = make_loader(d.train, train=True, image_size=d.image_size, batch_size=o.batch_size,
                                 crop_scale=tuple(d.crop_scale), num_workers=d.num_workers,
                                 shuffle_buffer=d.shuffle_buffer, seed=recipe.run.seed, epoch=epoch)
            for i, batch in zip(range(steps_per_epoch), loader):
                if batch["label"].min() < 0 or batch["label"].max() >= d.num_classes:
                    raise GteError(f"label {int(batch['label'].max())} in {d.train}, "
                                   f"but data.num_classes = {d.num_classes}")
                images = batch["image"].to(accelerator.device, non_blocking=True)
                labels = batch["label"].to(accelerator.device, non_blocking=True)
                with accelerator.autocast():
                    loss, logs = method.loss(images, labels, step)
                if not torch.isfinite(loss):
                    raise GteError(f"loss is {loss.item()} at step {step}; lower optim.lr or check the data")
                accelerator.backward(loss)
                if clip == "agc":
                    adaptive_clip_grad_(student.parameters(), clip_value)
                elif clip == "norm":
                    accelerator.clip_grad_norm_(student.parameters(), clip_value)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += images.shape[0] * accelerator.num_processes
                logs = {"loss": loss.detach(), **logs}
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                ips = seen / max(time.time() - t_epoch, 1e-9)
                if step % recipe.run.log_every == 0 or i == steps_per_epoch - 1:
                    record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "img_per_s": round(ips, 1),
                              **{k: round(float(v), 6) for k, v in logs.items()}}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                stats = " ".join(f"{k} {float(v):.4f}" for k, v in logs.items())
                progress.update(task, advance=1, stats=f"ep {epoch + 1}/{o.epochs} {stats} {ips:.0f} img/s")
            epoch_record = {"epoch": epoch, "step": step, "time_s": round(time.time() - t0, 2),
                            **{f"train_{k}": round(v / max(1, steps_per_epoch), 6) for k, v in sums.items()}}
            if d.val:
                from gte.evaluate import evaluate

                metrics = evaluate(accelerator.unwrap_model(student), d.val, data=d,
                                   batch_size=o.batch_size, device=accelerator.device)
                epoch_record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                student.train()
            log.write(json.dumps(epoch_record) + "\n")
            log.flush()
            if accelerator.is_main_process:  # the bar is transient (an error leaves one clean line): keep a summary
                console.print(f"{recipe.distill.method} epoch {epoch + 1}/{o.epochs}: " + " ".join(
                    f"{k} {v:.4g}" for k, v in epoch_record.items() if isinstance(v, float)))

    model = accelerator.unwrap_model(student)
    if accelerator.is_main_process:
        save_model(model, out / "model.safetensors", recipe_digest=recipe.digest(),
                   method=recipe.distill.method, teacher=recipe.teacher.arch or "")
    accelerator.wait_for_everyone()
    return TrainResult(out=out, model=model, metrics=epoch_record)
