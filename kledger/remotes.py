"""Remotes: clone, fetch, push and pull a ledger with its measured constraints (no re-measuring).

A remote is a location holding immutable, content-addressed packs (kledger.store.packs) and one
small refs document: a directory or an object store (kledger.remote_kinds). Its layout:

    URL/kledger-remote.json      {"format": "kledger-remote/1"}
    URL/packs/<pack id>/         manifest.json and six Parquet files (never changed once there)
    URL/refs/<version>.json      the refs document, version 1, 2, ...: the newest is current

The refs document: {"format", "branches": {name: commit}, "head": branch, "packs": [pack ids,
oldest first], "stats": [[model fp, corpus fp]] (the C0 the packs hold), "setup": {model,
hyper-parameters, corpus, defaults version, relations, soft threshold}}. Every commit a branch
names is in the packs with all its ancestors, because a push writes its pack before the refs.

A push writes its pack completely, then creates `refs/<version + 1>.json` only if it does not
exist (a hard link, or a conditional write): compare-and-swap, so of two pushes at once one wins
and the other is told to pull. A push killed before that leaves only an unreferenced pack. A fetch copies
the packs it lacks into a temporary folder, checks every object (`read_pack`) and writes them all
in one transaction, then moves the remote-tracking refs (`origin/main`, kept in the ledger's meta
`remote_refs`). The remotes themselves are kept in meta `remotes`, the packs already here in
`remote_packs`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StateError, UsageError
from .history import TRACKING_KEY, check_branch_name
from .remote_kinds import REFS_FORMAT, DirRemote, FsRemote, open_remote  # noqa: F401  (re-exported)
from .store.packs import import_pack, read_pack, write_pack

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Ledger

REMOTES_KEY, PACKS_KEY = "remotes", "remote_packs"
SETUP_KEYS = ("model", "hparams", "corpus", "defaults_version")  # what a fingerprint depends on
PULL_HINT = "run `kledger pull` (or `kledger fetch` and merge), then push again; --force replaces the remote branch"


# ------------------------------------------------------------------ the ledger's remotes
def _meta(lg: "Ledger", key: str) -> Any:
    try:
        return json.loads(lg.store.meta(key) or "{}")
    except ValueError:
        return {}


def remotes(lg: "Ledger") -> dict[str, str]:
    return dict(_meta(lg, REMOTES_KEY))


def _track(lg: "Ledger", name: str, branches: dict[str, str] | None = None,
           moved: dict[str, str] | None = None) -> None:
    """Remote `name`'s tracking refs (meta TRACKING_KEY, read by History.tracking): all replaced
    by `branches`, or only those in `moved` moved; with neither, dropped. In the caller's transaction."""
    refs = _meta(lg, TRACKING_KEY)
    if branches is not None:
        refs[name] = dict(branches)
    elif moved:
        refs.setdefault(name, {}).update(moved)
    else:
        refs.pop(name, None)
    lg.store.set_meta(TRACKING_KEY, json.dumps(refs, sort_keys=True))


def _remote(lg: "Ledger", name: str | None) -> tuple[str, Any]:
    known = remotes(lg)
    name = name or ("origin" if "origin" in known else next(iter(known), None))
    if name is None:
        raise UsageError("this ledger has no remote", "add one with `kledger remote add origin URL`")
    if name not in known:
        raise UsageError(f"no remote named {name!r}", "see `kledger remote list`")
    return name, open_remote(known[name])


def add_remote(lg: "Ledger", name: str, url: str) -> dict:
    check_branch_name(name)
    if "/" in name:
        raise UsageError(f"{name!r} is not a valid remote name: it contains '/'", "use a name like origin")
    open_remote(url)
    with lg.store.transaction():
        known = remotes(lg)
        if name in known:
            raise StateError(f"remote {name!r} already exists ({known[name]})", "remove it first, or choose another name")
        lg.store.set_meta(REMOTES_KEY, json.dumps({**known, name: url}, sort_keys=True))
    return {"name": name, "url": url}


def remove_remote(lg: "Ledger", name: str) -> dict:
    with lg.store.transaction():
        known = remotes(lg)
        if name not in known:
            raise UsageError(f"no remote named {name!r}", "see `kledger remote list`")
        url = known.pop(name)
        lg.store.set_meta(REMOTES_KEY, json.dumps(known, sort_keys=True))
        _track(lg, name)
    return {"name": name, "url": url}


def setup(lg: "Ledger") -> dict:
    """What a clone needs to measure and solve as this ledger does, and its conflict rules."""
    s = {k: lg.store.meta(k) for k in SETUP_KEYS}
    s["relations"] = lg.store.relations()
    s["soft_threshold"] = lg.store.meta("soft_threshold")
    return s


# ------------------------------------------------------------------ fetch
def fetch(lg: "Ledger", name: str | None = None) -> dict:
    """Bring the packs of remote `name` that are not here, checked, and move its tracking refs."""
    name, remote = _remote(lg, name)
    _, doc = remote.read_refs()
    doc = doc or {"branches": {}, "packs": []}
    got = _fetch_packs(lg, remote, doc)
    old = {k.split("/", 1)[1]: v for k, v in lg.history.tracking().items() if k.startswith(name + "/")}
    with lg.store.transaction():
        _track(lg, name, doc["branches"])
    moved = {f"{name}/{b}": {"old": old.get(b), "new": c} for b, c in doc["branches"].items() if old.get(b) != c}
    moved.update({f"{name}/{b}": {"old": c, "new": None} for b, c in old.items() if b not in doc["branches"]})
    return {"remote": name, "url": remote.url, **got, "updated": moved}


def _fetch_packs(lg: "Ledger", remote: Any, doc: dict) -> dict:
    have = set(_meta(lg, PACKS_KEY) or [])
    want = [p for p in doc.get("packs") or [] if p not in have]
    commits = nbytes = 0
    with tempfile.TemporaryDirectory(prefix="kledger-fetch-") as tmp:
        packs = []
        for pid in want:  # every pack read and checked before any is written
            d = Path(tmp) / pid
            d.mkdir()
            nbytes += remote.get_pack(pid, d)
            packs.append((pid, d))
        with lg.store.transaction():
            for pid, d in packs:
                commits += import_pack(lg.store, read_pack(lg.store, pid, d))
            lg.store.set_meta(PACKS_KEY, json.dumps(sorted(have | set(want))))
            lg._changed()
    return {"packs": len(want), "bytes": nbytes, "commits": commits}


# ------------------------------------------------------------------ push
def push(lg: "Ledger", name: str | None = None, branch: str | None = None, force: bool = False) -> dict:
    """Send branch `branch` (default: the current one) to remote `name`: its pack of the commits
    the remote lacks, then the refs, fast-forward only unless `force`."""
    name, remote = _remote(lg, name)
    branch = branch or lg.current_branch()
    if branch is None:
        raise StateError("HEAD is detached: no branch to push", "give the branch: kledger push origin BRANCH")
    tip = lg.store.ref(branch)
    if tip is None:
        raise UsageError(f"no branch named {branch!r}", "see `kledger branch`")
    if not remote.exists():
        remote.create()
    version, doc = remote.read_refs()
    mine = setup(lg)
    doc = doc or {"format": REFS_FORMAT, "branches": {}, "head": branch, "packs": [], "stats": [], "setup": mine}
    theirs = doc.get("setup") or {}
    differ = [k for k in SETUP_KEYS if theirs.get(k) != mine.get(k)]
    if differ:
        raise StateError(f"remote {name} holds a ledger of another setup ({', '.join(differ)} differ)",
                         "push to another remote, or clone this one and commit there")
    old = doc["branches"].get(branch)
    if old == tip:
        return {"remote": name, "branch": branch, "old": old, "new": tip, "packs": 0, "bytes": 0, "commits": 0,
                "forced": False}
    g = lg.graph()
    fast_forward = old is None or (old in g and old in lg.history.ancestors(tip))
    if not fast_forward and not force:
        raise StateError(f"push of {branch} to {name} rejected: the remote branch has commits this one lacks "
                         f"(non-fast-forward)", PULL_HINT)
    held: set[str] = set()
    for c in doc["branches"].values():
        if c in g:
            held |= lg.history.ancestors(c)
    new = [c for c in sorted(lg.history.ancestors(tip) - held, key=lg.store.commit_order().get)]
    pack_id, nbytes, stats = None, 0, [tuple(s) for s in doc.get("stats") or []]
    if new:
        with tempfile.TemporaryDirectory(prefix="kledger-push-") as tmp:
            pack_id, manifest = write_pack(lg.store, new, sorted(held), set(stats), Path(tmp))
            nbytes = remote.put_pack(pack_id, Path(tmp), between=lambda: lg.env.fault_point("push-pack"))
        stats = sorted(set(stats) | {(m, c) for m, c, _, _ in manifest["stats"]})
    lg.env.fault_point("push-refs")
    doc = {**doc, "branches": {**doc["branches"], branch: tip}, "stats": [list(s) for s in stats],
           "packs": list(doc.get("packs") or []) + ([pack_id] if pack_id and pack_id not in doc["packs"] else [])}
    if not remote.swap_refs(version, doc):
        raise StateError(f"push of {branch} to {name} lost a race: the remote changed while pushing", PULL_HINT)
    with lg.store.transaction():
        _track(lg, name, moved={branch: tip})
        if pack_id:
            lg.store.set_meta(PACKS_KEY, json.dumps(sorted(set(_meta(lg, PACKS_KEY) or []) | {pack_id})))
    return {"remote": name, "branch": branch, "old": old, "new": tip, "packs": int(bool(pack_id)), "bytes": nbytes,
            "commits": len(new), "forced": not fast_forward}


# ------------------------------------------------------------------ pull and clone
def pull(lg: "Ledger", name: str | None = None, branch: str | None = None, author: str | None = None,
         allow_conflicts: bool = False) -> dict:
    """fetch, then merge `name/branch` (default: the current branch's name) into HEAD."""
    got = fetch(lg, name)
    branch = branch or lg.current_branch()
    ref = f"{got['remote']}/{branch}"
    cid = lg.history.tracking().get(ref)
    if branch is None or cid is None:
        raise UsageError(f"remote {got['remote']} has no branch {branch!r}", "give one: kledger pull origin BRANCH")
    if lg.head() is None:
        with lg.store.transaction():
            lg.store.set_ref(lg.current_branch(), cid)
            lg._changed()
        return {"fetch": got, "merge": {"result": "fast-forward", "head": cid,
                                        "added": lg.history.count_in_force(cid), "retracted": 0}}
    return {"fetch": got, "merge": lg.merge(ref, author=author, allow_conflicts=allow_conflicts)}


def check_clone_target(url: str, directory: str | None) -> tuple[Any, dict, Path]:
    remote = open_remote(url)
    _, doc = remote.read_refs()
    if doc is None:
        raise StateError(f"remote {url} is empty: nothing to clone", "push to it first")
    target = Path(directory) if directory else Path.cwd() / remote.root.name
    return remote, doc, target.expanduser().resolve()


def source_meta(doc: dict) -> tuple[str | None, dict]:
    """(model, init settings) of a remote's setup."""
    s = doc.get("setup") or {}
    settings: dict = {}
    if s.get("hparams"):
        settings["hparams"] = json.loads(s["hparams"])
    if s.get("corpus"):
        settings["corpus"] = s["corpus"]
    return s.get("model"), settings


def finish_clone(lg: "Ledger", url: str, doc: dict) -> dict:
    """In a new, empty ledger: take the remote's setup, fetch it as `origin` and check out its
    head branch."""
    s = doc.get("setup") or {}
    with lg.store.transaction():
        for k in ("defaults_version", "soft_threshold"):
            if s.get(k) is not None:
                lg.store.set_meta(k, s[k])
        for key, rel in (s.get("relations") or {}).items():
            lg.store.set_relation(key, bool(rel.get("multi")), rel.get("inverse_of"))
    add_remote(lg, "origin", url)
    got = fetch(lg, "origin")
    head = doc.get("head") or next(iter(doc["branches"]), None)
    if head in doc["branches"]:
        with lg.store.transaction():
            lg.store.set_ref(head, doc["branches"][head])
            lg.store.set_head(f"ref: {head}")
            lg._changed()
    return {**got, "branch": head, "head": doc["branches"].get(head)}


def upstream(lg: "Ledger") -> dict | None:
    """The current branch against its remote-tracking ref of the same name (origin first):
    {"ref", "ahead", "behind"}; None when there is none."""
    branch = lg.current_branch()
    refs = lg.history.tracking()
    names = sorted({r.split("/", 1)[0] for r in refs}, key=lambda n: (n != "origin", n))
    ref = next((f"{n}/{branch}" for n in names if f"{n}/{branch}" in refs), None)
    if branch is None or ref is None:
        return None
    mine, theirs = lg.head(), refs[ref]
    a = lg.history.ancestors(mine) if mine else set()
    b = lg.history.ancestors(theirs)
    return {"ref": ref, "commit": theirs, "ahead": len(a - b), "behind": len(b - a)}

