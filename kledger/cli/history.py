"""log, show, diff, blame: reading the history (these never write to the ledger)."""

from __future__ import annotations

import sys

import typer

from .app import JSON_OPT, RELATION_OPT, app, open_ledger, want_json
from .output import emit_json, escape, out, short


def _refs_label(entry: dict, head: str | None, branch: str | None) -> str:
    names = [("HEAD -> " + n) if n == branch else n for n in sorted(entry["refs"], key=lambda n: n != branch)]
    if entry["id"] == head and branch is None:
        names.insert(0, "HEAD")
    return f" ({', '.join(names)})" if names else ""


@app.command()
def log(rev: str | None = typer.Argument(None, help="Start from this revision (default HEAD)."),
        oneline: bool = typer.Option(False, "--oneline", help="One line per commit."),
        limit: int | None = typer.Option(None, "-n", "--max-count", min=1, help="Show at most N commits."),
        subject: str | None = typer.Option(None, "--subject", "-s", help="Only commits touching this subject."),
        relation: str | None = typer.Option(None, "--relation", "-r", help="Only commits touching this relation."),
        all_: bool = typer.Option(False, "--all", help="Commits reachable from any branch."),
        json_: bool = JSON_OPT) -> None:
    """Show the commit history, newest first."""
    want_json(json_)
    if rev is not None and all_:
        from ..errors import UsageError
        raise UsageError("give REV or --all, not both", "--all starts from every branch")
    with open_ledger() as ledger:
        head, branch = ledger.head(), ledger.current_branch()
        if head is None and rev is None and not all_:
            entries = []
        else:
            entries = ledger.log(rev, limit=limit, subject=subject, relation=relation, all_refs=all_)
    if json_:
        emit_json("log", {"head": head, "branch": branch, "commits": entries})
        return
    if not entries:
        out.print("No commits yet" if head is None else "No matching commits")
    lines: list[tuple[str, str, str]] = []  # (text, dim suffix, colour), as print_lines takes them
    for e in entries:
        label = _refs_label(e, head, branch)
        counts = f"+{e['added']}/-{e['retracted']}"
        if oneline:
            lines.append((f"{short(e['id'])}{label} {(e['message'].splitlines() or [''])[0]}", f" ({counts})", "default"))
            continue
        lines.append((f"commit {e['id']}{label}", "", "yellow"))
        if len(e["parents"]) > 1:
            lines.append(("Merge:  " + " ".join(short(p) for p in e["parents"]), "", "default"))
        lines += [(f"Author: {e['author']}", "", "default"), (f"Date:   {e['timestamp']}", "", "default"),
                  ("", "", "default")]
        lines += [("    " + line, "", "default") for line in e["message"].splitlines()]
        lines += [("", f"    ({counts} facts)", "default"), ("", "", "default")]
    print_lines(lines)


def print_lines(lines: list[tuple[str, str, str]]) -> None:
    """(main text, dim suffix, colour) lines: coloured on a terminal, plain text fast when piped."""
    if not out.is_terminal:
        sys.stdout.write("".join(f"{a}{b}\n" for a, b, _ in lines))
        return
    for a, b, colour in lines:
        out.print(f"[{colour}]{escape(a)}[/][dim]{escape(b)}[/]")


def _fact_line(sign: str, f: dict, colour: str) -> str:
    return (f"[{colour}]{sign} {escape(f['prompt'])} → {escape(f['target'])}[/]"
            f"  [dim]({escape(f['subject'])} · {escape(f['relation'])})[/]")


@app.command()
def show(rev: str = typer.Argument("HEAD", help="Revision to show."), json_: bool = JSON_OPT) -> None:
    """Show one commit: its metadata and the facts it added and retracted."""
    want_json(json_)
    with open_ledger() as ledger:
        info = ledger.show(rev)
    if json_:
        emit_json("show", info)
        return
    out.print(f"[yellow]commit {info['id']}[/]" + (f" [yellow]({escape(', '.join(info['refs']))})[/]" if info["refs"] else ""))
    if len(info["parents"]) > 1:
        out.print("Merge:  " + " ".join(short(p) for p in info["parents"]))
    out.print(f"Author: {escape(info['author'])}\nDate:   {info['timestamp']}\n")
    for line in info["message"].splitlines():
        out.print("    " + escape(line))
    for k, v in sorted(info["meta"].items()):
        out.print(f"    [dim]{escape(k)}: {escape(str(v))}[/]")
    out.print("")
    for op in info["ops"]:
        out.print(_fact_line("+" if op["op"] == "add" else "-", op, "green" if op["op"] == "add" else "red"))


@app.command()
def diff(rev_a: str | None = typer.Argument(None, help="From (default HEAD; with no revision: HEAD vs staged)."),
         rev_b: str | None = typer.Argument(None, help="To (default HEAD)."),
         stat: bool = typer.Option(False, "--stat", help="Only the counts."),
         json_: bool = JSON_OPT) -> None:
    """Facts added, removed and changed between two revisions."""
    want_json(json_)
    with open_ledger() as ledger:
        d = ledger.diff(rev_a, rev_b, with_facts=json_ or not stat)
    def rows(items, with_before=False):
        return [{"fact_id": c.fact_id, **c.fact.to_dict(),
                 **({"before": {"fact_id": c.before_id, **c.before.to_dict()}} if with_before else {})}
                for c in items]
    if json_:
        emit_json("diff", {"from": d["from"], "to": d["to"], "added": rows(d["added"]),
                           "removed": rows(d["removed"]), "changed": rows(d["changed"], True)})
        return
    counts = f"{d['counts']['added']} added, {d['counts']['removed']} removed, {d['counts']['changed']} changed"
    if stat:
        out.print(counts)
        return
    lines = [(f"~ {c.fact.prompt}: {c.before.target} → {c.fact.target}", f"  ({c.fact.subject})", "yellow")
             for c in d["changed"]]
    lines += [(f"+ {c.fact.prompt} → {c.fact.target}", f"  ({c.fact.subject} · {c.fact.relation})", "green")
              for c in d["added"]]
    lines += [(f"- {c.fact.prompt} → {c.fact.target}", f"  ({c.fact.subject} · {c.fact.relation})", "red")
              for c in d["removed"]]
    print_lines(lines)
    out.print(f"[dim]{counts}[/]")


@app.command()
def blame(subject: str = typer.Argument(..., help="Subject to look up."),
          relation: str | None = RELATION_OPT,
          rev: str = typer.Option("HEAD", "--rev", help="Revision to look at."),
          json_: bool = JSON_OPT) -> None:
    """Which commit set each fact about SUBJECT that is in force."""
    want_json(json_)
    with open_ledger() as ledger:
        rows = ledger.blame(subject, relation, rev)
    if json_:
        emit_json("blame", {"subject": subject, "relation": relation, "facts": rows})
        return
    if not rows:
        out.print(f"No fact about {escape(subject)!s} is in force")
    for r in rows:
        out.print(f"[yellow]{short(r['commit'])}[/] {escape(r['author'])} {r['timestamp'][:10]}  "
                  f"{escape(r['prompt'])} → [bold]{escape(r['target'])}[/]  [dim]{escape((r['message'].splitlines() or [''])[0])}[/]")
