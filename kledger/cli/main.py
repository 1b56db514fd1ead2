"""Entry point: the typer app, global options, and the one place errors become exit codes."""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import typer

from .. import __version__
from ..errors import EXIT_USAGE, KledgerError, UsageError
from .output import JSON_VERSION, _emitted, err, escape

app = typer.Typer(name="kledger", add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="A versioned ledger of factual edits to language models, with conflict resolution.")

_state: dict = {"ledger": None, "json": False}


def _version(value: bool) -> None:
    if value:
        print(f"kledger {__version__}")
        raise typer.Exit()


# the name's shape only: kledger.edit.device checks that the device exists (that needs torch)
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@app.callback()
def _main(ledger: Optional[str] = typer.Option(None, "--ledger", "-C", envvar="KLEDGER_DIR",
                                               help="Ledger directory (default: nearest .kledger upward)."),
          device: Optional[str] = typer.Option(None, "--device", envvar="KLEDGER_DEVICE",
                                               help="Where the model runs and the solves happen: auto (CUDA "
                                                    "when there is one), cpu, cuda or cuda:N."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    _state["ledger"] = ledger
    if device is not None:
        name = device.strip().lower()
        if not _DEVICE_RE.fullmatch(name):
            raise UsageError(f"unknown device {device!r}", "use --device auto, cpu, cuda or cuda:N")
        os.environ["KLEDGER_DEVICE"] = name  # read by kledger.edit.device when a model is loaded


@contextmanager
def open_ledger(write: bool = False) -> Iterator["Ledger"]:  # noqa: F821
    from ..ledger import Ledger

    with Ledger.open(_state["ledger"], write=write) as ledger:
        yield ledger


def want_json(flag: bool) -> bool:
    _state["json"] = flag
    return flag


def _register() -> None:
    from . import admin, conflicts, evaluate, history, model, rearrange, staging  # noqa: F401  (commands register on import)


def run(argv: list[str] | None = None) -> None:
    _register()
    _emitted["json"] = False
    argv = list(argv if argv is not None else sys.argv[1:])
    _state["json"] = "--json" in argv  # so that even a usage error is reported as JSON
    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=argv or ["--help"], prog_name="kledger", standalone_mode=False)
    except KledgerError as exc:
        _fail(exc.one_line(), exc.exit_code, exc.kind)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (typer.Abort, KeyboardInterrupt):
        _fail("aborted", 1, "aborted")
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:
        # click's usage errors (typer may vendor its own click, so match by shape, not class)
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        msg = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            msg += f" (see `{ctx.command_path} --help`)"
        _fail(msg, exc.exit_code or EXIT_USAGE, "usage")
    sys.exit(0)


def _fail(message: str, code: int, kind: str) -> None:
    message = " ".join(message.split())
    err.print(f"[bold red]error:[/] {escape(message)}")
    if _state["json"] and not _emitted["json"]:
        print(json.dumps({"version": JSON_VERSION, "error": {"kind": kind, "message": message, "exit_code": code}}))
    sys.exit(code)
