"""Integrity: `fsck` re-derives every content hash and checks every reference."""

from __future__ import annotations

from .errors import KledgerError
from .history import History
from .records import commit_id, constraints_hash, fact_id, short
from .store import Store


def fsck(store: Store, history: History) -> dict:
    """{"ok", "facts", "commits", "problems"}: facts and commits re-hashed against their ids,
    stored constraints against their commit's constraints hash, parents, ops, branches and HEAD
    against the commits and facts there are."""
    problems: list[str] = []
    n_facts = 0
    for stored_id, fact in store.fact_rows():
        n_facts += 1
        if fact_id(fact.to_dict()) != stored_id:
            problems.append(f"fact {short(stored_id)}: content does not match its id")
    g = history.graph()
    commits = store.commits(list(g))
    for cid, c in commits.items():
        if commit_id(c.payload()) != cid:
            problems.append(f"commit {short(cid)}: content does not match its id")
        problems += [f"commit {short(cid)}: parent {short(p)} is missing" for p in c.parents if p not in g]
    problems += _constraint_problems(store, commits)
    for cid, fid in store.dangling_ops():
        problems.append(f"commit {short(cid)}: fact {short(fid)} is missing")
    for name, cid in store.refs().items():
        if cid not in g:
            problems.append(f"branch {name}: points at missing commit {short(cid)}")
    head = store.head()
    if not head.startswith("ref: ") and head not in g:
        problems.append(f"HEAD points at missing commit {short(head)}")
    return {"ok": not problems, "facts": n_facts, "commits": len(commits), "problems": problems}


def _constraint_problems(store: Store, commits: dict) -> list[str]:
    """Each commit's stored constraints against the constraints hash it records. All are read in
    one query; when a row cannot even be decoded, commit by commit, to name the damaged ones."""
    try:
        measured: dict[str, list] = {}
        for con in store.constraints(list(commits)):
            measured.setdefault(con.commit_id, []).append(con)
        hashes = {cid: constraints_hash(measured.get(cid, ())) for cid in commits}
    except KledgerError:
        hashes = {}
        for cid in commits:
            try:
                hashes[cid] = constraints_hash(store.constraints([cid]))
            except KledgerError as exc:
                hashes[cid] = exc
    out = []
    for cid, c in commits.items():
        if isinstance(hashes[cid], KledgerError):
            out.append(f"commit {short(cid)}: stored constraints cannot be read ({hashes[cid].message})")
        elif (c.constraints or None) != hashes[cid]:
            out.append(f"commit {short(cid)}: stored constraints do not match its constraints hash")
    return out
