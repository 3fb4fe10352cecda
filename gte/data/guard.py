"""Bad data: what the loader skips, counts, warns about, and when it stops the run.

A sample whose image does not decode (corrupt, truncated), or that lacks ``cls``, or has invalid json is skipped and
counted (``batch["skipped"]``, ``loader.skipped``); a truncated or corrupt tar ends that shard with a
:class:`DataWarning` (found from the tar headers before reading when the shard is local); empty / 0-byte shards hold
no samples. More than ``max_bad_fraction`` (default 1 %) of the epoch's share unreadable stops with a
:class:`GteError` naming an example (:class:`BadSampleGuard`). A missing shard or a pattern matching nothing fails
in ``make_loader`` (``expand_spec``), before any work.
"""

from __future__ import annotations

from typing import Any

from gte.errors import GteError

MAX_EXAMPLES = 3


class DataWarning(UserWarning):
    """A data problem that does not stop the run (a truncated shard, …)."""


class BadSampleGuard:
    """Counts skipped samples of one epoch (one rank) and stops when more than ``max_fraction`` of it is bad.

    ``planned`` is the number of samples this rank's share holds (known when shards were counted). With it the check
    is exact at any time — the epoch *will* exceed the fraction as soon as ``skipped > max_fraction · planned`` — so
    a broken dataset stops at once; without it, the check runs on what was read, at the end of the epoch.
    :class:`Loader` runs one itself; a training loop can also feed batches from elsewhere through :meth:`update`.
    """

    def __init__(self, max_fraction: float = 0.01, planned: int | None = None, what: str = "the data") -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise GteError(f"data.max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction, self.planned, self.what = max_fraction, planned, what
        self.samples = 0
        self.skipped = 0
        self.examples: list[str] = []

    def update(self, batch: dict[str, Any]) -> None:
        """Add a batch's counts (``batch["skipped"]``, its size); raises :class:`GteError` past the limit."""
        self.samples += len(batch["label"])
        self.add(int(batch.get("skipped", 0)), batch.get("_examples", ()))

    def add(self, skipped: int, examples=()) -> None:
        self.skipped += skipped
        for e in examples:
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(e)
        if self.planned:
            self._check(self.planned)

    def finish(self) -> None:
        """End-of-epoch check (also covers shares of unknown size)."""
        self._check(self.planned or self.samples + self.skipped)

    @property
    def fraction(self) -> float:
        total = self.planned or self.samples + self.skipped
        return self.skipped / total if total else 0.0

    def _check(self, total: int) -> None:
        if total and self.skipped > self.max_fraction * total:
            example = f"; e.g. {self.examples[0]}" if self.examples else ""
            raise GteError(f"{self.skipped} of {total} samples ({100 * self.skipped / total:.1f} %) of {self.what} "
                           f"are unreadable, more than data.max_bad_fraction = {100 * self.max_fraction:g} % "
                           f"(corrupt files or a wrong path?){example}")
