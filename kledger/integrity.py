"""Integrity: `fsck` re-derives every content hash and checks every reference."""

from __future__ import annotations

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
    measured: dict[str, list] = {}
    for con in store.constraints(list(g)):
        measured.setdefault(con.commit_id, []).append(con)
    for cid, c in commits.items():
        if (c.constraints or None) != constraints_hash(measured.get(cid, ())):
            problems.append(f"commit {short(cid)}: stored constraints do not match its constraints hash")
    for cid, fid in store.dangling_ops():
        problems.append(f"commit {short(cid)}: fact {short(fid)} is missing")
    for name, cid in store.refs().items():
        if cid not in g:
            problems.append(f"branch {name}: points at missing commit {short(cid)}")
    head = store.head()
    if not head.startswith("ref: ") and head not in g:
        problems.append(f"HEAD points at missing commit {short(head)}")
    return {"ok": not problems, "facts": n_facts, "commits": len(commits), "problems": problems}
