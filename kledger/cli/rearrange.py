"""branch, checkout, revert, cherry-pick, merge, replay: moving between branches and rewriting
history (undoing, copying and joining commits, and re-measuring them on new parents)."""

from __future__ import annotations

import typer

from .app import ABORT_OPT, ALLOW_OPT, AUTHOR_OPT, JSON_OPT, RAY_OPT, WORKERS_OPT, app, open_ledger, scale_out, want_json
from .output import emit_json, escape, note_resolved, out, progress_bar, say, short


@app.command()
def branch(name: str | None = typer.Argument(None, help="Branch to create (omit to list)."),
           rev: str = typer.Argument("HEAD", help="Where the new branch starts."),
           delete: bool = typer.Option(False, "--delete", "-d", help="Delete branch NAME."),
           force: bool = typer.Option(False, "--force", "-f", help="Move NAME to REV if it exists."),
           all_: bool = typer.Option(False, "--all", "-a", help="List the remote-tracking refs too (origin/main)."),
           json_: bool = JSON_OPT) -> None:
    """List, create or delete branches."""
    want_json(json_)
    if name is None:
        with open_ledger() as ledger:
            rows = ledger.branches(remote=all_)
        if json_:
            emit_json("branch", {"branches": rows})
        else:
            for r in rows:
                mark = "* " if r["current"] else "  "
                colour = "green" if r["current"] else "red" if r.get("remote") else ""
                shown = ("remotes/" if r.get("remote") else "") + r["name"]
                out.print(f"{mark}{f'[{colour}]' if colour else ''}{escape(shown)}"
                          f"{'[/]' if colour else ''} [dim]{short(r['commit'])}[/]")
        return
    with open_ledger(write=True) as ledger:
        cid = ledger.delete_branch(name) if delete else ledger.create_branch(name, rev, force=force)
    if json_:
        emit_json("branch", {"name": name, "commit": cid, "deleted": delete})
    else:
        say(f"{'Deleted' if delete else 'Created'} branch {escape(name)} ({'was ' if delete else 'at '}{short(cid)})")


@app.command()
def checkout(target: str = typer.Argument(..., help="Branch or revision."),
             start: str | None = typer.Argument(None, help="With -b: where the new branch starts (default HEAD)."),
             create: bool = typer.Option(False, "-b", help="Create branch TARGET and switch to it."),
             json_: bool = JSON_OPT) -> None:
    """Switch HEAD to a branch, or detach it at a revision."""
    want_json(json_)
    if start is not None and not create:
        from ..errors import UsageError
        raise UsageError("a start revision is only taken with -b", "use `kledger checkout -b NAME REV`")
    with open_ledger(write=True) as ledger:
        res = ledger.checkout(target, create=create, start=start)
    if json_:
        emit_json("checkout", res)
    elif res["branch"]:
        say(f"Switched to {'a new ' if create else ''}branch {escape(res['branch'])}")
    else:
        say(f"HEAD is now detached at {short(res['head'])}")


@app.command()
def revert(rev: str | None = typer.Argument(None, help="Commit whose changes to undo."),
           message: str | None = typer.Option(None, "--message", "-m"),
           author: str | None = AUTHOR_OPT,
           abort: bool = ABORT_OPT, allow_conflicts: bool = ALLOW_OPT, json_: bool = JSON_OPT) -> None:
    """Make a new commit that retracts what REV added (and restores what it retracted)."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        if abort:
            return _abort(ledger, "revert", json_)
        if rev is None:
            from ..errors import UsageError
            raise UsageError("missing REV", "give the commit to revert, or --abort")
        cid = ledger.revert(rev, author=author, message=message, allow_conflicts=allow_conflicts)
        info = ledger.show(cid)
        branch = ledger.current_branch()
    _report("revert", cid, info, json_, branch)


def _abort(ledger, kind: str, json_: bool) -> None:
    """Abandon a revert, cherry-pick or merge that stopped on conflicts."""
    p = ledger.abort(kind)
    if json_:
        emit_json(kind, {"aborted": p["theirs"]})
    else:
        say(f"Abandoned the {kind} of {short(p['theirs'])}")


def _report(command: str, cid: str, info: dict, json_: bool, branch: str | None) -> None:
    """The new commit, as git names it: [BRANCH ID] message (the branch, or `detached`)."""
    if json_:
        emit_json(command, {"id": cid, "added": info["added"], "retracted": info["retracted"], "meta": info["meta"]})
    else:
        say(escape(f"[{branch or 'detached'} {short(cid)}] ") + f"{escape(info['message'])} "
            f"(+{info['added']} / -{info['retracted']} facts)")


@app.command("cherry-pick")
def cherry_pick(rev: str | None = typer.Argument(None, help="Commit whose changes to apply on HEAD."),
                author: str | None = AUTHOR_OPT,
                abort: bool = ABORT_OPT, allow_conflicts: bool = ALLOW_OPT, json_: bool = JSON_OPT) -> None:
    """Apply the changes of REV on HEAD as a new commit."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        if abort:
            return _abort(ledger, "cherry-pick", json_)
        if rev is None:
            from ..errors import UsageError
            raise UsageError("missing REV", "give the commit to cherry-pick, or --abort")
        cid = ledger.cherry_pick(rev, author=author, allow_conflicts=allow_conflicts)
        info = ledger.show(cid)
        branch = ledger.current_branch()
    note_resolved(info["meta"])
    _report("cherry-pick", cid, info, json_, branch)


@app.command()
def merge(branch_: str | None = typer.Argument(None, metavar="BRANCH", help="Branch (or revision) to merge into HEAD."),
          message: str | None = typer.Option(None, "--message", "-m"),
          author: str | None = AUTHOR_OPT,
          no_ff: bool = typer.Option(False, "--no-ff", help="Make a merge commit even when a fast-forward is possible."),
          abort: bool = ABORT_OPT, allow_conflicts: bool = ALLOW_OPT, json_: bool = JSON_OPT) -> None:
    """Merge another branch into the current one."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        if abort:
            return _abort(ledger, "merge", json_)
        if branch_ is None:
            from ..errors import UsageError
            raise UsageError("missing BRANCH", "give the branch to merge, or --abort")
        res = ledger.merge(branch_, author=author, message=message, no_ff=no_ff, allow_conflicts=allow_conflicts)
        info = ledger.show(res["head"])
        current = ledger.current_branch()
    resolved = info["meta"].get("resolved", []) if res["result"] == "merge" else []
    note_resolved({"resolved": resolved})
    if json_:
        emit_json("merge", {**res, "resolved": resolved})
    elif res["result"] == "up-to-date":
        say("Already up to date")
    elif res["result"] == "fast-forward":
        say(f"Fast-forward to {short(res['head'])} (+{res['added']} / -{res['retracted']} facts)")
    else:
        say(escape(f"[{current or 'detached'} {short(res['head'])}] ") + f"{escape(info['message'])} "
            f"(+{res['added']} / -{res['retracted']} facts)")


@app.command()
def replay(base: str | None = typer.Argument(None, help="Keep commits up to BASE; rewrite those after it (default: all)."),
           author: str | None = typer.Option(None, "--author", help="Author of the new commits (default: the originals')."),
           workers: int | None = WORKERS_OPT, ray: str | None = RAY_OPT,
           json_: bool = JSON_OPT) -> None:
    """Measure the constraints of HEAD's commits after BASE afresh on their new parents, as new
    commits (like `git rebase`), and move the branch to them."""
    want_json(json_)
    scale_out(workers, ray)
    with open_ledger(write=True) as ledger, progress_bar() as progress:
        res = ledger.replay(base, author=author, progress=progress)
    if json_:
        emit_json("replay", res)
    else:
        say(f"Replayed {res['replayed']} commit(s); HEAD is now {short(res['head'])}")
