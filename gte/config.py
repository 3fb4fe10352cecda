"""Recipes: TOML files (+ ``--set a.b=value`` overrides) parsed into typed sections that reject unknown keys."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from gte.errors import GteError
from gte.io import loads_toml
from gte.limits import side_problem


@dataclass
class DataConfig:
    train: str = ""               # brace-expanded shard spec
    val: str = ""                 # evaluated after every epoch when set
    test: str = ""                # evaluated once at the end when set (OUT/test.json, against the run's teacher)
    num_classes: int = 1000
    image_size: int = 224         # train crop and eval size
    eval_resize: int = 0          # eval Resize before CenterCrop; 0 = image_size / 0.875
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    interpolation: str = "bilinear"  # of the crops' resize, train and eval ("bilinear" | "bicubic" | "nearest")
    train_size: int = 0           # samples per epoch; 0 = count the shards' members once
    num_workers: int = 4
    shuffle_buffer: int = 2000
    max_bad_fraction: float = 0.01  # stop when more of an epoch's share is unreadable (corrupt data, wrong path)
    reduced_decode: bool = True   # decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that keeps ≥ decode_margin
                                  # decoded pixels per output pixel of the crop (train and eval); false = full size
    decode_margin: float = 2.0    # 2: pixels move less than JPEG encoding moves them; 1: training crops of megapixel
                                  # photos ≈ 1.5× faster still, pixels move about as far as JPEG encoding (docs/data.md)


@dataclass
class ModelConfig:
    arch: str = ""
    weights: str = ""             # file path ('' = random init)
    explain_layer: str = ""       # GradCAM layer (dotted module name); '' = the model's own (its spec)
    image_size: int = 0           # teacher: the side it sees each batch at; 0 = the batch's own, or the spec's
                                  # size when the teacher runs at a fixed size only (ViT)


@dataclass
class DistillConfig:
    method: str = "e2kd"          # "ce" | "kd" | "e2kd" | "at" | "cat_kd" | "reviewkd" | "crd" | "dkd" | "dist";
                                  # "<method>+e2kd" adds the explanation term to any method that uses a teacher
    options: dict = field(default_factory=dict)  # the method's own hyperparameters ([distill.options]; paper defaults)
    explainer: str = "auto"       # "auto" (bcos for B-cos students, else gradcam) | "bcos" | "gradcam"
    temperature: float = 1.0
    lambda_exp: float = 1.0
    ce_weight: float = -1.0       # label-loss weight; -1 = the method's own (0 for kd/e2kd as in the official e2KD
                                  # code, 1 for the baselines, as their papers train them)
    logit_std: bool = False       # z-score both models' logits before the logit loss (kd, dkd, dist; CVPR 2024);
                                  # alone: the paper's ImageNet T / weights / CE for keys left unset (methods/logit_std)
    student_layers: list[str] = field(default_factory=list)  # feature methods: layers to tap ([] = the model's stages)
    teacher_layers: list[str] = field(default_factory=list)
    guided_every: int = 1         # explanation term on every K-th step only
    exp_grad: str = "exact"       # B-cos students: "exact" (the official code's gradient) | "detached" (ablation:
                                  # the dynamic factors detached in the outer derivative too, as pip bcos' explanation mode)
    # Beyond the paper, off by default (docs/method.md "Right reasons on a colour shortcut"); live B-cos e2KD only:
    exp_topk: int = 1             # explain the teacher's top-k classes (mean of the k explanation terms)
    exp_student_top1: bool = False  # also match both models' explanations of the student's own top-1 class
    exp_norm_weight: float = 0.0  # + μ · (log‖W_S‖ − log‖W_T‖)² per explained class: a term that is not scale-free
    multilabel: bool = False      # multi-label data (VOC): binary KD per class, labels from json.labels
    frozen: bool = False          # teacher-free: logits + map stored by `gte precompute` in data.train's shards
    # The distill keys the recipe gave (its file, its `extends` chain or --set), recorded by from_dict; a method's
    # paper setting fills the others (gte.methods.resolve). None (built in Python): a key counts as given when its
    # value differs from the default. A class attribute, so neither a recipe key nor written to recipe.toml.
    given: ClassVar[frozenset[str] | None] = None


@dataclass
class OptimConfig:
    name: str = "adam"            # "adam" | "adamw" | "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 250
    batch_size: int = 32          # per process; global batch = batch_size × processes × grad_accum
    grad_accum: int = 1           # micro-batches per optimiser step
    warmup_epochs: float = 5.0
    warmup_decay: float = 0.01    # the first step runs at lr · warmup_decay
    clip: str = "auto"            # "auto" (agc for B-cos students, norm otherwise) | "agc" | "norm" | "none"
    clip_value: float = 0.0       # 0 = 0.01 for agc, 1.0 for norm


@dataclass
class RunConfig:
    out: str = "runs/gte"
    seed: int = 42
    mixed_precision: str = "no"   # "no" | "bf16" | "fp16"
    log_every: int = 10           # steps between metrics.jsonl lines
    progress_every: float = 30.0  # seconds between progress lines when stderr is not a terminal (0 = none)
    checkpoint_every: int = 0     # optimiser steps between checkpoints (0 = only at epoch ends)
    keep_checkpoints: int = 2     # newest checkpoints kept in OUT/checkpoints
    resume: bool = True           # continue from OUT/checkpoints when it holds a checkpoint of this recipe
    trackers: list[str] = field(default_factory=list)  # Accelerate trackers: "tensorboard", "wandb", …
    channels_last: bool = False   # student and teacher in channels_last memory format (benchmarks/README.md)
    compile_teacher: bool = False  # torch.compile the frozen teacher (its forward and W(x); ~1 min to compile)


@dataclass
class DemoConfig:
    """Only read by the embedded demo: how much synthetic data and how long the local teacher trains."""

    enabled: bool = False
    n_teacher: int = 6000
    n_distill: int = 2000
    n_test: int = 2000
    teacher_arch: str = "bcos_cifar_resnet20"
    teacher_epochs: int = 6
    teacher_lr: float = 1e-3
    methods: list[str] = field(default_factory=lambda: ["kd", "e2kd"])
    background: str = "stripes"   # how the spurious place is coded: "stripes" (texture) | "colour" (mean colour)
    data_seed: int = -1           # seed of the synthetic data and the teacher (-1 = run.seed); fixed across --seeds


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def digest(self) -> str:
        """A short hash of the resolved recipe (stored in model metadata)."""
        return hashlib.sha256(self.to_toml().encode()).hexdigest()[:12]


def coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the field's default, allowing int → float."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise GteError(f"recipe key '{key}' expects {type(default).__name__}, got {value!r}")
    return value


# Value ranges, checked when a recipe loads: key -> (test, what it must be). Names (methods, explainers, archs) and
# checks across sections are in gte.validate.
def _positive(v) -> bool:
    return v > 0


def _not_negative(v) -> bool:
    return v >= 0


RANGES: dict[str, tuple[Any, str]] = {
    "data.num_classes": (lambda v: v >= 2, ">= 2"),
    "data.image_size": (lambda v: v >= 8, ">= 8"),
    "data.eval_resize": (_not_negative, ">= 0 (0 = image_size / 0.875)"),
    "data.crop_scale": (lambda v: len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in v) and 0 < v[0] <= v[1] <= 1,
                        "two numbers [min, max] with 0 < min <= max <= 1"),
    "data.interpolation": (lambda v: v in ("bilinear", "bicubic", "nearest"), "bilinear, bicubic or nearest"),
    "data.train_size": (_not_negative, ">= 0 (0 = count the shards)"),
    "data.num_workers": (_not_negative, ">= 0"),
    "data.shuffle_buffer": (_not_negative, ">= 0"),
    "data.max_bad_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.decode_margin": (lambda v: 1 <= v <= 8, "in [1, 8]"),
    "teacher.image_size": (_not_negative, ">= 0 (0 = the batch's size)"),
    "student.image_size": (lambda v: v == 0, "0 (the student sees data.image_size)"),
    "distill.temperature": (_positive, "> 0"),
    "distill.lambda_exp": (_not_negative, ">= 0"),
    "distill.ce_weight": (lambda v: v >= 0 or v == -1, ">= 0, or -1 (the method's own weight)"),
    "distill.guided_every": (_positive, ">= 1"),
    "distill.exp_topk": (_positive, ">= 1"),
    "distill.exp_norm_weight": (_not_negative, ">= 0"),
    "distill.student_layers": (lambda v: all(isinstance(x, str) and x for x in v), "a list of module names"),
    "distill.teacher_layers": (lambda v: all(isinstance(x, str) and x for x in v), "a list of module names"),
    "optim.name": (lambda v: v in ("adam", "adamw", "sgd"), "adam, adamw or sgd"),
    "optim.lr": (_positive, "> 0"),
    "optim.weight_decay": (_not_negative, ">= 0"),
    "optim.epochs": (_positive, ">= 1"),
    "optim.batch_size": (_positive, ">= 1"),
    "optim.grad_accum": (_positive, ">= 1"),
    "optim.warmup_epochs": (_not_negative, ">= 0"),
    "optim.warmup_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "optim.clip": (lambda v: v in ("auto", "agc", "norm", "none"), "auto, agc, norm or none"),
    "optim.clip_value": (_not_negative, ">= 0 (0 = the clip's default)"),
    "run.mixed_precision": (lambda v: v in ("no", "bf16", "fp16"), "no, bf16 or fp16"),
    "run.log_every": (_positive, ">= 1"),
    "run.progress_every": (lambda v: 0 <= v < math.inf, ">= 0 seconds (0 = no progress lines)"),
    "run.checkpoint_every": (_not_negative, ">= 0 (0 = at epoch ends only)"),
    "run.keep_checkpoints": (_positive, ">= 1"),
    "demo.n_teacher": (_positive, ">= 1"),
    "demo.n_distill": (_positive, ">= 1"),
    "demo.n_test": (_positive, ">= 1"),
    "demo.teacher_epochs": (_positive, ">= 1"),
    "demo.teacher_lr": (_positive, "> 0"),
    "demo.background": (lambda v: v in ("stripes", "colour"), "stripes or colour"),
    "demo.data_seed": (lambda v: v >= -1, ">= 0, or -1 (run.seed)"),
}


SIDES = ("data.image_size", "data.eval_resize", "teacher.image_size")  # image sides: also gte.limits' memory limit


def check_value(key: str, value: Any) -> None:
    """A one-line error when ``value`` is out of the range of recipe key ``key`` (:data:`RANGES`): for code that
    takes recipe values another way (``gte.timm_task``), refused as a recipe refuses them."""
    section, name = key.split(".")
    value = coerce(key, value, getattr(getattr(Recipe(), section), name))
    ok, what = RANGES[key]
    if not ok(value):
        raise GteError(f"{key} must be {what}, got {value!r}")


def range_problems(recipe: Recipe) -> list[str]:
    """Every value out of its range (one line each), and an eval resize smaller than the crop."""
    out = []
    for key, (ok, what) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if isinstance(value, float) and not math.isfinite(value):  # inf passes "> 0", nan every comparison's negation
            out.append(f"recipe key '{key}' must be a finite number, got {value!r}")
        elif not ok(value):
            out.append(f"recipe key '{key}' must be {what}, got {value!r}")
        elif key in SIDES and value and (problem := side_problem(value, f"recipe key '{key}'")):
            out.append(problem)
    d = recipe.data
    if 0 < d.eval_resize < d.image_size:
        out.append(f"data.eval_resize {d.eval_resize} is smaller than data.image_size {d.image_size}: the centre "
                   "crop would be padded with black (use eval_resize = 0 or >= image_size)")
    return out


def from_dict(raw: dict[str, Any], check_ranges: bool = True) -> Recipe:
    """Build a :class:`Recipe`, naming the first unknown section or key and (``check_ranges``) the first value out of
    range; ``--dry-run`` passes ``check_ranges=False`` and lists every range problem with the other checks."""
    recipe = Recipe()
    for section, values in raw.items():
        if not hasattr(recipe, section):
            raise GteError(f"unknown recipe section '{section}'{_did_you_mean(section, recipe.to_dict())} "
                           f"(known: {', '.join(recipe.to_dict())})")
        if not isinstance(values, dict):
            raise GteError(f"recipe section '{section}' must be a table")
        target = getattr(recipe, section)
        fields = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                known = [f"{section}.{f}" for f in fields]
                raise GteError(f"unknown recipe key '{section}.{key}'{_did_you_mean(f'{section}.{key}', known)}")
            setattr(target, key, coerce(f"{section}.{key}", value, getattr(target, key)))
        if section == "distill":
            target.given = frozenset(values)
    problems = range_problems(recipe) if check_ranges else []
    if problems:
        raise GteError(problems[0])
    return recipe


def _did_you_mean(name: str, known: Any) -> str:
    """``"; did you mean a, b?"`` with the close matches of ``name`` among ``known`` ("" when there are none)."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise GteError(f"--set expects key=value, got '{item}' (write --set {item.strip()}=VALUE, no space)")
    key, text = item.split("=", 1)
    try:
        value = loads_toml(f"v = {text}", f"--set {key}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare strings (paths, names) need no quotes
    return key.strip().split("."), value


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (``demo``, ``imagenet-fewshot``, …)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = resources.files("gte.recipes").joinpath(f"{name_or_path}.toml")
    if shipped.is_file():
        return Path(str(shipped))
    known = sorted(f.name[:-5] for f in resources.files("gte.recipes").iterdir() if f.name.endswith(".toml"))
    raise GteError(f"recipe '{name_or_path}' is neither a file nor a shipped recipe{_did_you_mean(name_or_path, known)}"
                   " (`gte recipes` lists them)")


def shipped_recipes() -> dict[str, str]:
    """Shipped recipe names and the first line of each file's header comment."""
    out = {}
    for f in sorted(resources.files("gte.recipes").iterdir(), key=lambda f: f.name.removesuffix(".toml")):
        if f.name.endswith(".toml"):
            first = next((x for x in f.read_text().splitlines() if x.startswith("#")), "#")
            out[f.name[:-5]] = first.lstrip("# ").strip()
    return out


MAX_EXTENDS = 16  # recipes a chain of `extends` may hold: far above any real layering, far below Python's recursion


def read_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe file as a dict, with ``extends = "<recipe>"`` resolved: the named recipe (a shipped name or a path
    relative to this file) is read first and this file's keys override its keys, section by section."""
    path = recipe_path(name_or_path)
    if str(path.resolve()) in seen:
        raise GteError(f"{path}: recipes extend each other in a loop ({' -> '.join(seen)})")
    if len(seen) >= MAX_EXTENDS:
        raise GteError(f"{path}: more than {MAX_EXTENDS} recipes extend one another (from {seen[0]}); "
                       "flatten the chain")
    try:
        raw = loads_toml(path.read_text(), str(path))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GteError(f"{path}: not a valid TOML recipe ({e})") from None
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise GteError(f"{path}: 'extends' names one recipe, got {base!r}")
    sibling = path.parent / base
    merged = read_raw(str(sibling) if sibling.is_file() else base, (*seen, str(path.resolve())))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_recipe(name_or_path: str, overrides: list[str] | None = None, check_ranges: bool = True) -> Recipe:
    """Read a recipe (resolving ``extends``) and apply ``--set`` overrides; every key is checked (value ranges unless
    ``check_ranges`` is False: see :func:`from_dict`)."""
    raw = read_raw(name_or_path)
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise GteError(f"--set {item}: '{k}' is not a section")
        node[keys[-1]] = value
    return from_dict(raw, check_ranges)
