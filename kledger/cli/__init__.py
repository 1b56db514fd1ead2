"""The `kledger` command: the typer app and what commands share in `app`, one module per command
group, rendering in `output`. Commands parse, make library calls and print; `main.run` registers
them and is the only place that turns errors into exit codes. `run` (the script's entry point)
first offers the command to the fast path for the most-run reads (`fast`), which imports
neither typer nor rich."""

from __future__ import annotations

import sys


def run(argv: list[str] | None = None) -> None:
    args = list(argv if argv is not None else sys.argv[1:])
    from .fast import answer

    if answer(args):
        sys.exit(0)
    from .main import run as full

    full(args)
