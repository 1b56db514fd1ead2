"""History: revisions, graph walks, the facts in force, op folding and the read verbs over them.

`History` wraps a `Store` and caches the commit graph and the facts in force per commit until the
ledger changes (`changed()`). It reads only: the writes are the facade's and kledger.commits'.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable

from .errors import IntegrityError, RevisionError, StateError, UsageError
from .records import OP_ADD, Commit, Constraint, Fact, Op, constraints_hash, looks_like_id, short
from .store import Store

TRACKING_KEY = "remote_refs"  # meta: remote → {branch: commit}, kept by kledger.remotes

_BRANCH_RE = re.compile(r"(?!-)(?!.*\.\.)[A-Za-z0-9._/-]+(?<![./])")
_REV_SUFFIX = re.compile(r"^(.*?)((?:[~^]\d*)+)$")


MAX_BRANCH_NAME = 255


def check_branch_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_BRANCH_NAME:
        shown = f"{name[:40]!r}… ({len(name):,} characters)" if isinstance(name, str) else repr(name)
        raise UsageError(f"{shown} is not a valid branch name: longer than {MAX_BRANCH_NAME} characters",
                         f"use a name of at most {MAX_BRANCH_NAME} characters")
    if not _BRANCH_RE.fullmatch(name) or name == "HEAD" or looks_like_id(name) and len(name) >= 40:
        raise UsageError(f"{name!r} is not a valid branch name",
                         "use letters, digits, '.', '_', '-' and '/', not starting with '-'")
    return name


def apply_ops(base: Iterable[str], ops: Iterable[Op]) -> set[str]:
    """The fact ids in force after `ops` on `base` (a fact's last op decides)."""
    ids = set(base)
    for o in ops:
        if o.op == OP_ADD:
            ids.add(o.fact_id)
        else:
            ids.discard(o.fact_id)
    return ids


@dataclass
class FactChange:
    """A fact in a diff. For `changed`, `before` is the fact it replaced (same subject and relation)."""

    fact_id: str
    fact: Fact
    before: Fact | None = None
    before_id: str | None = None


def net_ops(ops: Iterable[Op]) -> tuple[list[str], list[str]]:
    """(facts `ops` add, facts they retract), a fact's last op deciding, as in `apply_ops`."""
    last = {o.fact_id: o.op for o in ops}
    return [f for f, op in last.items() if op == OP_ADD], [f for f, op in last.items() if op != OP_ADD]


def pair_changes(added: list[str], removed: list[str], facts: dict[str, Fact]):
    """Pair added and removed facts with the same matching (subject, relation) as changes:
    (added alone, removed alone, [(old, new)])."""
    by_key: dict[tuple, list[str]] = {}
    for i in removed:
        by_key.setdefault(facts[i].key, []).append(i)
    changed, plain = [], []
    for i in added:
        olds = by_key.get(facts[i].key)
        if olds:
            changed.append((olds.pop(0), i))
        else:
            plain.append(i)
    paired = {old for old, _ in changed}
    return plain, [i for i in removed if i not in paired], changed


def commit_summary(cid: str, c: Commit, counts: tuple[int, int], refs: list[str]) -> dict:
    return {"id": cid, "parents": list(c.parents), "author": c.author, "timestamp": c.timestamp,
            "message": c.message, "added": counts[0], "retracted": counts[1], "refs": refs,
            "meta": c.meta, "constraints": c.constraints}


class History:
    """The commit graph of a store, with revisions resolved like git's."""

    def __init__(self, store: Store):
        self.store = store
        self._graph: dict[str, tuple[str, ...]] | None = None
        self._state: dict[str, dict[str, str]] = {}

    def changed(self) -> None:
        """Forget what was cached: refs, commits or HEAD changed."""
        self._graph = None
        self._state.clear()

    # ---------------------------------------------------------------- revisions
    def graph(self) -> dict[str, tuple[str, ...]]:
        if self._graph is None:
            self._graph = self.store.graph()
        return self._graph

    def current_branch(self) -> str | None:
        head = self.store.head()
        return head[5:] if head.startswith("ref: ") else None

    def head(self) -> str | None:
        """The commit HEAD points at, or None on an unborn branch."""
        head = self.store.head()
        return self.store.ref(head[5:]) if head.startswith("ref: ") else head

    def resolve(self, rev: str | None = "HEAD") -> str:
        """A full commit id for HEAD, a branch, a (short) id, with ~N / ^ / ^N suffixes."""
        rev = (rev or "HEAD").strip()
        if not rev:
            raise RevisionError("empty revision", "give HEAD, a branch name or a commit id")
        m = _REV_SUFFIX.match(rev)
        base, suffix = (m.group(1), m.group(2)) if m else (rev, "")
        cid = self._resolve_base(base or "HEAD", rev)
        for part in re.findall(r"[~^]\d*", suffix):
            if len(part) > 10:  # more steps than any history has (and maybe too many digits to read)
                raise RevisionError(f"revision {rev[:40]!r}… steps back too far", "use a smaller ~N or ^N (see `kledger log`)")
            cid = self._step(cid, part[0], int(part[1:]) if len(part) > 1 else 1, rev)
        return cid

    def _step(self, cid: str, kind: str, n: int, rev: str) -> str:
        """`cid~n` (kind "~") or `cid^n` (kind "^")."""
        g = self.graph()
        if kind == "~":
            for _ in range(n):
                parents = g.get(cid, ())
                if not parents:
                    raise RevisionError(f"revision {rev!r} goes past the first commit",
                                        "use a smaller ~N (see `kledger log`)")
                cid = parents[0]
            return cid
        if n == 0:
            return cid
        parents = g.get(cid, ())
        if len(parents) < n:
            raise RevisionError(f"commit {short(cid)} has no parent number {n} ({rev!r})",
                                "^2 exists only on merge commits")
        return parents[n - 1]

    def _resolve_base(self, base: str, rev: str) -> str:
        if base == "HEAD":
            cid = self.head()
            if cid is None:
                raise RevisionError("HEAD has no commits yet", "add facts and `kledger commit` first")
            return cid
        cid = self.store.ref(base)
        if cid is None:  # a remote-tracking ref, "origin/main" or "remotes/origin/main"
            cid = self.tracking().get(base.removeprefix("remotes/"))
        if cid is not None:
            return cid
        if looks_like_id(base.lower()):
            found = self.store.ids_with_prefix(base.lower())
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise RevisionError(f"short id {base!r} is ambiguous ({', '.join(short(f) for f in found)}…)",
                                    "give more characters of the id")
        raise RevisionError(f"unknown revision {rev!r}", "give HEAD, a branch name or a commit id (see `kledger log`)")

    def tracking(self) -> dict[str, str]:
        """Remote-tracking refs ("origin/main" → commit), kept by kledger.remotes in meta
        `remote_refs`; those naming a commit not here are left out."""
        try:
            refs = json.loads(self.store.meta(TRACKING_KEY) or "{}")
        except ValueError:
            return {}
        g = self.graph()
        return {f"{r}/{b}": c for r, bs in refs.items() if isinstance(bs, dict)
                for b, c in bs.items() if isinstance(c, str) and c in g}

    # ---------------------------------------------------------------- walks
    def first_parent_chain(self, cid: str | None) -> list[str]:
        """cid, its first parent, and so on to the root (newest first)."""
        chain: list[str] = []
        seen: set[str] = set()
        g = self.graph()
        while cid is not None:
            if cid in seen:  # impossible for content-addressed commits unless the store was edited
                raise IntegrityError(f"commit {short(cid)} is its own ancestor (the ledger was damaged or edited)",
                                     "run `kledger fsck`, and restore the ledger from a backup or a text export")
            seen.add(cid)
            chain.append(cid)
            parents = g.get(cid, ())
            cid = parents[0] if parents else None
        return chain

    def ancestors(self, cid: str) -> set[str]:
        """cid and every commit reachable from it."""
        g, seen, todo = self.graph(), set(), [cid]
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            todo.extend(g.get(c, ()))
        return seen

    def merge_base(self, a: str, b: str) -> str | None:
        common = self.ancestors(a) & self.ancestors(b)
        if not common:
            return None
        order = self.store.commit_order()  # the newest common ancestor is a best one
        return max(common, key=lambda c: order[c])

    # ---------------------------------------------------------------- facts in force
    def state(self, cid: str | None) -> dict[str, str]:
        """Facts in force at commit `cid`: fact id → id of the commit that put it in force."""
        if cid is None:
            return {}
        if cid not in self._state:
            self._state[cid] = self.store.in_force(self.first_parent_chain(cid))
        return self._state[cid]

    def state_of(self, cid: str | None, ids: Iterable[str]) -> dict[str, str]:
        """`state(cid)` restricted to `ids`, reading only those facts' ops (unless the whole state
        is already at hand)."""
        if cid is None:
            return {}
        if cid in self._state:
            state = self._state[cid]
            return {i: state[i] for i in ids if i in state}
        return self.store.in_force_of(self.first_parent_chain(cid), ids)

    def count_in_force(self, cid: str | None) -> int:
        """How many facts are in force at `cid`: from the newest count recorded on its first-parent
        chain (`record_count`) plus what the commits since then changed, reading only the facts
        they touched; counted over the whole chain where none is recorded."""
        if cid is None:
            return 0
        if cid in self._state:
            return len(self._state[cid])
        chain = self.first_parent_chain(cid)
        known = self.store.counts_in(chain)
        i = next((i for i, c in enumerate(chain) if c in known), None)
        if i is None:
            return self.store.count_in_force(chain)
        if i == 0:
            return known[cid]
        since = self.store.commits(chain[:i])
        touched = {o.fact_id for c in since.values() for o in c.ops}
        return (known[chain[i]] + len(self.store.in_force_of(chain, touched))
                - len(self.store.in_force_of(chain[i:], touched)))

    def record_count(self, cid: str) -> None:
        """Record how many facts are in force at the new commit `cid` (written in the caller's
        transaction), so that counting later starts from it."""
        self.changed()  # the graph now holds cid
        self.store.put_count(cid, self.count_in_force(cid))

    def delta(self, cid: str) -> tuple[set[str], set[str]]:
        """(facts the commit put in force, facts it took out), relative to its first parent."""
        parents = self.graph()[cid]
        touched = {o.fact_id for o in self.store.commit(cid).ops}  # nothing else can differ
        before = set(self.state_of(parents[0], touched)) if parents else set()
        after = set(self.state_of(cid, touched))
        return after - before, before - after

    def change_counts(self, a: str, b: str) -> dict:
        """How many facts came into force and went out of force from a to b."""
        sa, sb = set(self.state(a)), set(self.state(b))
        return {"added": len(sb - sa), "retracted": len(sa - sb)}

    def facts_in_force(self, cid: str) -> list[Fact]:
        """The facts in force at `cid`, oldest first (in the order their commits added them)."""
        state = self.state(cid)
        chain = list(reversed(self.first_parent_chain(cid)))
        commits = self.store.commits(chain)
        ordered = list(dict.fromkeys(o.fact_id for c in chain for o in commits[c].ops
                                     if o.op == OP_ADD and state.get(o.fact_id) == c))
        ordered += sorted(set(state) - set(ordered))
        facts = self.store.facts(ordered)
        return [facts[i] for i in ordered if i in facts]

    def constraints_at(self, cid: str | None) -> list[list[Constraint]]:
        """The stored constraints of the facts in force at `cid`, grouped by the commit that put
        each fact in force, in first-parent order (oldest first): the batches `apply` solves. A
        fact's constraints are those of the commit that put it in force, or, for a fact brought by
        a merge, cherry-pick or revert (commits that measure nothing), those of the newest commit
        that measured it. Each commit they come from is checked against its constraints hash
        first: an IntegrityError (pointing to fsck) instead of solving damaged constraints. A
        StateError when a fact in force has none. Needs neither model nor torch."""
        if cid is None:
            return []
        state = self.state(cid)
        source = self._measured_by(cid, state)
        rows = self.verified_constraints(set(source.values()))
        pos = {c: i for i, c in enumerate(reversed(self.first_parent_chain(cid)))}
        by_commit: dict[int, list[Constraint]] = {}
        for r in rows:
            if source.get(r.fact_id) == r.commit_id:
                by_commit.setdefault(pos.get(state[r.fact_id], 0), []).append(r)
        return [by_commit[i] for i in sorted(by_commit)]

    def _measured_by(self, cid: str, state: dict[str, str]) -> dict[str, str]:
        """fact in force at `cid` → the commit whose measured constraints it stands for."""
        measured = self.store.measured_in(list(state))
        missing = [f for f in state if f not in measured]
        if missing:
            raise StateError(f"{len(missing)} fact(s) in force at {short(cid)} have no stored constraints "
                             f"(e.g. {short(missing[0])}), from commits made without a model",
                             "run `kledger replay` to compute them")
        order = self.store.commit_order()
        return {f: state[f] if state[f] in cs else max(cs, key=lambda c: order.get(c, 0))
                for f, cs in measured.items()}

    def verified_constraints(self, commit_ids: Iterable[str]) -> list[Constraint]:
        """Every stored constraint of those commits, each commit's checked against the
        constraints hash it records (IntegrityError on a mismatch)."""
        commit_ids = sorted(commit_ids)
        rows = self.store.constraints(commit_ids)
        commits = self.store.commits(commit_ids, with_ops=False)
        by_commit: dict[str, list[Constraint]] = {}
        for r in rows:
            by_commit.setdefault(r.commit_id, []).append(r)
        for c in commit_ids:
            recorded = commits[c].constraints if c in commits else None
            if recorded is None or constraints_hash(by_commit.get(c, ())) != recorded:
                raise IntegrityError(f"the stored constraints of commit {short(c)} do not match its constraints hash "
                                     "(the ledger was damaged or edited)",
                                     "run `kledger fsck`, and restore the ledger from a backup or a text export")
        return rows

    # ---------------------------------------------------------------- read verbs
    def log(self, rev: str | None = "HEAD", limit: int | None = None, subject: str | None = None,
            relation: str | None = None, all_refs: bool = False) -> list[dict]:
        """Commits reachable from `rev` (or from every branch), newest first."""
        tips = ((set(self.store.refs().values()) | set(self.tracking().values()) | ({self.head()} - {None}))
                if all_refs else {self.resolve(rev)})
        reach: set[str] = set()
        for t in tips:
            reach |= self.ancestors(t)
        order = self.store.commit_order()
        ids = sorted(reach, key=lambda c: order[c], reverse=True)
        if subject is not None or relation is not None:
            touching = self.store.commits_touching(self.store.fact_ids_matching(subject, relation), ids)
            ids = [c for c in ids if c in touching]
        if limit is not None:
            ids = ids[:limit]
        commits = self.store.commits(ids, with_ops=False)
        counts = self.store.op_counts(ids)
        refs_at: dict[str, list[str]] = {}
        for name, c in [*self.store.refs().items(), *self.tracking().items()]:
            refs_at.setdefault(c, []).append(name)
        return [commit_summary(c, commits[c], counts.get(c, (0, 0)), refs_at.get(c, [])) for c in ids]

    def show(self, rev: str = "HEAD") -> dict:
        cid = self.resolve(rev)
        c = self.store.commit(cid)
        facts = self.store.facts(o.fact_id for o in c.ops)
        counts = (sum(o.op == OP_ADD for o in c.ops), sum(o.op != OP_ADD for o in c.ops))
        refs = [n for n, v in self.store.refs().items() if v == cid]
        out = commit_summary(cid, c, counts, refs)
        out["ops"] = [{"op": o.op, "fact_id": o.fact_id, **facts[o.fact_id].to_dict()} for o in c.ops]
        return out

    def diff(self, rev_a: str | None = None, rev_b: str | None = None, with_facts: bool = True) -> dict:
        """Facts added, removed and changed (same subject and relation, another fact) from a to b.
        With no revisions: HEAD against HEAD plus the staged changes; with one: that revision
        against HEAD. `with_facts=False` gives only the counts (no fact is loaded)."""
        facts = None
        if rev_a is None and rev_b is None:
            head = self.head()
            before = set(self.state(head))
            after = apply_ops(before, self.store.staged())
            facts = self.store.facts((after - before) | (before - after))
            added, removed, changed = pair_changes(sorted(after - before), sorted(before - after), facts)
            label = ("HEAD", "staged")
        else:
            a, b = self.resolve(rev_a), self.resolve(rev_b or "HEAD")
            added, removed, changed = self.store.diff(self.first_parent_chain(a), self.first_parent_chain(b))
            label = (a, b)
        counts = {"added": len(added), "removed": len(removed), "changed": len(changed)}
        if not with_facts:
            return {"from": label[0], "to": label[1], "counts": counts}
        if facts is None:
            facts = self.store.facts([*added, *removed, *(i for pair in changed for i in pair)])
        return {"from": label[0], "to": label[1], "counts": counts,
                "added": [FactChange(i, facts[i]) for i in added],
                "removed": [FactChange(i, facts[i]) for i in removed],
                "changed": [FactChange(new, facts[new], facts[old], old) for old, new in changed]}

    def blame(self, subject: str, relation: str | None = None, rev: str = "HEAD") -> list[dict]:
        cid = self.resolve(rev)
        in_force = self.state_of(cid, self.store.fact_ids_matching(subject, relation))
        ids = sorted(in_force)
        facts = self.store.facts(ids)
        commits = self.store.commits({in_force[i] for i in ids}, with_ops=False)
        out = []
        for i in sorted(ids, key=lambda i: (facts[i].relation, facts[i].target)):
            c = commits[in_force[i]]
            out.append({"fact_id": i, **facts[i].to_dict(), "commit": in_force[i], "author": c.author,
                        "timestamp": c.timestamp, "message": c.message})
        return out

    def branches(self, remote: bool = False) -> list[dict]:
        """The branches; with `remote`, the remote-tracking refs too (marked "remote": true)."""
        cur = self.current_branch()
        rows = [{"name": n, "commit": c, "current": n == cur} for n, c in self.store.refs().items()]
        if remote:
            rows += [{"name": n, "commit": c, "current": False, "remote": True} for n, c in sorted(self.tracking().items())]
        return rows
