"""The checks on a model spec's values, wherever they are read (``with_spec``: a ``model.safetensors``' metadata,
``gte convert`` options, a recipe; a Hugging Face Hub repo's ``pretrained_cfg``): sizes within gte's one image-side
limit, fractions, interpolations, finite mean/std, flags and class lists of the right type — one line naming the key.
"""

from __future__ import annotations

import math

from gte.errors import GteError
from gte.limits import check_side
from gte.text import shorten

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _number(v: object) -> bool:
    """A finite int or float (not a bool: JSON ``true`` is no size, fraction or mean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def checked_values(where: str, values: dict, input_size: int, crop_pct: float) -> dict:
    """``values`` (any of input_size, crop_pct, interpolation, mean, std, fixed_input_size, class_names) checked and
    normalised (floats, tuples); ``input_size`` / ``crop_pct``: the current ones, for the eval resize
    ``input_size / crop_pct`` a small fraction makes (checked against the same side limit). Errors start with
    ``where`` (``"arch: "``, ``"file: pretrained_cfg."``) and name the key."""
    c = dict(values)
    if "input_size" in c:
        check_side(c["input_size"], f"{where}input_size")
    if "crop_pct" in c:
        if not (_number(c["crop_pct"]) and 0.05 <= c["crop_pct"] <= 1.0):
            raise GteError(f"{where}crop_pct {shorten(repr(c['crop_pct']))} is not a fraction in [0.05, 1]")
        c["crop_pct"] = float(c["crop_pct"])
    if "input_size" in c or "crop_pct" in c:
        check_side(round(c.get("input_size", input_size) / c.get("crop_pct", crop_pct)),
                   f"{where}input_size / crop_pct (the eval resize)")
    if "interpolation" in c and c["interpolation"] not in INTERPOLATIONS:
        raise GteError(f"{where}interpolation {shorten(repr(c['interpolation']))} is not one of {', '.join(INTERPOLATIONS)}")
    for key in ("mean", "std"):
        if key in c:
            v = c[key]
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_number(a) for a in v)
                    and (key == "mean" or min(v) > 0)):
                raise GteError(f"{where}{key} {shorten(v)} is not three finite numbers"
                               + (" above 0" if key == "std" else ""))
            c[key] = tuple(float(a) for a in v)
    if "fixed_input_size" in c and not isinstance(c["fixed_input_size"], bool):
        raise GteError(f"{where}fixed_input_size {shorten(repr(c['fixed_input_size']))} is not true or false")
    if "class_names" in c:
        names = c["class_names"]
        if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
            raise GteError(f"{where}class_names is not a list of strings")
        c["class_names"] = tuple(names)
    return c
