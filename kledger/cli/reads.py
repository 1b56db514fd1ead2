"""What `status` and `log` print, as (text, dim suffix, colour) lines, and the one place those are
written; also JSON output. Nothing here imports typer or rich at module level: these are the
commands people run most, and the fast path (`kledger.cli.fast`) prints them without the cost of
either. On a terminal the lines are coloured through rich; piped, they are plain text."""

from __future__ import annotations

import json
import sys
from typing import Any

JSON_VERSION = 1
_emitted = {"json": False}

Line = tuple[str, str, str]  # (main text, dim suffix, colour)


def emit_json(command: str, data: dict[str, Any]) -> None:
    _emitted["json"] = True
    doc = {"version": JSON_VERSION, "command": command, **data}
    sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def _default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def short(cid: str | None) -> str:
    return cid[:10] if cid else "(none)"


def print_lines(lines: list[Line]) -> None:
    """Coloured on a terminal (rich), plain text when piped. rich is imported only when stdout is
    a terminal or the environment asks for colour on a pipe (rich then decides)."""
    from ..settings import colour_forced

    if sys.stdout.isatty() or colour_forced():
        from .output import out

        if out.is_terminal:
            from rich.markup import escape

            for a, b, colour in lines:
                out.print(f"[{colour}]{escape(a)}[/][dim]{escape(b)}[/]")
            return
    sys.stdout.write("".join(f"{a}{b}\n" for a, b, _ in lines))
    sys.stdout.flush()


def check_utf8(argv: list[str]) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates: refused here, for every command,
    rather than where the text is first hashed or handed to DuckDB."""
    for n, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            from ..errors import UsageError

            raise UsageError(f"command-line argument {n} ({arg!r}) is not valid UTF-8 text",
                             "set a UTF-8 locale, or put the text in a UTF-8 file and use --file") from None


def status_lines(st: dict) -> list[Line]:
    lines: list[Line] = [(f"On branch {st['branch']}" if st["branch"] else f"HEAD detached at {short(st['head'])}",
                          "", "default")]
    up = st.get("upstream")
    if up:
        state = "up to date" if not (up["ahead"] or up["behind"]) else f"ahead {up['ahead']}, behind {up['behind']}"
        lines.append((f"Your branch against {up['ref']}: {state}", "", "default"))
    if st["head"] is None:
        lines.append(("No commits yet", "", "default"))
    lines.append((f"{st['facts_in_force']} fact(s) in force; model {st['model']}", "", "default"))
    if st["pending"]:
        p = st["pending"]
        what = f"{p['theirs_name']!r} ({short(p['theirs'])})" if p.get("theirs_name") else short(p["theirs"])
        lines.append((f"A {p['kind']} of {what} stopped on {len(p.get('conflicts', []))} conflict(s): "
                      f"run `kledger conflicts`, then `kledger resolve` or `kledger {p['kind']} --abort`", "", "yellow"))
    if st["staged"]:
        lines.append((f"Staged ({len(st['staged'])}):", "", "default"))
        for s in st["staged"][:50]:
            sign = "+" if s["op"] == "add" else "-"
            lines.append((f"  {sign} {s['prompt']} → {s['target']}", f"  ({s['subject']})", "default"))
        if len(st["staged"]) > 50:
            lines.append((f"  … and {len(st['staged']) - 50} more (use --json for all)", "", "default"))
    else:
        lines.append(("Nothing staged", "", "default"))
    return lines


def _refs_label(entry: dict, head: str | None, branch: str | None) -> str:
    names = [("HEAD -> " + n) if n == branch else n for n in sorted(entry["refs"], key=lambda n: n != branch)]
    if entry["id"] == head and branch is None:
        names.insert(0, "HEAD")
    return f" ({', '.join(names)})" if names else ""


def log_lines(entries: list[dict], head: str | None, branch: str | None, oneline: bool,
              graph: bool = False) -> list[Line]:
    lines: list[Line] = []
    if not entries:
        lines.append(("No commits yet" if head is None else "No matching commits", "", "default"))
    rows = graph_rows(entries) if graph else [("", [], "")] * len(entries)
    for e, (mark, extra, rest) in zip(entries, rows):
        first, more = (mark + " ", rest + " ") if graph else ("", "")
        label = _refs_label(e, head, branch)
        counts = f"+{e['added']}/-{e['retracted']}"
        if oneline:
            lines.append((f"{first}{short(e['id'])}{label} {(e['message'].splitlines() or [''])[0]}",
                          f" ({counts})", "default"))
        else:
            lines.append((f"{first}commit {e['id']}{label}", "", "yellow"))
            lines += [(x, "", "default") for x in extra]  # a merge's new column opens before its body
            extra = []
            if len(e["parents"]) > 1:
                lines.append((more + "Merge:  " + " ".join(short(p) for p in e["parents"]), "", "default"))
            lines += [(f"{more}Author: {e['author']}", "", "default"), (f"{more}Date:   {e['timestamp']}", "", "default"),
                      (more.rstrip(), "", "default")]
            lines += [(more + "    " + line, "", "default") for line in e["message"].splitlines()]
            lines += [(more, f"    ({counts} facts)", "default"), (more.rstrip(), "", "default")]
        lines += [(x, "", "default") for x in extra]
    return lines


def graph_rows(entries: list[dict]) -> list[tuple[str, list[str], str]]:
    """For `log --graph`, per entry (newest first): the graph drawn left of its first line, the
    connector lines after it (a merge opening a column, branches joining), and the graph drawn
    left of its other lines. One column per line of descent being followed, as git draws it."""
    cols: list[str] = []
    rows = []
    for e in entries:
        if e["id"] not in cols:
            cols.append(e["id"])
        i = cols.index(e["id"])
        mark = " ".join("*" if j == i else "|" for j in range(len(cols)))
        parents = list(e["parents"])
        after = cols[:i] + parents[:1] + cols[i + 1:] if parents else cols[:i] + cols[i + 1:]
        opened = [p for p in parents[1:] if p not in after]
        after += opened
        extra = []
        if opened:
            extra.append(" ".join("|" for _ in range(len(cols))) + "\\" * len(opened))
        joined = [j for j, c in enumerate(after) if c in after[:j]]
        for j in reversed(joined):  # a line of descent joins one to its left: it and those after it move left
            chars = [" "] * (2 * len(after) - 1)
            for k in range(len(after)):
                chars[2 * k if k < j else 2 * k - 1] = "|" if k < j else "/"
            extra.append("".join(chars).rstrip())
            after.pop(j)
        cols = after
        rows.append((mark, extra, " ".join("|" for _ in range(max(1, len(cols))))))
    return rows


def read_log(ledger: Any, rev: str | None, limit: int | None, subject: str | None, relation: str | None,
             all_refs: bool) -> tuple[str | None, str | None, list[dict]]:
    """(HEAD, branch, log entries) as `log` shows them."""
    head, branch = ledger.head(), ledger.current_branch()
    if head is None and rev is None and not all_refs:
        return head, branch, []
    return head, branch, ledger.log(rev, limit=limit, subject=subject, relation=relation, all_refs=all_refs)
