"""``python -m gte.launch …``: ``torchrun`` (same arguments) with gte's exit contract for a stopped job.

torchrun's agent turns a SIGTERM/SIGINT it receives (``scancel``, a SLURM preemption, ``timeout``, Ctrl-C) into a
``SignalException``, forwards the signal to the ranks and re-raises it: a traceback and exit status 1, after gte's
ranks have already saved their checkpoint and rank 0 has said so in one line. This launcher runs the same agent and
ends such a job with 128 + the signal instead, and keeps the agent's per-signal warnings off stderr. A rank that
fails (a gte error: one line, exit 2) ends the job with that rank's exit code instead of the agent's report.
"""

from __future__ import annotations

import logging
import sys


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    for name in list(logging.root.manager.loggerDict):  # each of torch's elastic loggers has its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun()
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:  # a rank's own line (gte: error: …) is on stderr already: keep its exit code
        _, failure = e.get_first_failure()
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
