"""Integrity: `fsck` re-derives every content hash and checks every reference."""

from __future__ import annotations

import json

from .errors import KledgerError
from .history import History, check_branch_name
from .records import commit_id, constraints_hash, fact_id, normalize, relation_key, sha256_hex, short
from .store import Store


def fsck(store: Store, history: History) -> dict:
    """{"ok", "facts", "commits", "problems"}. Every stored field is covered by a hash or
    re-derived and compared: facts re-hashed against their ids and their matching keys
    re-derived; commits re-hashed, their parents present, their order topological and acyclic;
    stored constraints against their commit's constraints hash; C0 against its checksum; ops,
    staged ops, branches and HEAD against the facts and commits there are."""
    problems, n_facts = _fact_problems(store)
    g = history.graph()
    commits = dict(store.commit_payloads())
    order = store.commit_order()
    for cid, c in commits.items():
        if commit_id(c) != cid:
            problems.append(f"commit {short(cid)}: content does not match its id")
        for p in c["parents"]:
            if p not in g:
                problems.append(f"commit {short(cid)}: parent {short(p)} is missing")
            elif order[p] >= order[cid]:
                problems.append(f"commit {short(cid)}: stored before its parent {short(p)} (order or cycle damaged)")
    problems += _constraint_problems(store, commits)
    problems += store.stats_problems()
    problems += [f"commit {short(cid)}: fact {short(fid)} is missing" for cid, fid in store.dangling_ops()]
    problems += [f"staged fact {short(fid)} is missing" for fid in store.dangling_staged()]
    problems += _ref_problems(store, g)
    problems += _count_problems(store, history, g)
    in_force = None
    if not problems:  # counted only on a sound ledger (the count walks the history)
        in_force = history.count_in_force(history.head())
    return {"ok": not problems, "facts": n_facts, "facts_in_force": in_force, "commits": len(commits),
            "problems": problems}


def _fact_problems(store: Store) -> tuple[list[str], int]:
    """Facts re-hashed against their ids, and their stored matching keys re-derived. In bulk: the
    content is written out as JSON by DuckDB and hashed here, and only a fact whose text does not
    hash to its id is checked again from the fact itself (`Store.fact_hashes`); the matching keys
    are derived once per distinct subject, relation and object."""
    n, suspects, problems, bad = 0, [], [], set()
    for stored_id, text, extra in store.fact_hashes():
        n += 1
        if extra != "{}":  # what every command will parse, with Python's stricter reader
            try:
                json.loads(extra)
            except ValueError:
                problems.append(f"fact {short(stored_id)}: its stored extra fields are not valid JSON")
                bad.add(stored_id)
                continue
        if sha256_hex("fact\0" + text) != stored_id:
            suspects.append(stored_id)
    for stored_id, fact, _ in store.fact_rows(suspects) if suspects else ():
        if fact_id(fact.to_dict()) != stored_id:
            problems.append(f"fact {short(stored_id)}: content does not match its id")
            bad.add(stored_id)
    derive = {"subject": normalize, "relation": relation_key, "target": normalize}
    wrong = set()
    for column, text, key in store.key_pairs():
        if derive[column](text) != key:
            wrong.update(f for f in store.facts_with_key(column, text, key) if f not in bad)
    problems += [f"fact {short(f)}: its stored matching keys do not match its content" for f in sorted(wrong)]
    return problems, n


def _count_problems(store: Store, history: History, g: dict) -> list[str]:
    """What is recorded per commit at HEAD and at each branch tip against the same computed over
    the whole chain: the number of facts in force (`status` starts from it) and the conflict
    candidates under the rules in force (`check` starts from them; a commit's record is built on
    its parent's, so a damaged record would hide a contradiction from every later check)."""
    tips = {c for c in store.refs().values() if c in g}
    head = store.head()
    tips |= {head} if head in g else set()
    counts, rules, out = store.counts_in(sorted(tips)), store.rules_digest(), []
    for c in sorted(tips):
        kept = store.candidates_recorded(c, rules)
        if c not in counts and kept is None:
            continue
        n, candidates = store.conflict_candidates_at(history.first_parent_chain(c))  # one pass over the chain
        if c in counts and counts[c] != n:
            out.append(f"commit {short(c)}: recorded {counts[c]} facts in force, but {n} are")
        if kept is not None and set(kept) != set(candidates):
            out.append(f"commit {short(c)}: its recorded contradiction candidates do not match its facts")
    return out


def _ref_problems(store: Store, g: dict) -> list[str]:
    refs, log = store.refs(), store.ref_log()
    problems = [f"branch {name}: points at missing commit {short(cid)}" for name, cid in refs.items() if cid not in g]
    for name in sorted(set(refs) | set(log)):
        if refs.get(name) != log.get(name):
            problems.append(f"branch {name}: moved outside kledger (recorded at {short(log.get(name) or '(none)')}, "
                            f"now at {short(refs.get(name) or '(none)')})")
    head = store.head()
    if head.startswith("ref: "):
        name = head[5:]
        try:  # (a branch that does not exist yet is an unborn branch, as in git: no problem)
            check_branch_name(name)
        except KledgerError:
            problems.append(f"HEAD names {name!r}, which is not a valid branch name")
    elif head not in g:
        problems.append(f"HEAD points at missing commit {short(head)}")
    return problems


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
        elif (c["constraints"] or None) != hashes[cid]:
            out.append(f"commit {short(cid)}: stored constraints do not match its constraints hash")
    return out
