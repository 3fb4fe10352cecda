"""``gte eval``: metrics of a model (and a teacher) on shards; a table, JSON and an HTML/Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gte.commands._common import ArchOpt, TeacherArchOpt, check_sizes, err
from gte.errors import GteError


def eval_command(
    model: str = typer.Argument(..., help="A gte .safetensors, a .pth with --arch, or a teacher name."),
    data: str = typer.Option(..., "--data", help="Shard spec, e.g. 'val-{000000..000003}.tar'."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model for agreement/explanations."),
    arch: Optional[str] = ArchOpt,
    teacher_arch: Optional[str] = TeacherArchOpt,
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the metrics as JSON (- = stdout, no table)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.md + self-contained report.html here."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop size (default: MODEL's own, "
                                             "from its spec)."),
    eval_resize: int = typer.Option(0, "--eval-resize", show_default=False, help="Resize (short side) before the "
                                    "crop (default: MODEL's own; with --image-size: size/0.875)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    waterbirds: Optional[bool] = typer.Option(None, "--waterbirds/--no-waterbirds", help="ID/OOD accuracy with "
                                              "group = 2·label + place, OOD = groups 1, 2 (default: detect 4 groups "
                                              "+ 2 classes)."),
    shift: bool = typer.Option(False, "--shift", help="Shift test: explanation cosine under diagonal shifts."),
    shift_max: int = typer.Option(16, "--shift-max", help="Largest shift in pixels."),
    shift_samples: int = typer.Option(256, "--shift-samples", help="Samples used by the shift test."),
    examples: int = typer.Option(6, "--examples", help="Images in the report's explanation grid."),
    explainer: str = typer.Option("auto", "--explainer", help="How both models' explanations are compared: bcos "
                                  "(W(x), two B-cos networks) or gradcam; auto = what the student was trained with "
                                  "(its spec), else its own where the teacher has it, else gradcam."),
    teacher_size: int = typer.Option(0, "--teacher-image-size", show_default=False, help="The side the teacher sees "
                                     "each image at, as in training with teacher.image_size (default: the eval size, "
                                     "or the teacher's fixed size)."),
    shortcut: List[str] = typer.Option([], "--shortcut", help="Shortcut test, repeatable: watermark, patch or "
                                       "background, with options as NAME:key=value,… (docs/data.md, 'Shortcut "
                                       "tests')."),
    shortcut_seed: int = typer.Option(0, "--shortcut-seed", help="Seed of the shortcut tests' random places."),
    shortcut_samples: int = typer.Option(0, "--shortcut-samples", show_default=False, help="Samples the shortcut "
                                         "tests use (default: all)."),
) -> None:
    """acc@1/5, agreement, explanation similarity, groups, F1/mAP, EPG/IoU, shift test (torchrun for many processes)."""
    if batch_size < 1 or shift_max < 0 or shift_samples < 1 or min(examples, teacher_size, shortcut_samples) < 0:
        raise GteError("--batch-size and --shift-samples must be positive, --shift-max, --examples, "
                       "--teacher-image-size and --shortcut-samples not negative")
    check_sizes(image_size, eval_resize, teacher_size)
    from gte.shortcuts import parse_shortcuts

    shortcuts = parse_shortcuts(shortcut, shortcut_seed)  # before any model is loaded: a typo costs nothing
    if json_out and json_out != "-" and not Path(json_out).resolve().parent.is_dir():  # before, not after, the work
        raise GteError(f"--json {json_out}: the directory {Path(json_out).resolve().parent} does not exist")
    from gte.io import check_writable

    if json_out and json_out != "-":
        check_writable(Path(json_out).resolve().parent, "--json")
    if report:
        check_writable(report, "--report")
    from gte import dist
    from gte.evaluate import EvalOptions

    opts = EvalOptions(batch_size=batch_size, waterbirds=waterbirds, shift=shift, shift_max=shift_max,
                       shift_samples=shift_samples, examples=examples if report else 0, teacher_size=teacher_size,
                       explainer=explainer, shortcuts=shortcuts, shortcut_samples=shortcut_samples)
    started = not dist.initialized() and dist.launched_world_size() > 1
    if started:  # torchrun: the collectives here are a few small tensors
        dist.init_process_group()
    try:
        _evaluate(model, data, teacher, arch, teacher_arch, image_size, eval_resize, opts, json_out, report)
    finally:
        if started:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _evaluate(model_path: str, spec: str, teacher_path: str | None, arch: str | None, teacher_arch: str | None,
              image_size: int | None, eval_resize: int, options, json_out: str | None, report: Path | None) -> None:
    from gte import dist
    from gte.config import DataConfig
    from gte.data.index import shard_class_names
    from gte.evaluate import run_eval, unrelated_labels
    from gte.models import eval_geometry, freeze, info, load_model
    from gte.report import print_summary
    from gte.tables import literal

    device = dist.device()
    student = load_model(model_path, arch=arch).to(device)
    teacher = freeze(load_model(teacher_path, arch=teacher_arch)).to(device) if teacher_path else None
    image_size, eval_resize = eval_geometry(student, image_size, eval_resize)  # the model's own spec by default
    data = DataConfig(image_size=image_size, eval_resize=eval_resize, interpolation=info(student).interpolation,
                      num_workers=2)
    options.train_group_sizes = train_group_sizes(spec)
    out = run_eval(student, spec, data=data, teacher=teacher, device=device, options=options)
    if not dist.is_main():
        return
    m = {**out.metrics, "image_size": image_size, "eval_resize": eval_resize or round(image_size / 0.875)}
    data_names = shard_class_names(spec)  # gte data's and the demo's shards carry a classes.json
    note = unrelated_labels(data_names, [student, teacher])
    if note:  # e.g. own photos in folders under an ImageNet model: say why acc@1 is ~0, once, before the table
        m.update(labels_meaningful=False, labels_note=note)
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if m.get("groups"):
        m["group_names"] = _group_names(spec, list(m["groups"]), bool(m.get("waterbirds")))
    if json_out == "-":
        import json

        print(json.dumps(m, indent=2))
    else:
        if json_out:  # first: the metrics are kept whatever happens to the table or the report
            from gte.io import atomic_write_json

            atomic_write_json(json_out, m)
        print_summary(m, Console())
    if report:
        from gte.report import write_report

        names = _class_names(data_names, student)
        about = {"model": model_path, "data": spec, **({"teacher": teacher_path} if teacher_path else {}),
                 "explainer": m["explainer"], "processes": str(m["world_size"])}
        from gte.report_shortcuts import training_log

        page = write_report(report, m, examples=out.examples, student=student, teacher=teacher, names=names,
                            about=about, training=training_log(model_path))
        err.print("report written to", literal(page))


def _class_names(names: list[str] | None, model) -> list[str]:
    """The shards' class names when they fit the model, else the model's own names (or generic ones)."""
    from gte.models import info
    from gte.render import class_names

    if names is not None and len(names) == info(model).num_classes:  # a list that does not fit is ignored
        return names
    return class_names(info(model).num_classes, None, [model])


def _group_names(spec: str, groups: list[str], waterbirds: bool) -> dict[str, str]:
    """{group: name} from the shards' groups.json (Waterbirds' names for Waterbirds data without one); a group the
    file does not name keeps its number only."""
    from gte.data.index import read_group_names
    from gte.data.writers.waterbirds import WATERBIRDS_GROUPS

    names = read_group_names(_data_dir(spec)) or (list(WATERBIRDS_GROUPS) if waterbirds else [])
    return {g: names[int(g)] for g in groups if 0 <= int(g) < len(names)}


def train_group_sizes(spec: str) -> dict[int, int] | None:
    """The training split's group sizes recorded next to ``spec``'s shards (``gte data shard waterbirds`` writes
    train, val and test into one directory and counts the groups of each), or None."""
    from gte.data.index import split_group_counts

    return split_group_counts(_data_dir(spec), "train")


def _data_dir(spec: str) -> str:
    """The directory of the first shard of ``spec`` (where gte data writes classes.json and groups.json)."""
    import os

    from gte.data.spec import expand_spec, local_path

    return os.path.dirname(local_path(expand_spec(spec)[0])) or "."
