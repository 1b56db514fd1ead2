"""Decisions: where conflicts are looked for, the conflicts there, and what is decided about them.

- `ProposedFacts`: a target to check (a revision, HEAD with the staged ops, a stopped merge or
  cherry-pick);
- `Decisions.conflicts_of` / `conflicts_in`: hard and inverse conflicts from one aggregate query,
  soft ones from the stored first-layer keys (kledger.conflicts does the graph);
- remembered decisions replayed like git rerere (`replay`), `resolve`'s picking and choosing
  (`pick`, `choose`), and which kept facts must be measured again (`measured_with`);
- relation declarations (multi-valued, inverse pairs), the rules the conflict graph follows.

It writes only the `resolutions` and `relations` tables, inside the facade's transaction.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from .conflicts import (
    COLLISION,
    SOFT,
    SOFT_THRESHOLD,
    Conflict,
    find_conflicts,
    key_cosine,
    settle,
    soft_edges,
)
from .errors import InputError, UsageError
from .history import History, apply_ops, net_ops
from .records import OP_ADD, OP_RETRACT, Fact, Op, looks_like_id, normalize, relation_key
from .store import Store

STRATEGIES = ("keep", "ours", "theirs", "newest")


@dataclass
class ProposedFacts:
    """Where conflicts are looked for: the facts in force at `commit` with `ops` applied.

    `kind` is "rev" (a revision), "head" (HEAD, nothing staged), "staged" (HEAD and the staged
    ops), "merge", "cherry-pick" or "revert" (a stopped operation). `incoming` maps each fact the
    ops add to the commit it comes from (None when staged); `involving` limits the conflicts to
    those touching the incoming facts (a stopped operation), or is None (all of them). `base`
    (fact → commit that put it in force) is None when not loaded (`proposed(lazy=True)`): finding
    the conflicts then takes one query, which fills it with the candidate facts only."""

    kind: str
    commit: str | None
    base: dict[str, str] | None
    ops: list[Op]
    parents: list[str]
    incoming: dict[str, str | None]
    involving: set[str] | None = None
    pending: dict | None = None
    n_facts: int = 0  # facts looked at, set when the conflicts are found


def conflict_id(c: Conflict) -> dict:
    return {"conflict": c.key, "kind": c.kind, "subject": c.subject, "relation": c.relation,
            "objects": list(c.objects)}


def target_of(pf: ProposedFacts) -> dict:
    p = pf.pending or {}
    return {"kind": pf.kind, "commit": pf.commit, "theirs": p.get("theirs"),
            "staged": len(pf.ops) if pf.kind == "staged" else 0}


def describe(conflict: Conflict, facts: dict[str, Fact]) -> str:
    fs = [facts[i] for i in conflict.fact_ids if i in facts]
    if not fs:
        return conflict.subject
    if conflict.kind != "hard":
        return (f"{conflict.kind} conflict on {conflict.subject!r} / {conflict.relation!r}: "
                + " vs ".join(f"{f.prompt!r} → {f.target!r}" for f in fs))
    objs = " vs ".join(repr(f.target) for f in fs)
    return f"{fs[0].subject!r} / {fs[0].relation!r}: {objs}"


def relation_arg(relation: str) -> str:
    if not isinstance(relation, str) or not relation.strip():
        raise InputError("empty relation", "give a relation id (e.g. P36) or a template with {} for the subject")
    return relation_key(relation)


def drop(base: Iterable[str], ops: list[Op], dropped: Iterable[str]) -> list[Op]:
    """`ops` changed so that the `dropped` facts are not in force afterwards: their add ops are
    left out, and those in force before are retracted."""
    dropped = set(dropped)
    ops = [o for o in ops if not (o.op == OP_ADD and o.fact_id in dropped)]
    still = apply_ops(base, ops) & dropped
    return ops + [Op(OP_RETRACT, f) for f in sorted(still)]


def parse_threshold(value: str) -> str:
    """A soft-conflict threshold as stored: a cosine in (0, 1], "off", or "default"."""
    v = value.strip().lower()
    if v == "default":
        return str(SOFT_THRESHOLD)
    if v == "off":
        return v
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not 0 < x <= 1:
        raise UsageError(f"soft-conflict threshold must be a cosine in (0, 1], 'off' or 'default', got {value!r}",
                         f"e.g. `kledger config soft-threshold {SOFT_THRESHOLD}`")
    return repr(x)


class Decisions:
    """Conflicts and decisions over a store's history. `has_model`: the ledger stores keys, so
    soft conflicts can be found."""

    def __init__(self, store: Store, history: History, has_model: bool):
        self.store = store
        self.history = history
        self.has_model = has_model
        self._extra_keys: dict = {}  # fact id → first-layer key measured by a commit in progress
        self._near_seen: tuple | None = None  # (parent, ops, rules, candidates) of the last conflicts_after

    # ---------------------------------------------------------------- relations
    def relation_rules(self) -> tuple[set[str], dict[str, str]]:
        """(multi-valued relation keys, relation key → its declared inverse, in both directions)."""
        multi, inverse = set(), {}
        for key, rel in self.store.relations().items():
            if rel["multi"]:
                multi.add(key)
            if rel["inverse_of"]:
                inverse[key] = rel["inverse_of"]
                inverse[rel["inverse_of"]] = key
        return multi, inverse

    def relations(self) -> list[dict]:
        return [{"relation": k, "multi": bool(v["multi"]), "inverse_of": v["inverse_of"]}
                for k, v in sorted(self.store.relations().items())]

    def relation(self, key: str) -> dict:
        return next(r for r in self.relations() if r["relation"] == key)

    def set_inverse(self, key: str, other: str | None) -> None:
        """See `Ledger.set_inverse`; in the caller's transaction."""
        rels = self.store.relations()
        if other is None:
            old = rels.get(key, {}).get("inverse_of")
            if not old:
                raise InputError(f"relation {key!r} has no inverse declared", "see `kledger relation list`")
            self.store.unset_inverse(key)
            self.store.unset_inverse(old)
            return
        key2 = relation_arg(other)
        for k in (key, key2):
            old = rels.get(k, {}).get("inverse_of")
            if old and old not in (key, key2):
                self.store.unset_inverse(old)
        self.store.set_relation(key, inverse_of=key2)
        self.store.set_relation(key2, inverse_of=key)

    # ---------------------------------------------------------------- soft conflicts
    def soft_threshold(self) -> float | None:
        """The cosine above which first-layer keys count as one subject (None: soft conflicts off;
        always None on a ledger without a model, which has no keys)."""
        if not self.has_model:
            return None
        value = self.store.meta("soft_threshold")
        if value is None:
            return SOFT_THRESHOLD
        return None if value == "off" else float(value)

    @contextmanager
    def new_keys(self, keys: Mapping[str, Any]) -> Iterator[None]:
        """Within the block, soft conflicts also see these first-layer keys (fact id → key) of
        facts no commit has measured yet (the staged ones, measured by `Editor.first_keys`)."""
        if not keys:
            yield
            return
        before = self._extra_keys
        self._extra_keys = {**before, **keys}
        try:
            yield
        finally:
            self._extra_keys = before  # blocks nest (resolve commits through commit)

    def _soft_edges(self, ids: Iterable[str], multi: set[str], involving: Iterable[str] | None = None
                    ) -> tuple[list[tuple[str, str, str]], dict]:
        """(soft and collision edges among `ids` from their first-layer keys, the keys)."""
        thr = self.soft_threshold()
        ids = set(ids)
        if thr is None or len(ids) < 2:
            return [], {}
        keys = self.store.first_layer_keys(sorted(ids))
        keys.update({f: k for f, k in self._extra_keys.items() if f in ids})
        if len(keys) < 2:
            return [], keys
        return soft_edges(self.store.facts(keys), keys, thr, multi, involving), keys

    def collisions_in(self, ids: Iterable[str], involving: Iterable[str] | None = None) -> list[dict]:
        """Key collisions among the facts `ids` (those involving `involving`, if given): two
        different subjects whose first-layer keys are near-identical (`kledger.conflicts`,
        "collision"). Not conflicts: reported so that the user knows editing one may move the
        other's answer. Each: `fact_ids`, `subjects`, `objects`, `relation`, `cosine`."""
        multi, _ = self.relation_rules()
        edges, keys = self._soft_edges(ids, multi, involving)
        hits = [(a, b) for a, b, kind in edges if kind == COLLISION]
        facts = self.store.facts({f for e in hits for f in e})
        return [{"fact_ids": [a, b], "subjects": [facts[a].subject, facts[b].subject],
                 "objects": [facts[a].target, facts[b].target], "relation": facts[a].key[1],
                 "cosine": round(key_cosine(keys[a], keys[b]), 4)} for a, b in hits]

    # ---------------------------------------------------------------- finding conflicts
    def collisions_of(self, pf: ProposedFacts) -> list[dict]:
        """The key collisions in `pf` that touch its incoming facts (all of them at a revision)."""
        if self.soft_threshold() is None:
            return []
        involving = pf.involving if pf.involving is not None else (set(pf.incoming) or None)
        return self.collisions_in(apply_ops(self.history.state(pf.commit), pf.ops), involving)

    def conflicts_in(self, ids: Iterable[str], involving: Iterable[str] | None = None) -> list[Conflict]:
        """Conflicts among the facts `ids` (only those involving `involving`, if given). One
        aggregate query finds the few facts that can take part in a hard or inverse conflict; on a
        model ledger, the stored first-layer keys of all of them are compared for soft ones."""
        ids = set(ids)
        return self._conflicts_among(self.store.conflict_candidates(ids), involving, soft_among=ids)

    def conflicts_after(self, parent: str | None, ops: list[Op], involving: Iterable[str]) -> list[Conflict] | None:
        """`conflicts_in(apply_ops(state(parent), ops), involving)` without loading the facts in
        force: only those near the facts `ops` add are read (Store.conflict_candidates_near), so a
        one-fact commit costs the same on a ledger of 1,000 facts or 100,000. None when soft
        conflicts are on (they compare keys across every fact in force: use conflicts_in)."""
        if self.soft_threshold() is not None:
            return None
        added, retracted = net_ops(ops)
        near = self.store.conflict_candidates_near(
            self.history.first_parent_chain(parent) if parent else [], added, retracted)
        # the same ops on the same parent under the same rules give the same facts: kept for
        # record_candidates, which the commit calls next
        self._near_seen = (parent, (added, retracted), self.store.rules_digest(), near)
        return self._conflicts_among(near, set(involving))

    def _conflicts_among(self, candidates: Iterable[str], involving: Iterable[str] | None = None,
                         soft_among: Iterable[str] = ()) -> list[Conflict]:
        multi, inverse = self.relation_rules()
        edges, _ = self._soft_edges(soft_among, multi)
        soft = [e for e in edges if e[2] == SOFT]
        ids = set(candidates) | {f for e in soft for f in e[:2]}
        return find_conflicts(self.store.facts(ids), multi, involving, inverse=inverse, extra_edges=soft)

    def proposed(self, rev: str | None = None, staged: bool = False, pending: bool = False,
                 lazy: bool = False) -> ProposedFacts:
        """The facts to look for conflicts in: REV's; else, with `pending`, the stopped merge or
        cherry-pick if there is one; else HEAD's, with the staged ops when `staged`. With `lazy`, the
        facts in force at a revision or HEAD are not loaded: `conflicts_of` needs one query."""
        h = self.history
        if rev is not None and staged:
            raise UsageError("give a revision or --staged, not both", "--staged means HEAD with the staged facts")
        if rev is not None:
            cid = h.resolve(rev)
            return ProposedFacts("rev", cid, None if lazy else h.state(cid), [], [cid], {})
        p = self.store.pending() if pending else None
        if p is not None:
            ops = [Op(o, f) for o, f in p["ops"]]
            theirs = h.state(p["theirs"])
            adds = {o.fact_id for o in ops if o.op == OP_ADD}
            return ProposedFacts(p["kind"], p["head"], h.state(p["head"]), ops, list(p["parents"]),
                                 {f: theirs.get(f, p["theirs"]) for f in adds}, adds, p)
        head = h.head()
        ops = self.store.staged() if staged else []
        return ProposedFacts("staged" if ops else "head", head, None if lazy else h.state(head), ops,
                             [head] if head else [], {o.fact_id: None for o in ops if o.op == OP_ADD})

    def conflicts_of(self, pf: ProposedFacts) -> list[Conflict]:
        """The conflicts in `pf`; sets `pf.n_facts`."""
        if pf.base is not None:
            after = apply_ops(pf.base, pf.ops)
            pf.n_facts = len(after)
            return self.conflicts_in(after, involving=pf.involving)
        # not loaded: the candidates recorded at the commit, and those near what the ops add
        added, retracted_ids = net_ops(pf.ops)
        retracted = set(retracted_ids)
        chain = self.history.first_parent_chain(pf.commit)
        base = {f: c for f, c in self.candidates_at(pf.commit).items() if f not in retracted}
        near = self.store.conflict_candidates_near(chain, added, retracted)
        pf.base = {f: base[f] if f in base else near[f] for f in self.store.conflict_candidates({**base, **near})}
        touched = self.store.in_force_of(chain, added + sorted(retracted))
        pf.n_facts = (self.history.count_in_force(pf.commit) + sum(f not in touched for f in added)
                      - sum(f in touched for f in retracted))
        soft_among: Iterable[str] = ()
        if self.soft_threshold() is not None:  # soft conflicts compare every fact in force
            soft_among = apply_ops(self.history.state(pf.commit), pf.ops)
        return self._conflicts_among(pf.base, pf.involving, soft_among)

    def candidates_at(self, cid: str | None) -> dict[str, str]:
        """The facts in force at `cid` that can take part in a hard or inverse contradiction →
        the commit that put each in force: from the record made with the commit
        (`record_candidates`) when it was made under the relation rules now in force, else
        looked for among every fact in force."""
        if cid is None:
            return {}
        chain = self.history.first_parent_chain(cid)
        recorded = self.store.candidates_recorded(cid, self.store.rules_digest())
        if recorded is not None:
            return self.store.in_force_of(chain, recorded)
        return self.store.conflict_candidates_at(chain)[1]

    def record_candidates(self, cid: str) -> None:
        """Record the conflict candidates at the new commit `cid` (in the caller's transaction):
        its parent's that are still in force and those near the facts it adds, narrowed to the
        ones that still have a partner; from every fact in force when the parent has no record
        under the current rules."""
        rules = self.store.rules_digest()
        parents = self.history.graph()[cid]
        before = self.store.candidates_recorded(parents[0], rules) if parents else []
        chain = self.history.first_parent_chain(cid)
        if before is None:
            ids = list(self.store.conflict_candidates_at(chain)[1])
        else:
            changes = net_ops(self.store.commit(cid).ops)
            if self._near_seen is not None and self._near_seen[:3] == (parents[0] if parents else None, changes, rules):
                near = self._near_seen[3]
            else:
                near = self.store.conflict_candidates_near(chain, *changes)
            ids = self.store.conflict_candidates(set(self.store.in_force_of(chain, before)) | set(near))
        self.store.put_candidates(cid, rules, sorted(ids))

    # ---------------------------------------------------------------- remembered decisions
    def replay(self, base: Iterable[str], ops: list[Op], involving: Iterable[str] | None,
               fresh: Iterable[str] = ()) -> tuple[list[Op], list[Conflict], list[dict]]:
        """Apply the recorded decisions (the `resolutions` table) to the conflicts that `ops` on
        `base` leave (those touching `involving`, if given), as git rerere does. Returns the new
        ops, the conflicts left, and one entry per decision applied (`remembered` is False for the
        keys in `fresh`, decided by the running command). Reads only."""
        base = set(base)
        fresh, involving = set(fresh), None if involving is None else set(involving)
        entries: list[dict] = []
        tried: set[str] = set()
        while True:
            after = apply_ops(base, ops)
            found = self.conflicts_in(after, involving=None if involving is None else involving & after)
            progressed = False
            for c in found:
                if c.key in tried:
                    continue
                tried.add(c.key)
                entry = self._replay_one(c, c.key not in fresh)
                if entry is not None:
                    ops = drop(base, ops, entry["dropped"])
                    entries.append(entry)
                    progressed = True
            if not progressed:
                return ops, found, entries

    def _replay_one(self, c: Conflict, remembered: bool) -> dict | None:
        """The entry for the recorded decision on `c`, or None (none, or it does not fit)."""
        decision = self.store.resolution(c.key)
        if decision is None:
            return None
        try:
            _, dropped = settle(c, keep=decision["keep"])
        except InputError:  # the recorded decision does not fit: leave it to the user
            return None
        return {**conflict_id(c), "keep": decision["keep"], "dropped": sorted(dropped),
                "decided_by": decision.get("author"), "decided_at": decision.get("at"),
                "remembered": remembered}

    # ---------------------------------------------------------------- reporting
    def sources(self, pf: ProposedFacts, ids: Iterable[str]) -> dict[str, dict]:
        """fact id → side ("ours", "theirs", "staged"), the commit that brought it, its author,
        date and message, and `age` (a sort key: staged facts are the newest)."""
        src = {f: (pf.incoming[f] if f in pf.incoming else pf.base.get(f)) for f in ids}
        commits = self.store.commits({c for c in src.values() if c}, with_ops=False)
        order = self.store.commit_order() if commits else {}
        incoming_side = "theirs" if pf.kind in ("merge", "cherry-pick") else "staged"
        out = {}
        for f, cid in src.items():
            c = commits.get(cid) if cid else None
            out[f] = {"side": incoming_side if f in pf.incoming else "ours", "commit": cid,
                      "author": c.author if c else None, "timestamp": c.timestamp if c else None,
                      "message": c.message if c else None,
                      "age": (1, "", 0) if c is None else (0, c.timestamp, order.get(cid, 0))}
        return out

    def report(self, pf: ProposedFacts, conflicts: list[Conflict]) -> list[dict]:
        """The `conflicts` entries of the JSON contract (docs/json.md)."""
        ids = [f for c in conflicts for f in c.fact_ids]
        facts, src = self.store.facts(ids), self.sources(pf, ids)
        remembered = self.store.resolutions_of(c.key for c in conflicts)
        out = []
        for c in conflicts:
            newest_age = max(src[f]["age"] for f in c.fact_ids)
            newest = [f for f in c.fact_ids if src[f]["age"] == newest_age]
            sides = {src[f]["side"] for f in newest}
            rows = [_fact_row(f, facts[f], src[f], f in newest, c) for f in sorted(c.fact_ids, key=lambda f: src[f]["age"])]
            out.append({**conflict_id(c), "fact_ids": list(c.fact_ids), "edges": [list(e) for e in c.edges],
                        "newest": {"side": sides.pop() if len(sides) == 1 else None, "fact_ids": newest,
                                   "objects": list(c.values_of(newest))},
                        "remembered": remembered.get(c.key), "facts": rows})
        return out

    # ---------------------------------------------------------------- deciding
    def pick(self, found: list[Conflict], selector: str | None, keep: str | None) -> list[Conflict]:
        """The conflicts `resolve` decides: those `selector` names (a key prefix or a subject), or
        the one with the object `keep`, or (ours/theirs/newest) the undecided ones."""
        hits = found
        if selector is not None and selector.strip():
            sel, norm = selector.strip().lower(), normalize(selector)
            facts = self.store.facts(f for c in found for f in c.fact_ids)
            hits = [c for c in found
                    if (looks_like_id(sel) and c.key.startswith(sel)) or norm == c.subject
                    or norm in {cl.subject for cl in c.claims} or norm in {facts[f].key[0] for f in c.fact_ids}]
            if not hits:
                raise InputError(f"no conflict matches {selector!r}",
                                 "give a key (prefix) or a subject from `kledger conflicts`")
        if keep is None:  # --ours/--theirs/--newest: the undecided ones unless a conflict is named
            if selector is None or not selector.strip():
                decided = self.store.resolutions_of(c.key for c in hits)
                undecided = [c for c in hits if c.key not in decided]
                return undecided or hits
            return hits
        value = normalize(keep)
        with_value = [c for c in hits if value in c.objects]
        if len(with_value) == 1:
            return with_value
        if not with_value:
            choices = "; ".join(f"{c.key[:10]}: {', '.join(c.objects)}" for c in hits[:5])
            raise InputError(f"no conflict has the object {keep!r}", f"keep one of the objects listed ({choices})")
        raise InputError(f"{len(with_value)} conflicts have the object {keep!r}",
                         f"name one: `kledger resolve KEY --keep {keep}` with KEY one of "
                         + ", ".join(c.key[:10] for c in with_value))

    @staticmethod
    def choose(c: Conflict, strategy: str, keep: str | None, src: dict[str, dict]) -> list[str]:
        """The objects `strategy` keeps in conflict `c` (`src`: `sources` of its facts)."""
        if strategy == "keep":
            return [normalize(keep or "")]
        if strategy == "newest":
            newest_age = max(src[f]["age"] for f in c.fact_ids)
            chosen = [f for f in c.fact_ids if src[f]["age"] == newest_age]
        else:
            chosen = [f for f in c.fact_ids if src[f]["side"] == ("ours" if strategy == "ours" else "theirs")]
        values = list(c.values_of(chosen))
        if not values:
            raise InputError(f"conflict {c.key[:10]} has no fact on {strategy} side", "use --keep OBJECT")
        if len(values) > 1:
            raise InputError(f"--{strategy} is ambiguous in conflict {c.key[:10]} "
                             f"({' and '.join(repr(v) for v in values)})",
                             f"name the object: `kledger resolve {c.key[:10]} --keep OBJECT`")
        return values

    def decide(self, pf: ProposedFacts, targets: list[Conflict], strategy: str, keep: str | None,
               who: str, at: str) -> list[dict]:
        """Record a decision on each of `targets` (in the caller's transaction); one entry each."""
        src = self.sources(pf, [f for c in targets for f in c.fact_ids]) if strategy != "keep" else {}
        decided = []
        for c in targets:
            values = self.choose(c, strategy, keep, src)
            kept, dropped = settle(c, keep=values)
            self.store.put_resolution(c.key, {**conflict_id(c), "keep": values, "strategy": strategy,
                                              "author": who, "at": at}, at)
            decided.append({**conflict_id(c), "keep": values, "strategy": strategy,
                            "kept": sorted(kept), "dropped": sorted(dropped)})
        return decided

    def measured_with(self, base: dict[str, str], kept: set[str], dropped: set[str]) -> set[str]:
        """The facts of `kept` in force in `base` (fact → commit that put it in force) whose stored
        constraints were measured while one of `dropped` was in force (so their values pushed
        against it). Empty on a ledger without a model."""
        if not self.has_model or not dropped:
            return set()
        kept = {f for f in kept if f in base}
        measured_in = self.store.measured_in(sorted(kept))
        commits = self.store.commits({c for cs in measured_in.values() for c in cs}, with_ops=False)
        order = self.store.commit_order()
        out = set()
        for f in kept:
            cid = base[f] if base[f] in measured_in.get(f, ()) else max(measured_in.get(f, ()), default=None,
                                                                        key=lambda c: order.get(c, 0))
            if cid is None or not commits[cid].parents:
                continue
            if dropped & set(self.history.state(commits[cid].parents[0])):
                out.add(f)
        return out


def _fact_row(fid: str, fact: Fact, src: dict, newest: bool, c: Conflict) -> dict:
    return {"fact_id": fid, "subject": fact.subject, "prompt": fact.prompt, "target": fact.target,
            "relation": fact.relation, **{k: v for k, v in src.items() if k != "age"}, "newest": newest,
            "claims": [{k: v for k, v in cl.to_dict().items() if k != "fact_id"}
                       for cl in c.claims if cl.fact_id == fid]}
