"""Commits: every path that writes a commit, as functions of the Ledger facade.

- `commit`: the staged facts, measured against apply(HEAD) on a model ledger (sequential editing),
  remembered decisions replayed before and after measuring, contradictions refused;
- `replay`: commits measured afresh on their new parents, like `git rebase`;
- `revert`, `cherry_pick`, `merge`: ops computed from the history, committed, or stopped as a
  pending operation when they bring contradictions;
- `commit_decisions`: the commit that carries `resolve`'s decisions.

Each takes the ledger first and reads its parts (store, history, decisions, settings); each
change to the ledger is one store transaction (joined by an outer one when there is one), so a
failed command leaves the ledger as it was. Measuring goes through `kledger.model_side.measure`,
looking for conflicts through `Decisions`; no function here calls back into the facade.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Iterable

from . import model_side
from .conflicts import Conflict
from .decisions import ProposedFacts, describe
from .errors import ConflictError, StateError, UsageError
from .history import apply_ops
from .records import OP_ADD, OP_RETRACT, Commit, Op, check_text, short

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Ledger

_PENDING_HINT = "finish it with `kledger resolve`, or abandon it with --abort"


def require_no_pending(lg: "Ledger") -> None:
    pending = lg.store.pending()
    if pending:
        raise StateError(f"a {pending['kind']} is in progress", _PENDING_HINT)


def require_head(lg: "Ledger", what: str) -> str:
    """HEAD's commit, refused while an operation is stopped or before the first commit."""
    require_no_pending(lg)
    head = lg.history.head()
    if head is None:
        raise StateError(f"cannot {what}: HEAD has no commits yet", "commit something first")
    return head


def _check_message(message: str, author: str | None) -> None:
    if not isinstance(message, str) or not message.strip():
        raise UsageError("empty commit message", "give -m MESSAGE")
    check_text(message, "the commit message")
    check_text(author, "the author (--author or $KLEDGER_AUTHOR)", optional=True)


def new_commit(lg: "Ledger", parents: list[str], ops: list[Op], message: str, author: str | None,
               meta: dict | None = None, allow_conflicts: bool = False,
               constraints: str | None = None, found: list[Conflict] | None = None) -> str:
    """Write a commit on HEAD's branch (or detached HEAD) in the current transaction, after
    replaying remembered decisions; refuse unresolved conflicts (ConflictError) unless allowed.
    `found`: the conflicts left after the decisions were replayed on these ops, when the caller
    has just looked (so they are not looked for again)."""
    _check_message(message, author)
    if found is None:
        added = [o.fact_id for o in ops if o.op == OP_ADD]
        found = lg.decisions.conflicts_after(parents[0] if parents else None, ops, added)
        if found is None:  # soft conflicts on: every fact in force takes part
            found = lg.decisions.conflicts_in(apply_ops(lg.history.state(parents[0]) if parents else {}, ops),
                                              involving=added)
        if found:  # replay remembered decisions (rerere) before refusing
            base = lg.history.state(parents[0]) if parents else {}
            ops, found, replayed = lg.decisions.replay(base, ops, added)
            meta = _with_resolved(meta, replayed)
    if found and not allow_conflicts:
        refuse(lg, found)
    if found:
        meta = {**(meta or {}), "open_conflicts": [c.key for c in found]}
    author = check_text(author or lg.env.default_author(), "the author (--author or $KLEDGER_AUTHOR)")
    commit = Commit(parents=tuple(parents), ops=tuple(ops), message=message.strip(), author=author.strip(),
                    timestamp=lg.env.now(),
                    meta=meta or {}, constraints=constraints)
    cid = lg.store.put_commit(commit)
    record_derived(lg, cid)
    move_head(lg, cid)
    return cid


def record_derived(lg: "Ledger", cid: str) -> None:
    """What is recorded with a new commit, derived from it and its parent: the number of facts in
    force and the conflict candidates (kledger.store.sql.DERIVED)."""
    lg.history.record_count(cid)
    lg.decisions.record_candidates(cid)


def refuse(lg: "Ledger", found: list[Conflict]) -> None:
    """The ConflictError for unresolved conflicts `found` (nothing has been written)."""
    raise ConflictError(
        f"{len(found)} unresolved conflict(s): {describe(found[0], lg.store.facts(found[0].fact_ids))}",
        "run `kledger conflicts` and `kledger resolve`, or pass --allow-conflicts to record them as open",
        conflicts=found)


def move_head(lg: "Ledger", cid: str) -> None:
    branch = lg.history.current_branch()
    if branch is not None:
        lg.store.set_ref(branch, cid)
    else:
        lg.store.set_head(cid)
    lg.history.changed()


def commit(lg: "Ledger", message: str, author: str | None = None, allow_conflicts: bool = False,
           compute: bool | None = None, progress=None, meta: dict | None = None,
           measure_without: Iterable[str] = ()) -> str:
    """Commit the staged changes. On a ledger with a model (the default), conflicts (soft ones
    from the added facts' first-layer keys) are looked for and refused before anything else is
    measured; then the constraints of the added facts are measured against apply(HEAD)
    (sequential editing) and stored
    with the commit, in the same transaction; `compute=False` records facts only. With
    `measure_without`, they are measured against apply(HEAD) without those facts' constraints
    (`resolve` re-measuring kept facts as if the losers had never been made).

    On a store opened for reading, everything up to the write (measuring included) holds only
    the shared lock, so other commands read meanwhile; the store is then reopened for writing
    (`Store.upgrade`) and the commit refused if the staged facts, HEAD or a pending operation
    changed in between."""
    require_no_pending(lg)
    staged = lg.store.staged()
    if not staged:
        raise StateError("nothing staged to commit", "stage facts with `kledger add` first")
    _check_message(message, author)
    head = lg.history.head()
    ops, digest, rows, found = staged, None, [], None
    if compute if compute is not None else lg.has_model:
        ops, digest, rows, meta, found = _measure_staged(lg, head, staged, meta, progress, measure_without,
                                                         allow_conflicts)
    if lg.store.read_only:
        lg.store.upgrade()
        lg.history.changed()
    with lg.store.transaction():
        if lg.store.staged() != staged or lg.history.head() != head or lg.store.pending():
            raise StateError("the staged facts or HEAD changed while the commit was computed", "run it again")
        cid = new_commit(lg, [head] if head else [], ops, message, author, allow_conflicts=allow_conflicts,
                         constraints=digest, meta=meta, found=found)
        model_side.store_constraints(lg, cid, rows)
        lg.store.clear_staged()
        lg.env.fault_point("commit")
    return cid


def _measure_staged(lg: "Ledger", head: str | None, ops: list[Op], meta: dict | None, progress,
                    exclude: Iterable[str], allow_conflicts: bool
                    ) -> tuple[list[Op], str | None, list, dict | None, list[Conflict]]:
    """Conflicts first, then measuring. The added facts' first-layer keys (one short forward
    pass; they depend on no edit) let soft conflicts be found with the hard ones; remembered
    decisions are replayed, so a staged fact that loses to one is not measured; conflicts left
    are refused here, before any value optimisation, unless allowed. Returns (ops, constraints
    hash, constraints, meta, the conflicts left among the facts added)."""
    base = lg.history.state(head)
    adds = [o.fact_id for o in ops if o.op == OP_ADD]
    keys = model_side.first_keys(lg, list(lg.store.facts(adds).values()))
    with lg.decisions.new_keys(keys):
        ops, found, replayed = lg.decisions.replay(base, ops, adds)
        if found and not allow_conflicts:
            refuse(lg, found)
        kept = [o.fact_id for o in ops if o.op == OP_ADD]
        collisions = lg.decisions.collisions_in(apply_ops(base, ops), involving=kept)
    added = lg.store.facts(kept)
    probed: dict = {}
    probes = _collision_probes(lg, collisions, set(kept))
    own = [(added[f].prompt, added[f].target) for f in kept]
    digest, rows = model_side.measure(lg, head, [added[f] for f in kept], exclude=exclude, progress=progress,
                                      probe=probes + own, probed=probed)
    meta = _with_resolved(meta, replayed)
    if collisions:
        meta = {**(meta or {}), "collisions": _with_effect(collisions, probed)}
    if rows:
        meta = {**(meta or {}), **_landed(kept, added, (probed.get("after") or [])[len(probes):])}
    return ops, digest, rows, meta, found


def _landed(kept: list[str], added: dict, after: list[float]) -> dict:
    """meta of a measured commit: "landed", each new fact's P̄(object | its own prompt) with the
    commit solved in; "weak", those below model_side.WEAK_BELOW, with their prompt and object
    (`commit` names them: the edit did not take)."""
    if len(after) != len(kept):
        return {}
    below = model_side.WEAK_BELOW
    landed = {f: round(p, 4) for f, p in zip(kept, after)}
    weak = [model_side.weak_entry(added[f], landed[f]) for f in kept if landed[f] < below]
    return {"landed": landed, **({"weak": weak, "weak_below": below} if weak else {})}


def _collision_probes(lg: "Ledger", collisions: list[dict], new: set[str]) -> list[tuple[str, str]]:
    """Per collision, on the other fact's prompt: its own object, then the new fact's object."""
    facts = lg.store.facts({f for c in collisions for f in c["fact_ids"]})
    probes = []
    for c in collisions:
        a, b = c["fact_ids"] if c["fact_ids"][0] in new else c["fact_ids"][::-1]
        probes += [(facts[b].prompt, facts[b].target), (facts[b].prompt, facts[a].target)]
    return probes


def _with_effect(collisions: list[dict], probed: dict) -> list[dict]:
    """Each collision with its measured effect: on the other fact's prompt, the probability of its
    own object and of the new fact's object, before and after this commit."""
    before, after = probed.get("before") or [], probed.get("after") or []
    out = []
    for i, c in enumerate(collisions):
        effect = None
        if len(after) >= 2 * i + 2:
            effect = {"p_own_before": round(before[2 * i], 4), "p_own_after": round(after[2 * i], 4),
                      "p_new_before": round(before[2 * i + 1], 4), "p_new_after": round(after[2 * i + 1], 4)}
        out.append({**c, "effect": effect})
    return out


def replay(lg: "Ledger", base: str | None = None, author: str | None = None, progress=None) -> dict:
    """Rewrite the commits after `base` on HEAD's first-parent chain (all of them without
    `base`) as new commits whose added facts are measured afresh against apply(new parent),
    as `git rebase` rewrites commits; then move HEAD's branch to the new tip. A merge becomes
    an ordinary commit with the same changes (its second parent is not kept). The old commits
    stay, reachable by id."""
    todo, parent = _replay_todo(lg, base)
    commits = lg.store.commits(todo)
    mapping = {}
    with lg.store.transaction():
        for i, cid in enumerate(todo):
            if progress is not None:
                progress("replay", i, len(todo))
            c = commits[cid]
            meta = {k: v for k, v in c.meta.items() if k not in ("merged", "merge_base")}
            new = Commit(parents=(parent,) if parent else (), ops=c.ops, message=c.message,
                         author=author or c.author, timestamp=lg.env.now(), meta={**meta, "replayed_from": cid})
            parent = mapping[cid] = put_measured(lg, new, progress)
        move_head(lg, parent)
    if progress is not None:
        progress("replay", len(todo), len(todo))
    return {"replayed": len(todo), "head": parent, "mapping": mapping}


def _replay_todo(lg: "Ledger", base: str | None) -> tuple[list[str], str | None]:
    """(commits to replay, oldest first; the parent of the first)."""
    head = require_head(lg, "replay")
    if not lg.has_model:
        raise StateError("this ledger has no model, so there is nothing to measure",
                         "replay is for ledgers made with a model")
    chain = list(reversed(lg.history.first_parent_chain(head)))
    start, parent = 0, None
    if base is not None:
        parent = lg.history.resolve(base)
        if parent not in chain:
            raise UsageError(f"{short(parent)} is not on HEAD's first-parent history",
                             "give a commit that `kledger log --oneline` lists")
        start = chain.index(parent) + 1
    if not chain[start:]:
        raise StateError("nothing to replay after that commit", "give an older base")
    return chain[start:], parent


def put_measured(lg: "Ledger", commit: Commit, progress=None, skip_known: bool = False, measure: bool = True) -> str:
    """Store `commit` with its added facts measured against apply(its first parent) (unless not
    `measure`: `init --from --no-measure`), in the current transaction (its facts are stored
    already); the new commit id."""
    lg.history.changed()
    digest, rows = None, []
    if measure:
        added = lg.store.facts(o.fact_id for o in commit.ops if o.op == OP_ADD)
        parent = commit.parents[0] if commit.parents else None
        digest, rows = model_side.measure(lg, parent, [added[o.fact_id] for o in commit.ops if o.op == OP_ADD],
                                          progress=progress, skip_known=skip_known)
    cid = lg.store.put_commit(replace(commit, constraints=digest))
    record_derived(lg, cid)
    model_side.store_constraints(lg, cid, rows)
    return cid


def revert(lg: "Ledger", rev: str, author: str | None = None, message: str | None = None,
           allow_conflicts: bool = False) -> str:
    cid = lg.history.resolve(rev)
    head = require_head(lg, "revert")
    added, removed = lg.history.delta(cid)
    now = lg.history.state_of(head, added | removed)
    ops = [Op(OP_RETRACT, i) for i in sorted(added) if i in now]
    ops += [Op(OP_ADD, i) for i in sorted(removed) if i not in now]
    if not ops:
        raise StateError(f"reverting {short(cid)} changes nothing at HEAD", "its facts are already gone")
    c = lg.store.commit(cid)
    body = {"theirs": cid, "head": head, "ops": [o.to_list() for o in ops],
            "message": message or f'Revert "{c.message}"', "author": author, "meta": {"reverts": cid}}
    return _finish_or_stop(lg, "revert", [head], body, allow_conflicts)


def cherry_pick(lg: "Ledger", rev: str, author: str | None = None, allow_conflicts: bool = False) -> str:
    cid = lg.history.resolve(rev)
    head = require_head(lg, "cherry-pick")
    added, removed = lg.history.delta(cid)
    now = lg.history.state_of(head, added | removed)
    ops = [Op(OP_ADD, i) for i in sorted(added) if i not in now]
    ops += [Op(OP_RETRACT, i) for i in sorted(removed) if i in now]
    if not ops:
        raise StateError(f"cherry-picking {short(cid)} changes nothing at HEAD", "its facts are already in force")
    c = lg.store.commit(cid)
    body = {"theirs": cid, "head": head, "ops": [o.to_list() for o in ops], "message": c.message,
            "author": author or c.author, "meta": {"cherry_picked_from": cid}}
    return _finish_or_stop(lg, "cherry-pick", [head], body, allow_conflicts)


def merge(lg: "Ledger", branch: str, author: str | None = None, message: str | None = None,
          no_ff: bool = False, allow_conflicts: bool = False) -> dict:
    theirs = lg.history.resolve(branch)
    head = require_head(lg, "merge")
    h = lg.history
    if theirs in h.ancestors(head):
        return {"result": "up-to-date", "head": head, **h.change_counts(head, head)}
    base = h.merge_base(head, theirs)
    if base == head and not no_ff:
        with lg.store.transaction():
            move_head(lg, theirs)
        return {"result": "fast-forward", "head": theirs, **h.change_counts(head, theirs)}
    base_ids, their_ids, our_ids = set(lg.history.state(base)), set(lg.history.state(theirs)), set(lg.history.state(head))
    ops = [Op(OP_ADD, i) for i in sorted(their_ids - base_ids) if i not in our_ids]
    ops += [Op(OP_RETRACT, i) for i in sorted(base_ids - their_ids) if i in our_ids]
    body = {"theirs": theirs, "theirs_name": branch, "head": head, "ops": [o.to_list() for o in ops],
            "message": message or f"Merge {branch!r} into {lg.history.current_branch() or short(head)}",
            "author": author, "meta": {"merged": theirs, "merge_base": base}}
    cid = _finish_or_stop(lg, "merge", [head, theirs], body, allow_conflicts)
    return {"result": "merge", "head": cid, **h.change_counts(head, cid)}


def _finish_or_stop(lg: "Ledger", kind: str, parents: list[str], body: dict, allow_conflicts: bool) -> str:
    """Commit a merge or cherry-pick, or — when it would bring contradictions — record it as
    pending with its conflicts and raise ConflictError (exit code 3). Nothing else changes."""
    ops = [Op(o, f) for o, f in body["ops"]]
    try:
        with lg.store.transaction():
            return new_commit(lg, parents, ops, body["message"], body.get("author"), meta=body["meta"],
                              allow_conflicts=allow_conflicts)
    except ConflictError as exc:
        body = {**body, "parents": parents, "conflicts": [c.key for c in exc.conflicts]}
        with lg.store.transaction():
            lg.store.set_pending(kind, body)
        raise ConflictError(f"{kind} stopped: {exc.message}",
                            f"run `kledger conflicts` and `kledger resolve`, or `kledger {kind} --abort`",
                            conflicts=exc.conflicts) from None


def commit_decisions(lg: "Ledger", pf: ProposedFacts, ops: list[Op], decided: list[dict], entries: list[dict],
                     blocking: list[Conflict], message: str | None, author: str | None) -> str | None:
    """The commit that carries `resolve`'s decisions (None while conflicts still block it)."""
    if blocking:
        if pf.pending is not None:
            body = {k: v for k, v in pf.pending.items() if k != "kind"}
            lg.store.set_pending(pf.kind, {**body, "conflicts": [c.key for c in blocking]})
        return None
    if pf.pending is not None:
        p = pf.pending
        cid = new_commit(lg, pf.parents, ops, message or p["message"], author or p.get("author"),
                         meta={**p["meta"], "resolved": entries})
        lg.store.set_pending(None)
        return cid
    message = message or "Resolve " + "; ".join(
        f"{d['subject']} · {d['relation']}: keep {', '.join(d['keep'])}" for d in decided)
    lg.store.clear_staged()
    dropped = {f for d in decided for f in d["dropped"]} | {f for e in entries for f in e["dropped"]}
    stale = lg.decisions.measured_with(pf.base, {f for d in decided for f in d["kept"]}, dropped)
    if stale:  # kept facts measured on top of the losers: measured again without them
        ops = ops + [Op(OP_ADD, f) for f in sorted(stale)]
    if not ops:  # only staged facts lost: the commit records the decision
        return new_commit(lg, pf.parents, ops, message, author, meta={"resolved": entries})
    lg.store.stage(ops)  # the staging area with the decisions applied, committed as `commit` does
    return commit(lg, message, author, meta={"resolved": entries, **(
        {"remeasured": sorted(stale)} if stale else {})}, measure_without=dropped | stale)


def _with_resolved(meta: dict | None, entries: list[dict]) -> dict | None:
    """`meta` with `entries` appended to its `resolved` list (unchanged when there are none)."""
    if not entries:
        return meta
    return {**(meta or {}), "resolved": [*(meta or {}).get("resolved", []), *entries]}
