"""Where gte keeps its caches (a module of its own so that light commands need not import torch)."""

from __future__ import annotations

import os
from pathlib import Path


def gte_home() -> Path:
    """Cache root: ``$GTE_HOME`` or ``~/.cache/gte``."""
    return Path(os.environ.get("GTE_HOME") or Path.home() / ".cache" / "gte").expanduser()
