"""Shard specs: the strings that name shards, and the URLs they expand to.

A spec is brace ranges (``a-{000000..000009}.tar``), several specs joined with ``::``, shell globs (``dir/*.tar``)
and directories (all ``*.tar`` inside, sorted). A URL with a scheme other than ``file://`` is remote: it is streamed,
never counted. ``gte.data.index.resolve_shards`` expands a spec and counts its local shards once into a ``ShardSet``; the
loader, the sample count and the step count all take that set, so one run parses a spec once.
"""

from __future__ import annotations

import glob
import os

from gte.errors import GteError
from gte.io import is_file


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def expand_spec(spec: str) -> list[str]:
    """Shard URLs of a spec (see the module docstring). Local files must exist and be readable; a spec or glob that
    matches nothing is an error (one line, before any work)."""
    import braceexpand

    if not spec or not spec.strip():
        raise GteError("no shards given (empty data spec)")
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        for url in braceexpand.braceexpand(part):
            if not is_local(url):
                urls.append(url)
                continue
            path = local_path(url)
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not found:
                    raise GteError(f"no *.tar shards in directory {path}")
                urls.extend(found)
            elif glob.has_magic(path):
                found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
                if not found:
                    raise GteError(f"shard pattern matches no files: {path}")
                urls.extend(found)
            else:
                urls.append(url)
    if not urls:
        raise GteError(f"shard spec '{spec}' names no shards")
    # gte.io.is_file: a shard that may not be read is "permission denied", not "not found" as os.path.isfile says
    missing = [u for u in urls if is_local(u) and not is_file(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GteError(f"shard file not found: {local_path(missing[0])}{more}")
    return urls
