"""``gte fetch-teachers``: the teacher catalog, verified downloads, conversion to gte's safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from gte.commands._common import err
from gte.tables import add_columns, compact_table


def fetch_teachers_command(
    names: Optional[List[str]] = typer.Argument(None, help="Catalog names (default: the whole catalog)."),
    list_: bool = typer.Option(False, "--list", help="Show the catalog and what is cached, download nothing."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="URL prefix, or local directory, with the release "
                                         "file names (air-gapped clusters)."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Cache directory (default: $GTE_HOME/teachers)."),
) -> None:
    """Download B-cos v2 / torchvision teachers, verify their SHA-256 and cache them as safetensors."""
    from gte import hub

    if list_:
        Console().print(catalog_table(dest))
        return
    entries = [hub.get(n) for n in names or hub.CATALOG]  # unknown names fail before any download
    from gte.models import convert_release

    for t in entries:
        hub.fetch(t, convert_release, dest=dest, mirror=mirror, console=err)


def catalog_table(dest: str | Path | None = None) -> Table:
    """The catalog as a rich table, with whether each teacher is cached in ``dest``."""
    from gte import hub

    where = Path(dest) if dest is not None else hub.cache_dir()
    table = compact_table(f"teachers (cache: {where})")
    add_columns(table, ("name", "source", "top-1 %", "MB", "cached"), numeric=("top-1 %", "MB"))
    for t in hub.CATALOG.values():  # a teacher's name is its architecture's
        table.add_row(t.name, t.source, f"{t.acc1:.2f}", f"{t.mb:.0f}",
                      "yes" if hub.cached_path(t.name, dest).is_file() else "no")
    table.caption = ("downloads from GitHub (B-cos v2 releases) and download.pytorch.org; --mirror URL|DIR reads the "
                     "same file names from elsewhere")
    return table
