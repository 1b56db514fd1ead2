"""remote, clone, fetch, push, pull: sharing a ledger, its measured constraints and C0 included,
through a remote (kledger.remotes; docs/remotes.md). JSON (docs/json.md): `remote` →
{remotes: [{name, url}]}; `clone` → {path, url, branch, head, packs, bytes, commits}; `fetch` →
{remote, url, packs, bytes, commits, updated}; `push` → {remote, branch, old, new, packs, bytes,
commits, forced}; `pull` → {fetch, merge}."""

from __future__ import annotations

import typer

from .app import ALLOW_OPT, AUTHOR_OPT, JSON_OPT, app, open_ledger, want_json
from .app import settings as env
from .output import emit_json, escape, say, short


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _fetched(res: dict) -> None:
    say(f"Fetched {res['packs']} pack(s), {_size(res['bytes'])}, {res['commits']} new commit(s) from "
        f"{escape(res['remote'])}")
    for ref, v in res["updated"].items():
        say(f"  {escape(ref)}: {short(v['old']) if v['old'] else '(new)'} -> {short(v['new']) if v['new'] else '(gone)'}")


@app.command()
def remote(action: str = typer.Argument("list", metavar="ACTION", help="list, add or remove."),
           name: str | None = typer.Argument(None, help="The remote's name, e.g. origin."),
           url: str | None = typer.Argument(None, help="With add: a directory path (or file://PATH)."),
           json_: bool = JSON_OPT) -> None:
    """Name the remotes this ledger fetches from and pushes to: `remote list`, `remote add NAME URL`,
    `remote remove NAME`."""
    from ..errors import UsageError

    want_json(json_)
    if action == "list":
        if name is not None:
            raise UsageError("`remote list` takes no other argument", "run `kledger remote list`")
        with open_ledger() as ledger:
            rows = [{"name": n, "url": u} for n, u in sorted(ledger.remotes().items())]
    elif action == "add":
        if name is None or url is None:
            raise UsageError("`remote add` takes NAME and URL", "e.g. kledger remote add origin /mnt/shared/facts")
        with open_ledger(write=True) as ledger:
            rows = [ledger.add_remote(name, url)]
    elif action in ("remove", "rm"):
        if name is None or url is not None:
            raise UsageError("`remote remove` takes NAME", "e.g. kledger remote remove origin")
        with open_ledger(write=True) as ledger:
            rows = [ledger.remove_remote(name)]
    else:
        raise UsageError(f"unknown remote action {action!r}", "use list, add or remove")
    if json_:
        emit_json("remote", {"remotes": rows})
    elif action == "list":
        for r in rows:
            say(f"{escape(r['name'])}\t{escape(r['url'])}")
    else:
        say(f"{'Added' if action == 'add' else 'Removed'} remote {escape(rows[0]['name'])} ({escape(rows[0]['url'])})")


@app.command()
def clone(url: str = typer.Argument(..., help="The remote: a directory path (or file://PATH)."),
          directory: str | None = typer.Argument(None, help="Where to make the ledger (default: the remote's "
                                                 "folder name, here)."),
          json_: bool = JSON_OPT) -> None:
    """Make a ledger from a remote: every commit with its measured constraints and C0, nothing
    measured again; the remote becomes `origin` and its head branch is checked out."""
    from ..ledger import Ledger

    want_json(json_)
    ledger, res = Ledger.clone(url, directory, env=env())
    with ledger:
        res = {"path": str(ledger.path), "url": url, **{k: v for k, v in res.items() if k != "updated"}}
    if json_:
        emit_json("clone", res)
    else:
        say(f"Cloned {escape(url)} into {escape(res['path'])}: {res['commits']} commit(s), {_size(res['bytes'])}; "
            f"on branch {escape(str(res['branch']))}")


@app.command()
def fetch(name: str | None = typer.Argument(None, help="The remote (default: origin)."),
          json_: bool = JSON_OPT) -> None:
    """Bring what a remote has and this ledger lacks, every object checked, and move its
    remote-tracking refs (origin/BRANCH). Local branches do not move."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        res = ledger.fetch(name)
    if json_:
        emit_json("fetch", res)
    else:
        _fetched(res)


@app.command()
def push(name: str | None = typer.Argument(None, help="The remote (default: origin)."),
         branch: str | None = typer.Argument(None, help="The branch (default: the current one)."),
         force: bool = typer.Option(False, "--force", "-f", help="Replace the remote branch even when it has "
                                    "commits this one lacks."),
         json_: bool = JSON_OPT) -> None:
    """Send a branch to a remote: the commits it lacks, with their constraints and C0, then the
    branch, fast-forward only unless --force. A directory that does not exist becomes a remote."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        res = ledger.push(name, branch, force)
    if json_:
        emit_json("push", res)
    elif res["old"] == res["new"]:
        say(f"{escape(res['remote'])}/{escape(res['branch'])} is up to date ({short(res['new'])})")
    else:
        say(f"Pushed {escape(res['branch'])} to {escape(res['remote'])}: "
            f"{short(res['old']) if res['old'] else '(new branch)'} -> {short(res['new'])}"
            f"{' (forced)' if res['forced'] else ''}, {res['commits']} commit(s), {_size(res['bytes'])}")


@app.command()
def pull(name: str | None = typer.Argument(None, help="The remote (default: origin)."),
         branch: str | None = typer.Argument(None, help="Its branch (default: the current branch's name)."),
         author: str | None = AUTHOR_OPT,
         allow_conflicts: bool = ALLOW_OPT,
         json_: bool = JSON_OPT) -> None:
    """fetch, then merge the remote's branch into HEAD, with merge's conflict gate (exit 3, then
    `kledger resolve`)."""
    want_json(json_)
    with open_ledger(write=True) as ledger:
        res = ledger.pull(name, branch, author=author, allow_conflicts=allow_conflicts)
    if json_:
        emit_json("pull", res)
        return
    _fetched(res["fetch"])
    m = res["merge"]
    if m["result"] == "up-to-date":
        say("Already up to date")
    else:
        say(f"{'Fast-forward to' if m['result'] == 'fast-forward' else 'Merged into'} {short(m['head'])} "
            f"(+{m['added']} / -{m['retracted']} facts)")
