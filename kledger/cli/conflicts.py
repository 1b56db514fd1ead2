"""conflicts, check, resolve, relation: contradictions, the decisions about them, the CI gate, and
the declared relations (multi-valued, inverse) that say what contradicts what.

JSON shapes (docs/conflicts.md): `conflicts` → {target, facts, conflicts: [CONFLICT], collisions};
`check` → {ok, target, facts, unresolved, conflicts: [CONFLICT], replayed, collisions, soft_checked}; `resolve` → {context, decided,
commit, resolved, remaining}; `relation` → {relations: [{relation, multi, inverse_of}]}.
"""

from __future__ import annotations

import typer

from ..errors import ConflictError, UsageError
from .app import AUTHOR_OPT, JSON_OPT, app, open_ledger, want_json
from .output import emit_json, escape, note_collisions, note_resolved, out, say, short


# ------------------------------------------------------------------ printing
def _where(target: dict) -> str:
    kind = target["kind"]
    if kind in ("merge", "cherry-pick"):
        return f"the {kind} of {short(target['theirs'])} onto {short(target['commit'])}"
    if kind == "staged":
        return f"HEAD ({short(target['commit'])}) with {target['staged']} staged change(s)"
    return f"{'HEAD' if kind == 'head' else 'revision'} {short(target['commit'])}"


def _print_conflicts(conflicts: list[dict]) -> None:
    for c in conflicts:
        out.print(f"[bold]conflict {c['conflict'][:10]}[/] ({escape(c['kind'])}) "
                  f"{escape(repr(c['subject']))} · {escape(c['relation'])}")
        for f in c["facts"]:
            origin = "staged"
            if f["commit"]:
                first_line = f["message"].splitlines()[0] if f["message"] else ""
                origin = f"{short(f['commit'])} {f['timestamp'][:10]} {escape(f['author'])}  {escape(first_line)}"
            implied = [cl for cl in f["claims"] if cl["implied"]]
            says = "".join(f"  [dim](implies {escape(repr(cl['subject']))} · {escape(cl['relation'])} → "
                           f"{escape(repr(cl['value']))})[/]" for cl in implied)
            out.print(f"  {f['side']:<7s} {escape(f['prompt'])} → [bold]{escape(f['target'])}[/]{says}"
                      f"{'  [yellow](newest)[/]' if f['newest'] else ''}")
            out.print(f"          [dim]{origin}[/]")
        out.print(f"  objects: {escape(', '.join(c['objects']))}")
        if c["remembered"]:
            r = c["remembered"]
            out.print(f"  [dim]remembered decision: keep {escape(', '.join(r['keep']))} "
                      f"({escape(r.get('author') or '?')}, {(r.get('at') or '')[:10]})[/]")


# ------------------------------------------------------------------ commands
@app.command()
def conflicts(rev: str | None = typer.Argument(None, help="Revision (default: the stopped merge or "
                                                         "cherry-pick, else HEAD with the staged facts)."),
              staged: bool = typer.Option(False, "--staged", help="HEAD with the staged facts."),
              json_: bool = JSON_OPT) -> None:
    """List every conflict: its facts, the commits that brought them, authors, dates, the newest side."""
    want_json(json_)
    with open_ledger() as ledger:
        rep = ledger.conflicts(rev, staged=staged)
    if json_:
        emit_json("conflicts", rep)
        return
    _print_conflicts(rep["conflicts"])
    note_collisions(rep["collisions"])
    n = len(rep["conflicts"])
    decided = sum(1 for c in rep["conflicts"] if c["remembered"])
    if n:
        say(f"{n} conflict(s) in {_where(rep['target'])}"
            + (f" ({decided} with a remembered decision)" if decided else "")
            + ": decide with `kledger resolve --keep OBJECT` "
            f"(or --newest{', --ours, --theirs' if rep['target']['kind'] in ('merge', 'cherry-pick') else ''})")
    else:
        say(f"No conflicts in {_where(rep['target'])} ({rep['facts']} facts)")


@app.command()
def check(rev: str | None = typer.Argument(None, help="Revision to check (default HEAD)."),
          staged: bool = typer.Option(False, "--staged", help="Check what `kledger commit` would make of HEAD "
                                                              "and the staged facts."),
          json_: bool = JSON_OPT) -> None:
    """CI gate: exit 0 when there is no unresolved conflict, 3 when there is. Loads the model only
    with --staged, to measure new facts' keys for soft conflicts as `commit` does."""
    want_json(json_)
    with open_ledger() as ledger:
        rep = ledger.check(rev, staged=staged)
        unmeasured = ledger.has_model and not ledger.measured
        soft_on = ledger.soft_threshold() is not None
    if json_:
        emit_json("check", rep)
    else:
        _print_conflicts(rep["conflicts"])
        note_collisions(rep["collisions"])
        if unmeasured:
            say("note: soft conflicts were not looked for: this ledger was replayed with --no-measure, so its "
                "facts have no keys")
        elif staged and not rep["soft_checked"] and soft_on:
            say("note: soft conflicts of the staged facts were not looked for: their keys need the model, which "
                "could not be loaded here (is the model side installed? pip install 'kledger[edit]'); "
                "`kledger commit` will look for them")
    if not rep["ok"]:
        raise ConflictError(f"{rep['unresolved']} unresolved conflict(s) in {_where(rep['target'])}",
                            "see them with `kledger conflicts`, decide with `kledger resolve`")
    if not json_:
        say(f"ok: no unresolved conflict in {_where(rep['target'])} ({rep['facts']} facts)")


@app.command()
def resolve(conflict: str | None = typer.Argument(None, help="Conflict key (prefix) or subject; default: the "
                                                             "conflict that has OBJECT, or all of them."),
            keep: str | None = typer.Option(None, "--keep", help="Keep the facts that say OBJECT; retract the others."),
            ours: bool = typer.Option(False, "--ours", help="Keep our side (during a merge or cherry-pick)."),
            theirs: bool = typer.Option(False, "--theirs", help="Keep their side (during a merge or cherry-pick)."),
            newest: bool = typer.Option(False, "--newest", help="Keep the newest facts, in every conflict."),
            forget: bool = typer.Option(False, "--forget", help="Forget the remembered decision for CONFLICT (a key)."),
            message: str | None = typer.Option(None, "--message", "-m", help="Message of the resolution commit."),
            author: str | None = AUTHOR_OPT,
            json_: bool = JSON_OPT) -> None:
    """Decide conflicts, commit the decision, and remember it for when the same conflict comes back."""
    want_json(json_)
    chosen = [name for name, on in (("keep", keep is not None), ("ours", ours), ("theirs", theirs),
                                    ("newest", newest), ("forget", forget)) if on]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --keep OBJECT, --ours, --theirs, --newest, --forget",
                         "e.g. `kledger resolve --keep Rome`; `kledger conflicts` lists the choices")
    with open_ledger(write=True) as ledger:
        if forget:
            if not conflict:
                raise UsageError("--forget needs the conflict key", "e.g. `kledger resolve 3f2a9c1b0e --forget`")
            res = ledger.forget_decision(conflict)
            if json_:
                emit_json("resolve", {"forgotten": res})
            else:
                say(f"Forgot the decision for conflict {res['conflict'][:10]} (keep {escape(', '.join(res['keep']))})")
            return
        res = ledger.resolve_conflicts(conflict, keep=keep, strategy=chosen[0], message=message, author=author)
        branch = ledger.current_branch()
    if json_:
        emit_json("resolve", res)
        return
    for d in res["decided"]:
        say(f"Decided conflict {d['conflict'][:10]} ({escape(repr(d['subject']))} · {escape(d['relation'])}): "
            f"keep {escape(', '.join(d['keep']))}, drop {len(d['dropped'])} fact(s)")
    note_resolved({"resolved": res["resolved"]})
    if res["commit"]:
        say(escape(f"[{branch or 'detached'} {short(res['commit'])}] ") + f"committed the resolution ({res['context']})")
    else:
        say(f"{len(res['remaining'])} conflict(s) still undecided: decisions recorded, nothing committed yet "
            f"(`kledger conflicts` lists them)")


# ------------------------------------------------------------------ relation
def _print_relations(rows: list[dict]) -> None:
    for r in rows:
        extra = (["multi-valued"] if r["multi"] else ["single-valued"]) + \
                ([f"inverse of {r['inverse_of']!r}"] if r["inverse_of"] else [])
        out.print(f"{escape(r['relation'])}  [dim]{escape(', '.join(extra))}[/]")


@app.command()
def relation(action: str = typer.Argument("list", metavar="ACTION", help="list, set or inverse."),
             relation_: str | None = typer.Argument(None, metavar="RELATION",
                                                    help="Relation id (P36) or template ('{} is a twin city of')."),
             other: str | None = typer.Argument(None, metavar="OTHER", help="With inverse: the inverse relation."),
             multi: bool | None = typer.Option(None, "--multi/--single", help="With set: several objects per "
                                               "subject are fine (--multi), or not (--single, the default)."),
             remove: bool = typer.Option(False, "--remove", help="With inverse: remove RELATION's inverse."),
             json_: bool = JSON_OPT) -> None:
    """Declare relations: `relation list`, `relation set R --multi|--single`, `relation inverse R OTHER`."""
    want_json(json_)
    if action == "list":
        if relation_ is not None or multi is not None or remove:
            raise UsageError("`relation list` takes no other argument", "run `kledger relation list`")
        with open_ledger() as ledger:
            rows = ledger.relations()
        if not rows and not json_:
            say("No relations declared: every relation is single-valued and has no inverse")
    elif action == "set":
        if relation_ is None or other is not None or multi is None or remove:
            raise UsageError("`relation set` takes RELATION and --multi or --single",
                             "e.g. kledger relation set '{} is a twin city of' --multi")
        with open_ledger(write=True) as ledger:
            rows = [ledger.set_multi(relation_, multi)]
    elif action == "inverse":
        if relation_ is None or (other is None) != remove or multi is not None:
            raise UsageError("`relation inverse` takes RELATION OTHER, or RELATION --remove",
                             "e.g. kledger relation inverse 'The capital of {} is' '{} is the capital of'")
        with open_ledger(write=True) as ledger:
            row = ledger.set_inverse(relation_, other)
            rows = [row] + [r for r in ledger.relations()
                            if other is not None and r["relation"] == row["inverse_of"] != row["relation"]]
    else:
        raise UsageError(f"unknown relation action {action!r}", "use list, set or inverse")
    if json_:
        emit_json("relation", {"relations": rows})
    else:
        _print_relations(rows)

