"""log, show, diff, blame: reading the history (these never write to the ledger)."""

from __future__ import annotations

import typer

from .app import JSON_OPT, RELATION_OPT, app, open_ledger, want_json
from .output import emit_json, escape, out, short, weak_line
from .reads import log_lines, print_lines, read_log


@app.command()
def log(rev: str | None = typer.Argument(None, help="Start from this revision (default HEAD)."),
        oneline: bool = typer.Option(False, "--oneline", help="One line per commit."),
        limit: int | None = typer.Option(None, "-n", "--max-count", min=1, help="Show at most N commits."),
        subject: str | None = typer.Option(None, "--subject", "-s", help="Only commits touching this subject."),
        relation: str | None = typer.Option(None, "--relation", "-r", help="Only commits touching this relation."),
        all_: bool = typer.Option(False, "--all", help="Commits reachable from any branch."),
        graph: bool = typer.Option(False, "--graph", help="Draw the commit graph left of the log (text)."),
        json_: bool = JSON_OPT) -> None:
    """Show the commit history, newest first."""
    want_json(json_)
    if rev is not None and all_:
        from ..errors import UsageError
        raise UsageError("give REV or --all, not both", "--all starts from every branch")
    with open_ledger() as ledger:
        head, branch, entries = read_log(ledger, rev, limit, subject, relation, all_)
    if json_:
        emit_json("log", {"head": head, "branch": branch, "commits": entries})
        return
    print_lines(log_lines(entries, head, branch, oneline, graph))


def _fact_line(sign: str, f: dict, colour: str) -> str:
    return (f"[{colour}]{sign} {escape(f['prompt'])} → {escape(f['target'])}[/]"
            f"  [dim]({escape(f['subject'])} · {escape(f['relation'])})[/]")


@app.command()
def show(rev: str = typer.Argument("HEAD", help="Revision to show."),
         stat: bool = typer.Option(False, "--stat", help="Facts added and retracted per relation, not each fact."),
         json_: bool = JSON_OPT) -> None:
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
    for line in _meta_lines(info["meta"]):
        out.print(f"    [dim]{escape(line)}[/]")
    out.print("")
    if stat:
        _print_stat(info["ops"])
        return
    for op in info["ops"]:
        out.print(_fact_line("+" if op["op"] == "add" else "-", op, "green" if op["op"] == "add" else "red"))


def _meta_lines(meta: dict) -> list[str]:
    """A commit's meta, one line per key; how its facts landed (`landed`, `weak`) summed up, not
    printed as raw mappings of fact ids."""
    lines = []
    for k, v in sorted(meta.items()):
        if k == "landed" and v:
            p = list(v.values())
            lines.append(f"landed: {len(p)} fact(s), P(object | own prompt) mean {sum(p) / len(p):.3f}, "
                         f"lowest {min(p):.3f}")
        elif k == "weak":
            lines.append(f"did not take (P < {meta.get('weak_below')}): {len(v)} fact(s)")
            lines += ["  " + weak_line(w) for w in v]
        elif k not in ("landed", "weak_below"):
            lines.append(f"{k}: {v}")
    return lines


def _print_stat(ops: list[dict]) -> None:
    """Per relation, the facts added and retracted, as `git show --stat` counts per file."""
    per: dict[str, list[int]] = {}
    for op in ops:
        per.setdefault(op["relation"], [0, 0])[op["op"] != "add"] += 1
    width = max((len(r) for r in per), default=0)
    for rel, (plus, minus) in sorted(per.items()):
        out.print(f" {escape(rel.ljust(width))} | [green]{'+' * min(plus, 40)}[/][red]{'-' * min(minus, 40)}[/] "
                  f"{plus + minus}")
    added, retracted = sum(p for p, _ in per.values()), sum(m for _, m in per.values())
    out.print(f" {len(per)} relation(s), {added} fact(s) added, {retracted} retracted")


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
