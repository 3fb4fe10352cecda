"""``gte compare``: several students (seeds × methods) on the same shards; mean ± std per method, paired differences
with bootstrap intervals and McNemar tests; a table, JSON and an HTML/Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gte.commands._common import check_sizes, err
from gte.errors import GteError

def compare_command(
    models: List[str] = typer.Argument(..., help="Run directories (OUT of gte distill) or model files; runs of one "
                                       "recipe that differ in run.seed only are grouped as one method."),
    data: Optional[str] = typer.Option(None, "--data", help="Shard spec of the common test set (default: the runs' "
                                       "data.test, where their recipes share one)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher for agreement and explanation cosine "
                                          "(default: the runs' teacher.weights, where their recipes share one)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON (- = stdout, no table)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.md + self-contained report.html here."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop size (default: the first "
                                             "model's own)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    reps: int = typer.Option(2000, "--bootstrap", help="Bootstrap replicates of each interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling and of the report's images."),
    waterbirds: Optional[bool] = typer.Option(None, "--waterbirds/--no-waterbirds", help="Waterbirds metrics "
                                              "(default: detect 4 groups + 2 classes)."),
    examples: int = typer.Option(6, "--examples", help="Images in the report's explanation grid."),
) -> None:
    """Students of several methods and seeds on one test set: mean ± std, paired 95 % CIs, McNemar p-values."""
    if batch_size < 1 or reps < 100 or examples < 0:
        raise GteError("--batch-size must be positive, --bootstrap at least 100, --examples not negative")
    check_sizes(image_size)
    from gte.io import check_writable

    if json_out and json_out != "-":
        if not Path(json_out).resolve().parent.is_dir():
            raise GteError(f"--json {json_out}: the directory {Path(json_out).resolve().parent} does not exist")
        check_writable(Path(json_out).resolve().parent, "--json")
    if report:
        check_writable(report, "--report")
    from gte import dist
    from gte.commands.eval import train_group_sizes
    from gte.compare import collect, find_runs, summarise
    from gte.config import DataConfig
    from gte.models import eval_geometry, freeze, info, load_model

    if dist.launched_world_size() > 1:
        raise GteError("gte compare runs in one process (start it without torchrun)")
    runs = find_runs(models)
    data = data or shared_value(runs, "data", "test", "--data")
    teacher = teacher or shared_value(runs, "teacher", "weights", "") or None
    device = dist.device()
    students = [load_model(r.model).to(device) for r in runs]
    t = freeze(load_model(teacher)).to(device) if teacher else None
    size, resize = eval_geometry(students[0], image_size, 0)
    data_cfg = DataConfig(image_size=size, eval_resize=resize, interpolation=info(students[0]).interpolation,
                          num_workers=2)
    records = collect(students, data, data=data_cfg, teacher=t, device=device, batch_size=batch_size)
    result = summarise(runs, records, num_classes=info(students[0]).num_classes, waterbirds=waterbirds,
                       train_sizes=train_group_sizes(data), reps=reps, seed=seed)
    result.update(data=data, teacher=teacher, image_size=size)
    per_run = next(iter(result["methods"].values()))["per_run"][0]
    if per_run.get("groups"):
        from gte.commands.eval import _group_names

        result["group_names"] = _group_names(data, list(per_run["groups"]), bool(per_run.get("waterbirds")))
    if json_out == "-":
        import json

        print(json.dumps(result, indent=2))
    else:
        if json_out:
            from gte.io import atomic_write_json

            atomic_write_json(json_out, result)
        print_compare(result, Console())
    if report:
        from gte.commands.eval import _class_names
        from gte.data.index import shard_class_names
        from gte.report_compare import write_compare_report
        from gte.tables import literal

        page = write_compare_report(report, result, runs=runs, records=records, students=students, teacher=t,
                                    spec=data, data=data_cfg, names=_class_names(shard_class_names(data), students[0]),
                                    group_names=result.get("group_names", {}), examples=examples, seed=seed)
        err.print("report written to", literal(page))


def shared_value(runs, section: str, key: str, flag: str) -> str:
    """``section.key`` where every run's recipe names the same one ("" otherwise; a one-line error naming ``flag``
    where a value is required)."""
    values = {str(r.recipe.get(section, {}).get(key, "")) for r in runs}
    if len(values) == 1 and "" not in values:
        value = values.pop()
        err.print(f"{flag or '--teacher'}: {value} (the runs' {section}.{key})", markup=False, highlight=False)
        return value
    if flag:
        raise GteError(f"{flag} is needed: the runs' recipes do not share one {section}.{key}")
    return ""


def print_compare(result: dict, console: Console) -> None:
    """The per-method and per-pair tables in the terminal."""
    from gte.report_compare import CI_NOTE, method_rows, pair_rows
    from gte.tables import add_columns, compact_table, literal

    tables = ((f"gte compare: {result['n']} samples", method_rows(result),
               "Mean ± std over each method's seeds, in % (expl. cos: a cosine)."),
              ("paired differences", pair_rows(result), "Percentage points (expl. cos: cosine)."))
    for title, (header, rows), note in tables:
        tab = compact_table(title)
        add_columns(tab, header, numeric=header[1:])
        for row in rows:
            tab.add_row(*map(literal, row))
        console.print(tab)
        console.print(note, highlight=False)
        console.print()
    console.print(CI_NOTE, highlight=False)
