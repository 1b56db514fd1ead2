"""The typer app and what every command module shares.

Holds the `app` the commands register on, the global options (--ledger/-C, --device, --version),
the CLI state, `open_ledger`, `want_json`, and the option objects several commands take (--json,
--abort, --allow-conflicts, --author, --relation, the solver --mode). Command modules import from
here and from `.output` only, never from `.main` or from each other; `main` imports them to
register their commands and owns `run`, the one place errors become exit codes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from .. import __version__
from ..settings import MODES, Settings, check_device, check_mode  # noqa: F401  (check_mode: for the command modules)

if TYPE_CHECKING:
    from ..ledger import Ledger

app = typer.Typer(name="kledger", add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="A versioned ledger of factual edits to language models, with conflict resolution.")

# ledger: the --ledger/-C value (None: the nearest .kledger upward); json: whether errors are
# reported as JSON too (main.run sets it from argv first, so that even a usage error is); env:
# the Settings the command runs with (the environment, with --device applied)
_state: dict = {"ledger": None, "json": False, "device": None, "env": None}


# ------------------------------------------------------------------ global options
def _version(value: bool) -> None:
    if value:
        print(f"kledger {__version__}")
        raise typer.Exit()


@app.callback()
def _main(ledger: str | None = typer.Option(None, "--ledger", "-C", envvar="KLEDGER_DIR",
                                            help="Ledger directory (default: nearest .kledger upward)."),
          device: str | None = typer.Option(None, "--device", envvar="KLEDGER_DEVICE",
                                            help="Where the model runs and the solves happen: auto (CUDA "
                                                 "when there is one), cpu, cuda or cuda:N."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    _state["ledger"] = ledger
    _state["device"] = None if device is None else check_device(device)
    _state["env"] = None  # read from the environment when a command first needs it (settings())


# ------------------------------------------------------------------ what commands use
def ledger_dir() -> str | None:
    """The --ledger/-C directory, if one was given."""
    return _state["ledger"]


def settings() -> Settings:
    """The Settings every library call of this command gets."""
    if _state["env"] is None:  # the environment, read once for the command; --device replaces $KLEDGER_DEVICE
        _state["env"] = Settings.from_env(device=_state.get("device"))
    return _state["env"]


@contextmanager
def open_ledger(write: bool = False) -> Iterator[Ledger]:
    # imported here, not at the top: `kledger --help` and usage errors need not load the ledger
    from ..ledger import Ledger

    with Ledger.open(_state["ledger"], write=write, env=settings()) as ledger:
        yield ledger


def scale_out(workers: int | None, ray: str | None) -> None:
    """--workers / --ray: the Ray workers this command measures on (kledger.edit.scale), in place
    of $KLEDGER_WORKERS / $KLEDGER_RAY_ADDRESS."""
    from ..settings import check_workers

    changes: dict = {}
    if workers is not None:
        changes["workers"] = check_workers(workers)
    if ray is not None:
        changes["ray_address"] = ray
    if changes:
        _state["env"] = settings().with_(**changes)


def want_json(flag: bool) -> bool:
    _state["json"] = flag
    return flag


# ------------------------------------------------------------------ options several commands take
JSON_OPT = typer.Option(False, "--json", help="Print JSON (docs/json.md) on stdout.")
ABORT_OPT = typer.Option(False, "--abort", help="Abandon the operation that stopped on conflicts.")
ALLOW_OPT = typer.Option(False, "--allow-conflicts", help="Record contradictions as open instead of stopping.")
AUTHOR_OPT = typer.Option(None, "--author")
RELATION_OPT = typer.Option(None, "--relation", "-r", help="Only this relation (id or template).")

WORKERS_OPT = typer.Option(None, "--workers", help="Measure the facts across N Ray workers on this machine "
                           "(pip install 'kledger[scale]'); 0: in this process.")
RAY_OPT = typer.Option(None, "--ray", metavar="ADDRESS", help="Measure on the workers of an existing Ray cluster.")
MODE_OPT = typer.Option(MODES[0], "--mode", help=f"Solver: {', '.join(MODES)}.")
