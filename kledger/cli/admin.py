"""fsck, export."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import IntegrityError
from .app import JSON_OPT, app, open_ledger, want_json
from .output import emit_json, escape, out, say



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
        say(f"checked {rep['commits']} commits and {rep['facts']} facts: "
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
