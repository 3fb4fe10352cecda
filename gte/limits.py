"""The one limit on image sides, wherever a size enters gte: recipe keys (``data.image_size``, ``data.eval_resize``,
``teacher.image_size``), options (``--image-size``, ``--eval-resize``, ``--teacher-image-size``, ``gte convert
--input-size``) and model specs read from files (``input_size``, and the eval resize ``input_size / crop_pct`` that a
tiny ``crop_pct`` makes huge). Checked before any image or model is allocated at that size. No torch here: recipes
and options are checked before torch is imported.
"""

from __future__ import annotations

import math
import os

from gte.errors import GteError

MIN_SIDE = 8  # the smallest image a network's stem and GradCAM still make sense of (recipes: data.image_size >= 8)
MAX_SIDE = 8192  # above any released model's resolution (ViT-g 518, EfficientNet-L2 800) with room to spare
MAX_CLASSES = 1_000_000  # class counts read from files: far above any classifier's; a head this wide is 2 GB at 512
BYTES_PER_PIXEL = 1024  # one image through a CNN's full-resolution stages, forward + the explanation's backward


def _memory_bytes() -> int:
    """This machine's physical memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def max_side() -> int:
    """The largest image side gte accepts: ``GTE_MAX_IMAGE_SIDE`` if set, else the side at which one image's
    activations (:data:`BYTES_PER_PIXEL` per pixel) fill half this machine's memory, at most :data:`MAX_SIDE`."""
    raw = os.environ.get("GTE_MAX_IMAGE_SIDE", "")
    if raw:
        if not raw.isdigit() or int(raw) < MIN_SIDE:
            raise GteError(f"GTE_MAX_IMAGE_SIDE must be an integer >= {MIN_SIDE}, got '{raw[:20]}'")
        return int(raw)
    memory = _memory_bytes()
    fits = math.isqrt(memory // 2 // BYTES_PER_PIXEL) if memory else MAX_SIDE
    return max(MIN_SIDE, min(MAX_SIDE, fits))


def side_problem(value: object, what: str) -> str | None:
    """Why ``value`` is not an image side gte accepts for ``what`` (an option or key name), or None."""
    limit = max_side()
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{what} {str(value)[:40]!r} is not a side in pixels (an integer in {MIN_SIDE}..{limit})"
    if not MIN_SIDE <= value <= limit:
        return (f"{what} {value} is not a side in pixels in {MIN_SIDE}..{limit} (the limit for this machine's "
                "memory; GTE_MAX_IMAGE_SIDE sets another)")
    return None


def check_side(value: object, what: str) -> int:
    """``value`` if it is an image side within :func:`max_side`, else a one-line error naming ``what``."""
    problem = side_problem(value, what)
    if problem:
        raise GteError(problem)
    return value  # type: ignore[return-value]
