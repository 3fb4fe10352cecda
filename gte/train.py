"""The training loop: recipe → teacher/student/data → method.loss(batch) → optimiser step → artifacts.

Runs on HF Accelerate (CPU, one or more GPUs; the WebDataset loader is split by rank itself and is not passed through
``accelerator.prepare``). The models, method and optimiser come from :func:`gte.engine.setup`; this module owns the
epochs, resuming, logging and the artifacts in ``run.out``: ``model.safetensors`` (with metadata), ``recipe.toml``
(resolved), ``metrics.jsonl`` (one JSON object per log step and per epoch), ``checkpoints/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gte import checkpoint, frozen
from gte.config import Recipe
from gte.data.index import ShardSet, count_samples, resolve_shards, shard_class_names
from gte.data.info import sample_labels
from gte.data.loader import make_loader
from gte.engine import Engine, StopFlags, setup
from gte.errors import GteError, Interrupted
from gte.evaluate import evaluate, unrelated_labels
from gte.io import atomic_write_text
from gte.methods import parse_method
from gte.models import info, save_model
from gte.text import shorten
from gte.validate import validate


def training_dict(recipe: Recipe) -> dict[str, Any]:
    """Everything that shapes the training trajectory (not paths, logging or checkpoint cadence), by section."""
    d = recipe.to_dict()
    d["run"] = {"seed": recipe.run.seed, "mixed_precision": recipe.run.mixed_precision}
    del d["demo"]  # which methods the demo compares does not change how one of them trains
    return d


def training_digest(recipe: Recipe) -> str:
    """Digest of :func:`training_dict`: a checkpoint resumes only under the recipe that wrote it (or its extension)."""
    return hashlib.sha256(json.dumps(training_dict(recipe), sort_keys=True).encode()).hexdigest()[:12]


# training keys gte gained after checkpoints recorded their recipe, with the value that reproduces how a checkpoint
# written without them trained: such a checkpoint reads as having that value (it resumes under a recipe that sets it;
# otherwise the refusal names the key and its value)
ADDED_KEYS: dict[str, dict[str, Any]] = {"data": {"reduced_decode": False, "decode_margin": 2.0}}


def recipe_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``section.key`` → (saved value, value now) for every training key that differs."""
    saved = {s: {**ADDED_KEYS.get(s, {}), **section} if isinstance(section, dict) else section
             for s, section in saved.items()}
    keys = {(s, k) for d in (saved, now) for s, section in d.items() for k in section}
    missing = object()
    out = {}
    for s, k in sorted(keys):
        a, b = saved.get(s, {}).get(k, missing), now.get(s, {}).get(k, missing)
        if a != b:
            out[f"{s}.{k}"] = (None if a is missing else a, None if b is missing else b)
    return out


def check_resumable(position: dict[str, Any], recipe: Recipe, checkpoint_dir: Path) -> str | None:
    """Whether the checkpoint at ``position`` may resume under ``recipe``: None for the same recipe, a note for an
    extended one (only ``optim.epochs`` raised, to no fewer epochs than it has done), else :class:`OtherRecipe`
    naming what changed and the way forward. An extension stretches the cosine schedule over the new length: the
    learning rate continues from the new schedule's value at the checkpoint's step."""
    if position.get("digest") == training_digest(recipe):
        return None
    saved = position.get("training")
    changes = recipe_changes(saved, training_dict(recipe)) if isinstance(saved, dict) else {}
    if isinstance(saved, dict) and not changes:
        return None  # the same recipe once the keys added since it was written read as their old behaviour
    done = position.get("epoch", 0) + (1 if position.get("batch", 0) else 0)
    if set(changes) == {"optim.epochs"}:
        old, new = changes["optim.epochs"]
        if isinstance(old, int) and new > old and new >= done:
            return (f"extending the run from {old} to {new} epochs: the cosine schedule is stretched over the new "
                    f"length from step {position.get('step', 0)} on")
    what = (", ".join(f"{k} {shorten(json.dumps(a), 40)} → {shorten(json.dumps(b), 40)}"
                      for k, (a, b) in list(changes.items())[:4])
            + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")) if changes else "not recorded"
    newest = checkpoint.checkpoints(checkpoint_dir)[-1:]
    weights = f"--set student.weights={newest[0] / 'model.safetensors'} " if newest else ""
    raise checkpoint.OtherRecipe(
        f"{checkpoint_dir} holds checkpoints of a different recipe (changed: {what}); only raising optim.epochs "
        f"extends a run: choose another --out, or start a new run from these weights with {weights}--out NEW_DIR")


# validation metrics that are shares of samples, shown as percentages in the epoch line (metrics.jsonl keeps fractions)
PERCENT = ("acc1", "acc5", "agreement", "acc")


def _shown(key: str, value: float) -> str:
    return f"{100 * value:.1f} %" if key.startswith("val_") and key.endswith(PERCENT) else f"{value:.4g}"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class TrainResult:
    out: Path
    model: nn.Module
    metrics: dict                   # the last epoch's metrics.jsonl record
    test: dict | None = None        # data.test metrics (OUT/test.json), when the recipe has a test split


def _logged_step(line: str) -> float:
    """Step of a metrics.jsonl line; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _best_score(path: Path, metric: str) -> float:
    """The validation ``metric`` recorded in a ``model-best.safetensors`` (-1 when there is none)."""
    if not path.is_file():
        return -1.0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return float((f.metadata() or {}).get(f"val_{metric}", -1.0))


class _Run:
    """One training run's state between steps: where it is, where it writes, what it logged."""

    def __init__(self, recipe: Recipe, engine: Engine, console: Console):
        self.recipe, self.engine, self.console = recipe, engine, console
        self.out = Path(recipe.run.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.digest = training_digest(recipe)
        self.training = training_dict(recipe)
        self.main = engine.accelerator.is_main_process
        self.position: dict[str, Any] | None = None
        self.step = 0
        # labels that do not index the models' classes (own photos under an ImageNet teacher): validation compares
        # with the teacher, and model-best follows agreement instead of a meaningless accuracy
        self.unrelated = unrelated_labels(shard_class_names(recipe.data.val or recipe.data.train),
                                          [engine.model(), engine.teacher])
        self.best_by = "agreement" if self.unrelated and engine.teacher is not None else "acc1"
        # batch jobs and logs get a plain line now and then instead of the live bar (drawn on terminals only)
        self.lines = self.main and not console.is_terminal and recipe.run.progress_every > 0
        self.last_line = time.time()

    def resume(self) -> None:
        """Load the last checkpoint (if any; a different recipe's is refused) and prepare ``run.out``."""
        e, r = self.engine, self.recipe.run
        found = checkpoint.checkpoints(self.ckpt_dir)
        if found and not r.resume:
            raise GteError(f"{self.ckpt_dir} holds checkpoints and run.resume is false: choose another --out")
        for i, path in enumerate(reversed(found)):  # newest first; an unreadable one falls back to the one before
            try:
                saved = checkpoint.read_position(path)
                note = check_resumable(saved, self.recipe, self.ckpt_dir)
                self.position = checkpoint.load(path, model=e.model(), optimizer=e.optimizer, scheduler=e.scheduler,
                                                method=e.method)
                if note and self.main:
                    self.console.print(note, markup=False, highlight=False)
            except checkpoint.OtherRecipe:
                raise
            except GteError as err:
                if i == len(found) - 1:
                    raise
                if self.main:
                    self.console.print(f"{err}; trying the previous checkpoint", markup=False)
                continue
            self.step = self.position["step"]
            if self.main:
                self.console.print(f"resuming from {path} (step {self.step})")
            break
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.toml", self.recipe.to_toml())
            if self.position is None:  # a fresh run: an earlier run's best model is not this run's
                (self.out / "model-best.safetensors").unlink(missing_ok=True)
            log = self.out / "metrics.jsonl"
            if self.position and log.exists():  # drop lines of steps that will be run again
                kept = [x for x in log.read_text().splitlines() if _logged_step(x) <= self.step]
                atomic_write_text(log, "".join(f"{x}\n" for x in kept))

    def keep_best(self, metrics: dict, epoch: int, meta: dict[str, str]) -> None:
        """``model-best.safetensors``: the student of the epoch with the best validation :attr:`best_by` so far."""
        best = self.out / "model-best.safetensors"
        score = metrics[self.best_by]
        if not self.main or score <= _best_score(best, self.best_by):
            return
        save_model(self.engine.model(), best, **meta, **{f"val_{self.best_by}": f"{score:.6f}"},
                   epoch=str(epoch + 1))

    def save_checkpoint(self, epoch: int, batch: int, epoch_rng: dict) -> None:
        from accelerate.utils import gather_object

        e = self.engine
        rngs = gather_object([epoch_rng])
        if self.main:
            checkpoint.save(self.ckpt_dir, model=e.model(), optimizer=e.optimizer, scheduler=e.scheduler,
                            position={"step": self.step, "epoch": epoch, "batch": batch, "digest": self.digest,
                                      "training": self.training},
                            rng=rngs, keep=self.recipe.run.keep_checkpoints, method_state=e.method.state_dict())
        e.accelerator.wait_for_everyone()

    def epoch(self, epoch: int, shards, log: IO[str], progress: Progress, task: Any, flags: StopFlags) -> dict:
        """Train one epoch (from the resumed batch on the first); returns its metrics.jsonl record."""
        e, d, o, r = self.engine, self.recipe.data, self.recipe.optim, self.recipe.run
        resume_here = self.position is not None and epoch == self.position["epoch"]
        if resume_here:
            checkpoint.set_rng_state(self.position["rng"][e.accelerator.process_index])
        epoch_rng = checkpoint.rng_state()
        first = self.position["batch"] if resume_here else 0
        e.student.train()
        loader = make_loader(shards, train=True, image_size=d.image_size, batch_size=o.batch_size,
                             crop_scale=tuple(d.crop_scale), interpolation=d.interpolation, num_workers=d.num_workers,
                             shuffle_buffer=d.shuffle_buffer, seed=r.seed, epoch=epoch, train_size=d.train_size,
                             max_bad_fraction=d.max_bad_fraction, reduced_decode=d.reduced_decode,
                             decode_margin=d.decode_margin,
                             start_batch=first * o.grad_accum,  # resume: skips without decoding
                             indices=e.method.needs.indices, **frozen.loader_members(self.recipe))
        sums: dict[str, torch.Tensor] = {}
        t_epoch = time.time()
        for i in range(first, e.steps_per_epoch):
            logs, stop = e.accumulate(loader, self.step, flags)
            e.update()
            self.step += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.step % r.log_every == 0 or i == e.steps_per_epoch - 1:
                ips = (i + 1 - first) * e.per_step / max(time.time() - t_epoch, 1e-9)
                self._log_step(log, logs, epoch, ips, loader.skipped, progress, task)
            progress.update(task, advance=1)
            if stop:
                self.save_checkpoint(epoch, i + 1, epoch_rng)
                raise Interrupted(f"interrupted at step {self.step}: checkpoint saved in {self.ckpt_dir}; "
                                  "run the same command again to resume", flags.signal or signal.SIGTERM)
            if r.checkpoint_every and self.step % r.checkpoint_every == 0 and i + 1 < e.steps_per_epoch:
                self.save_checkpoint(epoch, i + 1, epoch_rng)
        n = max(1, e.steps_per_epoch - first)
        skipped = int(e.accelerator.reduce(torch.tensor(loader.skipped, device=e.accelerator.device), "sum"))
        return {"epoch": epoch, "step": self.step, "train_skipped": skipped,
                **{f"train_{k}": round(float(v) / n, 6) for k, v in sums.items()}}

    def _log_step(self, log: IO[str], logs: dict, epoch: int, ips: float, skipped: int, progress: Progress,
                  task: Any) -> None:
        # float(v) is a host sync: only on log steps (nanoGPT's rule).
        record = {"step": self.step, "epoch": epoch, "lr": self.engine.scheduler.get_last_lr()[0],
                  "img_per_s": round(ips, 1), "skipped": skipped, **{k: round(float(v), 6) for k, v in logs.items()}}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if self.recipe.run.trackers:
            self.engine.accelerator.log(record, step=self.step)
        stats = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k in logs)
        bad = f" {skipped} skipped" if skipped else ""
        where = f"ep {epoch + 1}/{self.recipe.optim.epochs} {stats} {ips:.0f} img/s{bad}"
        progress.update(task, stats=where)
        if self.lines and time.time() - self.last_line >= self.recipe.run.progress_every:
            self.last_line = time.time()
            e = self.engine
            eta = (e.total_steps - self.step) * e.per_step / max(ips, 1e-9)
            self.console.print(f"step {self.step}/{e.total_steps} {where} ETA {_hms(eta)}", markup=False,
                               highlight=False)


def artifact_metadata(recipe: Recipe, shards: ShardSet, teacher: nn.Module | None = None) -> dict[str, str]:
    """What ``model.safetensors`` says about its run, with class names: a distilled student's outputs are its
    teacher's classes (the teacher's names, when it knows them), else the data's (when they name every class)."""
    meta = {"recipe_digest": recipe.digest(), "method": recipe.distill.method, "teacher": recipe.teacher.arch or ""}
    names = list(info(teacher).class_names) if teacher is not None else []
    if not names:
        names = shard_class_names(shards) or []
    if len(names) == recipe.data.num_classes:
        meta["class_names"] = json.dumps(names)
    return meta


def hyperparameters(recipe: Recipe) -> dict[str, Any]:
    """Every recipe key as ``section.key`` -> a scalar (lists as strings), as trackers take hyperparameters."""
    return {f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for section, values in recipe.to_dict().items() for k, v in values.items()}


def data_summary(recipe: Recipe, shards: ShardSet, engine: Engine) -> str:
    """What the run will read, printed at its start: shards, samples and steps of each split."""
    d, o = recipe.data, recipe.optim
    sizes = shards.sizes
    n = d.train_size or sum(sizes or [])
    lines = [f"data.train: {len(shards.urls)} shard(s), {n if n else '?'} samples"
             + (" (data.train_size)" if d.train_size else "")
             + f"; {engine.steps_per_epoch} steps/epoch × {engine.per_step} = "
             f"{engine.steps_per_epoch * engine.per_step} samples per epoch"
             f" ({o.batch_size} per process × {engine.accelerator.num_processes} × {o.grad_accum} accumulation)"]
    for key in ("val", "test"):
        spec = getattr(d, key)
        if spec:
            other = resolve_shards(spec)
            m = sum(other.sizes) if other.sizes is not None else "?"
            lines.append(f"data.{key}: {len(other.urls)} shard(s), {m} samples")
    return "\n".join(lines)


def train(recipe: Recipe, console: Console | None = None) -> TrainResult:
    """Train ``recipe.student`` with ``recipe.distill.method``; resumes from ``OUT/checkpoints`` when it can."""
    console = console or Console(stderr=True)
    validate(recipe)
    d, o = recipe.data, recipe.optim
    shards = resolve_shards(d.train)  # once: every epoch's loader reuses its URLs and sample counts
    n_data = count_samples(shards) if shards.sizes is not None else 0
    labels = None
    if n_data and parse_method(recipe.distill.method)[0].needs.indices:  # e.g. CRD's negatives of other classes
        labels = torch.from_numpy(sample_labels(shards))
    engine = setup(recipe, d.train_size or count_samples(shards), n_data, labels)
    run = _Run(recipe, engine, console)
    if run.main:
        console.print(data_summary(recipe, shards, engine), highlight=False, markup=False, soft_wrap=True)
        if run.unrelated:
            console.print(f"note: {run.unrelated}" + ("; model-best follows validation agreement"
                                                      if run.best_by == "agreement" and d.val else ""),
                          highlight=False, markup=False, soft_wrap=True)
    run.resume()
    if recipe.run.trackers:
        engine.accelerator.init_trackers("gte", config=hyperparameters(recipe))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not run.main,
                        transient=True)
    flags = StopFlags()
    t0, record = time.time(), {}
    meta = artifact_metadata(recipe, shards, engine.teacher)
    try:
        with progress, open(run.out / "metrics.jsonl" if run.main else os.devnull, "a") as log:
            task = progress.add_task(f"{recipe.distill.method} {recipe.student.arch}", total=engine.total_steps,
                                     completed=run.step, stats="")
            for epoch in range(run.position["epoch"] if run.position else 0, o.epochs):
                record = run.epoch(epoch, shards, log, progress, task, flags)
                record = {"epoch": epoch, "step": run.step, "time_s": round(time.time() - t0, 2), **record}
                if d.val:
                    metrics = evaluate(engine.model(), d.val, data=d, batch_size=o.batch_size,
                                       device=engine.accelerator.device,
                                       teacher=engine.teacher if run.best_by == "agreement" else None)
                    record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                    run.keep_best(metrics, epoch, meta)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if run.main:  # the bar is transient (an error leaves one clean line): keep a summary
                    console.print(f"{recipe.distill.method} epoch {epoch + 1}/{o.epochs}: " + " ".join(
                        f"{k} {_shown(k, v)}" for k, v in record.items() if isinstance(v, float)))
                run.save_checkpoint(epoch + 1, 0, checkpoint.rng_state())
    finally:
        flags.restore()
        if recipe.run.trackers:
            engine.accelerator.end_training()
    model = engine.model()
    if run.main:
        save_model(model, run.out / "model.safetensors", **meta)
    engine.accelerator.wait_for_everyone()
    test = evaluate_test(recipe, engine, console, run.unrelated) if d.test else None
    return TrainResult(out=run.out, model=model, metrics=record, test=test)


def evaluate_test(recipe: Recipe, engine: Engine, console: Console, unrelated: str = "") -> dict:
    """The final student on ``data.test`` (once, at the end; against the run's teacher when it has one), written to
    ``OUT/test.json`` and summarised in one line; ``unrelated``: why its accuracy is not meaningful (marked so)."""
    metrics = evaluate(engine.model(), recipe.data.test, data=recipe.data, teacher=engine.teacher,
                       batch_size=recipe.optim.batch_size, device=engine.accelerator.device)
    if unrelated:
        metrics.update(labels_meaningful=False, labels_note=unrelated)
    if engine.accelerator.is_main_process:
        atomic_write_text(Path(recipe.run.out) / "test.json", json.dumps(metrics, indent=2))
        shown = {k: metrics[k] for k in ("acc1", "agreement", "explanation_similarity", "worst_group_acc")
                 if isinstance(metrics.get(k), float) and not (unrelated and k == "acc1")}
        console.print(f"data.test ({metrics['n']} samples): " + " ".join(  # shares in %, the similarity a cosine
            f"{k} {v:.3f}" if k == "explanation_similarity" else f"{k} {100 * v:.1f} %" for k, v in shown.items())
                      + f"; {Path(recipe.run.out) / 'test.json'}", markup=False, highlight=False)
    return metrics
