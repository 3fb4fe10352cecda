"""``gte precompute``: the teacher's logits and explanations stored next to every training sample (frozen e2KD)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from gte.commands._common import RequiredRecipeOpt, SetOpt, err, recipe
from gte.errors import GteError


def precompute_command(recipe_name: str = RequiredRecipeOpt, set_: Optional[List[str]] = SetOpt,
               out: Path = typer.Option(..., "--out", "-o", help="Directory for the new shards."),
               map_scale: int = typer.Option(1, "--map-scale", help="Store maps at 1/1, 1/2 or 1/4 resolution."),
               batch_size: int = typer.Option(0, "--batch-size", help="Teacher batch (0 = optim.batch_size).")) -> None:
    """Run the teacher once over data.train and write shards with its logits and explanations (frozen e2KD).

    Then train with `--set distill.frozen=true --set data.train='OUT/<shards>'`; torchrun splits shards over ranks.
    """
    if batch_size < 0:
        raise GteError("--batch-size must not be negative")
    from gte.precompute import precompute

    precompute(recipe(recipe_name, set_), out, map_scale=map_scale, batch_size=batch_size, console=err)
