"""The ``gte`` subcommands: one thin module each — options, one library call, printing and files.

The library (everything outside ``gte/commands`` and ``gte/cli.py``) never imports these modules. Commands import the
library inside the command function: ``gte --help``, ``gte recipes`` and a mistyped option answer in a fraction of a
second instead of paying torch's and the models' start-up (~3-7 s) — the only reason gte imports inside functions.
"""
