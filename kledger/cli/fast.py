"""The fast path for the most-run reads: `kledger status` and `kledger log` (with --oneline, --all,
-n/--max-count, --json, and -C/--ledger before the command) answered without importing typer,
click, pydantic or rich (rich only for colour on a terminal): about a third of a cold command's
time on a small ledger was their import. Any other form goes to the full CLI
(`kledger.cli.main.run`); a kledger error while reading is reported by the full CLI's own
`_fail`, and any other exception sends the command to the full CLI, which reports it (these
commands only read, so running them again changes nothing)."""

from __future__ import annotations

import re
import sys

from ..errors import KledgerError

_COUNT = re.compile(r"[1-9][0-9]{0,17}")


def _parse(argv: list[str]) -> tuple[str | None, str, dict] | None:
    """(ledger dir, command, options) when argv is a form the fast path answers, else None."""
    ledger, rest = None, list(argv)
    while rest and (rest[0] in ("-C", "--ledger") or rest[0].startswith("--ledger=")):
        if "=" in rest[0]:
            ledger, rest = rest[0].split("=", 1)[1], rest[1:]
        elif len(rest) > 1:
            ledger, rest = rest[1], rest[2:]
        else:
            return None
        if not ledger or ledger.startswith("-"):
            return None
    if not rest or rest[0] not in ("status", "log"):
        return None
    cmd, opts, args = rest[0], {"json": False, "oneline": False, "all": False, "limit": None}, rest[1:]
    flags = {"--json": "json"} if cmd == "status" else {"--json": "json", "--oneline": "oneline", "--all": "all"}
    while args:
        a = args.pop(0)
        if a in flags and not opts[flags[a]]:
            opts[flags[a]] = True
            continue
        if cmd != "log" or opts["limit"] is not None:
            return None
        if a in ("-n", "--max-count") and args:
            value = args.pop(0)
        elif a.startswith("--max-count="):
            value = a.split("=", 1)[1]
        elif a.startswith("-n") and len(a) > 2:
            value = a[2:]
        else:
            return None
        if not _COUNT.fullmatch(value):
            return None
        opts["limit"] = int(value)
    return ledger, cmd, opts


def answer(argv: list[str]) -> bool:
    """Answer argv here and return True, or return False (having written nothing) for the full CLI."""
    parsed = _parse(argv)
    if parsed is None:
        return False
    ledger_arg, cmd, opts = parsed
    try:
        from .reads import check_utf8

        check_utf8(argv)
        from ..ledger import Ledger
        from ..settings import Settings

        env = Settings.from_env()  # refuses a bad KLEDGER_DEVICE as the full CLI does (then it reports it)
        with Ledger.open(ledger_arg, env=env) as ledger:
            if cmd == "status":
                result = ledger.status()
            else:
                from .reads import read_log

                result = read_log(ledger, None, opts["limit"], None, None, opts["all"])
    except KledgerError as exc:  # reported as the full CLI reports it, without reading again (a lock wait)
        from .main import _fail, _state

        _state["json"] = "--json" in argv
        _fail(exc.one_line(), exc.exit_code, exc.kind)
    except Exception:  # anything else: the full CLI runs it again and reports it as every command does
        return False
    from .reads import emit_json, log_lines, print_lines, status_lines

    try:
        if cmd == "status" and opts["json"]:
            emit_json("status", result)
        elif cmd == "status":
            print_lines(status_lines(result))
        else:
            head, branch, entries = result
            if opts["json"]:
                emit_json("log", {"head": head, "branch": branch, "commits": entries})
            else:
                print_lines(log_lines(entries, head, branch, opts["oneline"]))
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # while printing: the last line of defence, as in the full CLI
        from .main import _internal

        _internal(exc)
    return True
