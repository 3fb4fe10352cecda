"""The embedded demo: synthetic Waterbirds-like shards, a locally trained teacher (both cached), KD vs e2KD.

The distillation split has backgrounds 100 % correlated with the class, so a student can copy the teacher's logits from
the background alone; the test split's conflicting group (background of another class) shows whether it did.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gte import __version__
from gte.config import Recipe, range_problems
from gte.data import synthetic
from gte.errors import GteError
from gte.evaluate import evaluate
from gte.io import check_writable, write_with
from gte.methods import parse_method
from gte.models import REGISTRY, freeze, load_model
from gte.tables import add_columns, compact_table
from gte.train import train
from gte.paths import gte_home  # defined there so light commands need not import this module


LABEL_LOSS = "bce-offlabel-1/C"  # the teacher's label loss: a cache made with another one is not reused


def data_seed(recipe: Recipe) -> int:
    """The seed of the demo's data and teacher: ``demo.data_seed``, or ``run.seed`` where it is -1 (``gte distill
    --seeds`` fixes it, so that every seed's students share one test set and one teacher)."""
    return recipe.demo.data_seed if recipe.demo.data_seed >= 0 else recipe.run.seed


def _cache_dir(recipe: Recipe) -> Path:
    """One cache entry per demo data/teacher configuration (changing them never reuses a stale teacher)."""
    dm, d = recipe.demo, recipe.data
    key = json.dumps([__version__, dm.n_teacher, dm.n_distill, dm.n_test, dm.teacher_arch, dm.teacher_epochs, dm.teacher_lr,
                      d.image_size, d.num_classes, d.crop_scale, data_seed(recipe), recipe.optim.batch_size,
                      dm.background, LABEL_LOSS])
    return gte_home() / "demo" / hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare(recipe: Recipe, console: Console) -> Recipe:
    """Generate the shards and train the teacher once (cached); return the recipe pointing at them."""
    dm, d = recipe.demo, recipe.data
    cache = _cache_dir(recipe)
    data_dir = cache / "data"
    if not (data_dir / "DONE.json").is_file():
        console.print(f"[bold]demo[/]: writing synthetic shards to {data_dir}")
        synthetic.write_demo_shards(data_dir, n_teacher=dm.n_teacher, n_distill=dm.n_distill, n_test=dm.n_test,
                                    image_size=d.image_size, num_classes=d.num_classes, seed=data_seed(recipe),
                                    background=dm.background)
    specs = json.loads((data_dir / "DONE.json").read_text())["specs"]
    teacher_path = cache / "teacher.safetensors"
    if not teacher_path.is_file():
        console.print(f"[bold]demo[/]: training the {dm.teacher_arch} teacher on backgrounds independent of the class")
        t = copy.deepcopy(recipe)
        t.student.arch, t.distill.method = dm.teacher_arch, "ce"
        t.run.seed = data_seed(recipe)  # the teacher of every student seed
        t.data.train, t.data.train_size = specs["teacher"], dm.n_teacher
        t.data.val = t.data.test = ""
        t.optim.epochs, t.optim.lr = dm.teacher_epochs, dm.teacher_lr
        t.run.out = str(cache / "teacher-run")
        result = train(t, console)
        write_with(teacher_path, lambda tmp: shutil.copyfile(result.out / "model.safetensors", tmp))
    ready = copy.deepcopy(recipe)
    ready.data.train, ready.data.train_size, ready.data.test = specs["distill"], dm.n_distill, specs["test"]
    ready.teacher.arch, ready.teacher.weights = dm.teacher_arch, str(teacher_path)
    ready.demo.enabled = False  # the recipe.toml each run saves is an ordinary recipe: re-running it never re-demos
    return ready


def problems(recipe: Recipe) -> list[str]:
    """What keeps the demo recipe from running (``--dry-run`` lists them all; :func:`run_demo` raises the first)."""
    dm, d = recipe.demo, recipe.data
    out = list(range_problems(recipe))
    if not 2 <= d.num_classes <= len(synthetic.CLASS_NAMES):
        out.append(f"the demo draws {len(synthetic.CLASS_NAMES)} shapes: data.num_classes must be in "
                   f"2..{len(synthetic.CLASS_NAMES)}, got {d.num_classes}")
    if d.image_size < 16:
        out.append(f"the demo's shapes need data.image_size >= 16, got {d.image_size}")
    for role, arch in (("demo.teacher_arch", dm.teacher_arch), ("student.arch", recipe.student.arch)):
        if arch not in REGISTRY:
            out.append(f"{role}: unknown model '{arch}'")
    if not dm.methods:
        out.append("demo.methods is empty")
    for m in dm.methods:
        try:
            parse_method(m)
        except GteError as e:
            out.append(f"demo.methods: {e}")
    try:
        check_writable(recipe.run.out, "run.out")
    except GteError as e:
        out.append(str(e))
    return out


# (metric, header) as in the README's demo table; aligned / conflicting are accuracies on those groups
COLUMNS = (("acc1", "acc"), ("aligned", "aligned"), ("conflicting", "conflicting"),
        ("agreement", "agreement"), ("explanation_similarity", "expl. sim."), ("epg", "EPG"))


def _row(metrics: dict) -> dict[str, float]:
    g = metrics.get("groups", {})
    return {"acc1": metrics["acc1"], "aligned": g.get("0", float("nan")), "conflicting": g.get("1", float("nan")),
            "agreement": metrics.get("agreement", 1.0), "explanation_similarity": metrics.get("explanation_similarity", 1.0),
            "epg": metrics.get("epg", float("nan"))}


def results_table(rows: dict[str, dict[str, float]]) -> Table:
    """The demo's result table (%): one row per model, the :data:`COLUMNS`. It fits 80 columns: no vertical rules,
    the architecture on a line of its own; model names fold, numbers never do."""
    table = compact_table("gte demo, test split (%): aligned = background matches the class, conflicting = it does "
                          "not")
    add_columns(table, ["model", *(t for _, t in COLUMNS)], numeric={t for _, t in COLUMNS})
    for name, row in rows.items():
        table.add_row(name.replace(" (", "\n("), *(f"{100 * row[k]:.1f}" for k, _ in COLUMNS))
    return table


def run_demo(recipe: Recipe, console: Console) -> dict[str, dict[str, float]]:
    """Distil the same student with each of ``demo.methods``; print and write (results.json/.md) one table."""
    found = problems(recipe)
    if found:
        raise GteError(found[0])
    ready = prepare(recipe, console)
    out = Path(recipe.run.out)
    teacher = freeze(load_model(ready.teacher.weights))
    rows = {f"teacher ({ready.teacher.arch})": _row(evaluate(teacher, ready.data.test, data=ready.data))}
    for method in recipe.demo.methods:
        r = copy.deepcopy(ready)
        r.distill.method, r.run.out = method, str(out / method)
        console.print(f"[bold]demo[/]: distilling {r.student.arch} with {method}")
        result = train(r, console)
        metrics = result.test  # the run's own data.test evaluation, against the same teacher
        if metrics is None or "agreement" not in metrics:  # a method that trains without the live teacher
            metrics = evaluate(result.model, r.data.test, data=r.data, teacher=teacher)
        (out / method / "eval.json").write_text(json.dumps(metrics, indent=2))
        rows[f"{method} student ({r.student.arch})"] = _row(metrics)

    Console().print(results_table(rows))
    md = ["| model | " + " | ".join(t for _, t in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        md.append(f"| {name} | " + " | ".join(f"{100 * row[k]:.1f}" for k, _ in COLUMNS) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text("\n".join(md) + "\n")
    last = recipe.demo.methods[-1]
    console.print(f"an HTML report with pictures: gte eval {out / last / 'model.safetensors'} --data "
                  f"'{ready.data.test}' --teacher {ready.teacher.weights} --report {out / 'report'}",
                  markup=False, highlight=False, soft_wrap=True)
    return rows
