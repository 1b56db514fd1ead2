"""config, fsck, export, report: the ledger itself: its settings, its integrity, its history as text
and as an HTML page.

JSON shapes (docs/json.md): `config` → {model, soft_threshold, hparams, corpus} (or the one KEY
asked for); `fsck` → {ok, commits, facts, problems}; `export` → {path, commits, facts}."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import IntegrityError, UsageError
from .app import JSON_OPT, app, open_ledger, want_json
from .output import emit_json, escape, out, say

CONFIG_KEYS = ("model", "soft-threshold", "hparams", "corpus")


@app.command()
def config(key: str | None = typer.Argument(None, metavar="KEY", help=f"One of: {', '.join(CONFIG_KEYS)}."),
           value: str | None = typer.Argument(None, metavar="VALUE", help="With soft-threshold: a cosine in "
                                              "(0, 1], 'off' or 'default'."),
           json_: bool = JSON_OPT) -> None:
    """Show the ledger's settings, or set the soft-conflict threshold (`config soft-threshold 0.97`).
    model, hparams and corpus are fixed when the ledger is made (`kledger init`)."""
    want_json(json_)
    if key is not None and key not in CONFIG_KEYS:
        raise UsageError(f"unknown setting {key!r}", f"use one of: {', '.join(CONFIG_KEYS)}")
    if value is not None and key != "soft-threshold":
        raise UsageError(f"{key} is fixed when the ledger is made",
                         "make a new ledger with `kledger init --model/--set/--corpus`, or set soft-threshold")
    if value is not None:
        with open_ledger(write=True) as ledger:
            if not ledger.has_model:
                raise UsageError("this ledger has no model, so it has no keys to compare for soft conflicts",
                                 "soft conflicts need a ledger made with a model")
            cfg = ledger.set_soft_threshold(value)
    else:
        with open_ledger() as ledger:
            cfg = ledger.config()
    shown = {k: cfg[k.replace("-", "_")] for k in CONFIG_KEYS} if key is None else {key: cfg[key.replace("-", "_")]}
    if json_:
        emit_json("config", {k.replace("-", "_"): v for k, v in shown.items()})
        return
    for k, v in shown.items():
        out.print(f"{k}: {escape(v if isinstance(v, str) else json.dumps(v))}")


@app.command()
def fsck(json_: bool = JSON_OPT) -> None:
    """Re-hash every fact and commit and check every reference."""
    want_json(json_)
    with open_ledger() as ledger:
        rep = ledger.fsck()
    if json_:
        emit_json("fsck", rep)
    else:
        for p in rep["problems"]:
            out.print(f"[red]{escape(p)}[/]")
        held = (f" ({rep['facts_in_force']} in force at HEAD; the others are in earlier commits, staged or "
                "were unstaged)") if rep.get("facts_in_force") is not None and rep["facts_in_force"] != rep["facts"] else ""
        say(f"checked {rep['commits']} commits and the {rep['facts']} facts stored{held}: "
            + ("ok" if rep["ok"] else f"{len(rep['problems'])} problem(s)"))
    if not rep["ok"]:
        raise IntegrityError(f"fsck found {len(rep['problems'])} problem(s)",
                             "restore the ledger from a backup or an exported text ledger")


@app.command()
def export(out_dir: Path = typer.Argument(..., help="Directory to write commits.jsonl and refs.json into."),
           json_: bool = JSON_OPT) -> None:
    """Write the whole history as text (replay it with `kledger init --from DIR`)."""
    want_json(json_)
    with open_ledger() as ledger:
        res = ledger.export(out_dir)
    if json_:
        emit_json("export", res)
    else:
        say(f"Exported {res['commits']} commits and {res['facts']} facts to {escape(res['path'])}")


@app.command()
def report(rev: str | None = typer.Argument(None, help="Revision whose history to show (default HEAD)."),
           html: Path = typer.Option(..., "--html", metavar="FILE", help="The HTML file to write (one self-contained page)."),
           all_: bool = typer.Option(False, "--all", help="Commits reachable from any branch."),
           evals: list[Path] = typer.Option([], "--eval", metavar="EVAL_JSON", help="A `kledger eval --json` output to plot along the "
                                            "history (repeatable)."),
           json_: bool = JSON_OPT) -> None:
    """Write an audit page: the commit graph, each fact's history, conflicts and eval metrics, as one HTML file."""
    want_json(json_)
    with open_ledger() as ledger:
        res = ledger.report(html, rev, all_, evals)
    if json_:
        emit_json("report", res)
    else:
        say(f"Wrote {escape(res['path'])}: {res['commits']} commits, {res['facts']} facts, "
            f"{res['open_conflicts']} open and {res['decided_conflicts']} decided conflicts, "
            f"{res['metric_points']} eval point(s)")
