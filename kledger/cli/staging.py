"""init, add, rm, status, reset, commit: making a ledger, staging facts and committing them."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import JSON_OPT, RAY_OPT, RELATION_OPT, WORKERS_OPT, app, ledger_dir, open_ledger, scale_out, want_json
from .app import settings as env
from .output import emit_json, escape, note_collisions, note_resolved, note_weak, progress_bar, say, short
from .reads import print_lines, status_lines


@app.command()
def init(path: Path = typer.Argument(Path("."), help="Directory to create the ledger in (.kledger/ inside)."),
         model: str | None = typer.Option(None, "--model", "-m", envvar="KLEDGER_MODEL",
                                         help="Model the ledger edits: smollm2-135m (default), a local HF "
                                              "directory or a cached hub id; 'none' for a facts-only ledger."),
         from_: Path | None = typer.Option(None, "--from", help="Replay a text ledger (e.g. ledgers/NAME)."),
         corpus: Path | None = typer.Option(None, "--corpus", help="Text file for C0 (default: text sampled from the model)."),
         set_: list[str] | None = typer.Option(None, "--set", help="Hyper-parameter override KEY=VALUE (repeatable), e.g. lam=5000."),
         no_measure: bool = typer.Option(False, "--no-measure", help="With --from: record the model but neither load "
                                         "it nor measure (no torch needed); the ledger can be checked, not edit the model."),
         json_: bool = JSON_OPT) -> None:
    """Create a ledger in PATH/.kledger/."""
    from ..errors import UsageError
    from ..ledger import Ledger

    want_json(json_)
    if no_measure and from_ is None:
        raise UsageError("--no-measure applies to --from only", "e.g. `kledger init DIR --from ledgers/NAME --no-measure`")
    if path == Path(".") and ledger_dir():  # `kledger -C DIR init` makes the ledger in DIR
        path = Path(ledger_dir())
        if path.name == ".kledger":
            path = path.parent
    settings = _parse_settings(set_ or [])
    if corpus is not None:
        settings["corpus"] = str(corpus)
    if from_ is not None:
        with progress_bar() as progress:
            ledger = Ledger.init_from(path, from_, model=model, settings=settings, progress=progress, env=env(),
                                      measure=not no_measure)
    else:
        ledger = Ledger.init(path, model=model, settings=settings, env=env())
    with ledger:
        info = {"path": str(ledger.path), "model": ledger.model, "head": ledger.head(),
                "branch": ledger.current_branch(), "commits": len(ledger.graph())}
    if json_:
        emit_json("init", info)
    else:
        extra = f", {info['commits']} commit(s) replayed" if from_ is not None else ""
        say(f"Initialised kledger ledger in {escape(info['path'])} (model {escape(info['model'])}{extra})")


def _parse_settings(items: list[str]) -> dict:
    """--set KEY=VALUE pairs → {"hparams": {...}} with JSON-typed values (numbers, lists); the
    names and values are checked by `Ledger.init`."""
    import json

    from ..errors import InputError, UsageError
    from ..records import parse_json

    hp = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is not KEY=VALUE", "e.g. --set lam=5000 --set layers=[3,4,5]")
        try:
            hp[key.strip()] = parse_json(value)
        except json.JSONDecodeError:
            hp[key.strip()] = value
        except InputError as exc:  # nested too deeply, or an integer too long to read
            raise UsageError(f"--set {key.strip()}: {exc.message}", "e.g. --set lam=5000") from None
    return {"hparams": hp} if hp else {}


@app.command()
def add(prompt: str | None = typer.Argument(None, help="Text the model completes, containing the subject."),
        target: str | None = typer.Argument(None, help="The new object, e.g. 'Rome'."),
        subject: str | None = typer.Option(None, "--subject", "-s", help="The subject, as spelled in PROMPT."),
        relation: str | None = typer.Option(None, "--relation", "-r", help="Relation id (default: the prompt template)."),
        target_true: str | None = typer.Option(None, "--old", help="The object before the edit, if known."),
        file: Path | None = typer.Option(None, "--file", "-f", help="Read facts from a file (CounterFact, ZsRE, JSONL, CSV)."),
        fmt: str | None = typer.Option(None, "--format", help="File format (default: detected)."),
        limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Read only the first N records of --file."),
        json_: bool = JSON_OPT) -> None:
    """Stage facts: one from the command line, or many from --file."""
    from ..errors import UsageError
    from ..records import Fact

    want_json(json_)
    if file is not None:
        if prompt is not None or target is not None:
            raise UsageError("give either PROMPT TARGET or --file, not both", "run two `kledger add` commands")
        if subject is not None or relation is not None or target_true is not None:
            raise UsageError("--subject, --relation and --old apply to one fact, not to --file",
                             "put those fields in the file's records")
        from ..formats import read_facts

        facts = read_facts(file, fmt, limit=limit)
    else:
        if prompt is None or target is None:
            raise UsageError("missing PROMPT and TARGET", "e.g. kledger add 'The Eiffel Tower is located in' Rome "
                                                          "--subject 'Eiffel Tower', or use --file")
        if limit is not None or fmt is not None:
            raise UsageError("--limit and --format apply to --file", "drop them, or read the facts from a file")
        if subject is None:
            raise UsageError("missing --subject", "name the entity the fact is about, as spelled in the prompt")
        facts = [Fact.create(prompt, target, subject=subject, relation=relation, target_true=target_true)]
    with open_ledger(write=True) as ledger:
        res = ledger.add(facts)
    if json_:
        emit_json("add", res)
    else:
        skipped = f" ({res['skipped']} already in force or staged)" if res["skipped"] else ""
        say(f"Staged {res['staged']} fact(s){skipped}")


@app.command()
def rm(subject: str = typer.Argument(..., help="Subject whose facts to retract."),
       relation: str | None = RELATION_OPT,
       json_: bool = JSON_OPT) -> None:
    """Stage the retraction of facts in force about SUBJECT."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        res = ledger.remove(subject, relation)
    if json_:
        emit_json("rm", res)
    else:
        say(f"Staged the retraction of {res['staged']} fact(s)")


@app.command()
def status(json_: bool = JSON_OPT) -> None:
    """Show the branch, HEAD, the facts in force and what is staged."""
    want_json(json_)
    with open_ledger() as ledger:
        st = ledger.status()
    if json_:
        emit_json("status", st)
        return
    print_lines(status_lines(st))


@app.command()
def reset(subject: str | None = typer.Argument(None, help="Only unstage facts about this subject."),
          json_: bool = JSON_OPT) -> None:
    """Unstage facts (all, or those about SUBJECT)."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        n = ledger.reset(subject)
    if json_:
        emit_json("reset", {"unstaged": n})
    else:
        say(f"Unstaged {n} fact(s)")


@app.command()
def commit(message: str = typer.Option(..., "--message", "-m", help="Why this change is made."),
           author: str | None = typer.Option(None, "--author", help="Author (default $KLEDGER_AUTHOR or user@host)."),
           allow_conflicts: bool = typer.Option(False, "--allow-conflicts", help="Record contradictions as open instead of refusing."),
           workers: int | None = WORKERS_OPT, ray: str | None = RAY_OPT,
           json_: bool = JSON_OPT) -> None:
    """Record the staged facts as a new commit."""
    want_json(json_)
    scale_out(workers, ray)
    with open_ledger() as ledger, progress_bar() as progress:
        _warn_if_large(ledger)
        cid = ledger.commit(message, author=author, allow_conflicts=allow_conflicts, progress=progress)
        info = ledger.show(cid)
        branch = ledger.current_branch()
    note_resolved(info["meta"])
    note_collisions(info["meta"].get("collisions", []))
    note_weak(info["meta"].get("weak", []), info["meta"].get("weak_below"))
    if json_:
        emit_json("commit", {"id": cid, "branch": branch, "added": info["added"], "retracted": info["retracted"],
                             "resolved": info["meta"].get("resolved", []),
                             "collisions": info["meta"].get("collisions", []),
                             "landed": info["meta"].get("landed", {}), "weak": info["meta"].get("weak", [])})
    else:
        say(escape(f"[{branch or 'detached'} {short(cid)}] ") + f"{escape(info['message'])} "
            f"(+{info['added']} / -{info['retracted']} facts)")


LARGE_COMMIT = 100  # staged facts from which a commit on a model ledger warns of its cost first


def _warn_if_large(ledger) -> None:
    """Before a model-ledger commit of many facts: say that measuring them takes minutes."""
    if not (ledger.has_model and ledger.measured):
        return
    n = sum(1 for s in ledger.status()["staged"] if s["op"] == "add")
    if n >= LARGE_COMMIT:
        say(f"[yellow]note:[/] this commit measures {n} facts on the model: about {max(1, round(n * 4 / 60))} min "
            "on one CPU core (about 4 s a fact, docs/performance.md), far less on a GPU. Ctrl-C stops it "
            "and leaves the ledger as it was.")
