"""Entry point: `run` (the `kledger` script), which registers the commands and is the one place
errors become exit codes (`_fail`). The app, its global options and the CLI state live in `.app`."""

from __future__ import annotations

import json
import sys

import typer

from ..errors import EXIT_USAGE, KledgerError, missing_model_module

# main.app and main._state are also what the tests use
from .app import _state, app
from .output import JSON_VERSION, _emitted, err, escape
from .reads import check_utf8

# The order `kledger --help` lists the commands in (each module registers its own on import).
HELP_ORDER = ("init", "add", "rm", "status", "reset", "commit", "fsck", "export", "report", "conflicts", "check",
              "resolve", "relation", "config", "apply", "ask", "replay", "eval", "log", "show", "diff",
              "blame", "branch", "checkout", "revert", "cherry-pick", "merge", "remote", "clone", "fetch", "push",
              "pull")


def _command_name(info) -> str:
    return info.name or info.callback.__name__.lower().replace("_", "-")


def _register() -> None:
    from . import admin, conflicts, evaluate, history, model, rearrange, remote, staging  # noqa: F401  (commands register on import)

    rank = {name: i for i, name in enumerate(HELP_ORDER)}  # a command not listed goes last
    app.registered_commands.sort(key=lambda info: rank.get(_command_name(info), len(rank)))


def _first_sentence(doc: str | None) -> str | None:
    """The docstring's first sentence, whole, for the command list of `kledger --help`."""
    if not doc:
        return None
    text = " ".join(doc.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def _metavar(p) -> None:
    """An option's value named after the option (--subject SUBJECT), an argument after itself,
    and no type tag (<str>) beside an argument."""
    if getattr(p, "is_flag", False) or not p.name:
        return
    if getattr(p, "param_type_name", "") == "argument":
        p.metavar = p.metavar or p.name.upper().rstrip("_")
        p.display_type_rich = lambda ctx=None: None  # typer's "<str>" after the name
    elif p.metavar is None:
        longest = max(getattr(p, "opts", []) or [p.name], key=len)
        p.metavar = longest.lstrip("-").upper().replace("-", "_")


def _manners(cmd) -> None:
    """What --help shows: each command's whole first sentence in the list of commands, and
    metavariables named after what they stand for (SUBJECT, not <str>)."""
    for sub in getattr(cmd, "commands", {}).values():
        if not getattr(sub, "short_help", None):
            sub.short_help = _first_sentence(sub.help)
        for p in sub.params:
            _metavar(p)
    for p in cmd.params:
        _metavar(p)


def run(argv: list[str] | None = None) -> None:
    _register()
    _emitted["json"] = False
    argv = list(argv if argv is not None else sys.argv[1:])
    _state["json"] = "--json" in argv  # so that even a usage error is reported as JSON
    cmd = typer.main.get_command(app)
    _manners(cmd)
    try:
        check_utf8(argv)
        rv = cmd.main(args=argv or ["--help"], prog_name="kledger", standalone_mode=False)
        # Not standalone, click returns an Exit's code instead of raising it; typer turns Ctrl-C
        # into Exit(130). Any other code is passed on as it is.
        if rv == 130:
            _fail("aborted", 1, "aborted")
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except KledgerError as exc:
        _fail(exc.one_line(), exc.exit_code, exc.kind)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (typer.Abort, KeyboardInterrupt):
        _fail("aborted", 1, "aborted")
    except BrokenPipeError:
        sys.exit(0)
    except ImportError as exc:  # torch & co. missing where no library call said so itself
        err = missing_model_module(exc)
        if err is None:
            _internal(exc)
        _fail(err.one_line(), err.exit_code, err.kind)
    except Exception as exc:
        # click's usage errors (typer may vendor its own click, so match by shape, not class)
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            _internal(exc)
        msg = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            msg += f" (see `{ctx.command_path} --help`)"
        _fail(msg, exc.exit_code or EXIT_USAGE, "usage")
    sys.exit(0)


def _internal(exc: BaseException) -> None:
    """The last line of defence: an exception no check foresaw is still one line and exit 1. The
    command's transaction has rolled back, so the ledger is as it was."""
    text = " ".join(str(exc).split()) or "(no message)"
    _fail(f"internal error: {type(exc).__name__}: {text[:500]} (this is a bug in kledger: please report it, "
          "with the command that caused it)", 1, "internal")


def _fail(message: str, code: int, kind: str) -> None:
    message = " ".join(message.split())
    err.print(f"[bold red]error:[/] {escape(message)}")
    if _state["json"] and not _emitted["json"]:
        print(json.dumps({"version": JSON_VERSION, "error": {"kind": kind, "message": message, "exit_code": code}}))
    sys.exit(code)
