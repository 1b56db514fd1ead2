"""The store's queries along first-parent chains: the facts in force at a commit (all, or among a
few), how two states differ, and the facts that can take part in a contradiction. A mixin of
`Store` (it uses its connection); a chain is a commit's first-parent chain, newest first."""

from __future__ import annotations

from typing import Iterable

from ..records import OP_ADD
from .sql import CANDIDATES, IN_FORCE


class Chains:
    def conflict_candidates(self, ids: Iterable[str]) -> list[str]:
        """Those of `ids` that can take part in a contradiction (kledger.conflicts): hard, sharing a
        matching (subject, relation) with another of `ids` that has a different object; inverse, a
        fact (s, r, o) whose relation has a declared inverse r' that is single-valued, and a fact
        (o, r', x) with x other than s (both ends). One aggregate query, so a check over 100,000
        facts never loads them all."""
        ids = list(ids)
        if len(ids) < 2:
            return []
        return [r[0] for r in self.con.execute(
            f"WITH ids AS (SELECT unnest(?::VARCHAR[]) AS id), {CANDIDATES} SELECT id FROM candidates",
            [ids]).fetchall()]

    def conflict_candidates_at(self, chain: list[str]) -> tuple[int, dict[str, str]]:
        """`conflict_candidates` of the facts in force at chain[0] (see `in_force`), in one query:
        (the number of facts in force, candidate fact id → the commit that put it in force)."""
        if not chain:
            return 0, {}
        n, pairs = self.con.execute(
            f"""WITH {IN_FORCE}, ids AS (SELECT id FROM in_force), {CANDIDATES}
            SELECT (SELECT count(*) FROM in_force),
                   (SELECT list([c.id, f.commit_id]) FROM candidates c JOIN in_force f ON f.id = c.id)""",
            [chain, chain, OP_ADD]).fetchone()
        return n, {f: c for f, c in pairs or ()}

    def conflict_candidates_near(self, chain: list[str], added: Iterable[str], retracted: Iterable[str] = ()
                                 ) -> dict[str, str | None]:
        """The `conflict_candidates` connected to one of `added`, among the facts in force at
        chain[0] less `retracted` plus `added`: candidate fact id → the commit that put it in force
        (None for an added one). Only the facts near the added ones are read (`_near`, widened until
        it closes: a contradiction can chain through facts already in force), so the cost follows
        the change, not the ledger's size."""
        added, retracted = list(dict.fromkeys(added)), set(retracted)
        if not added:
            return {}
        found: dict[str, str | None] = dict.fromkeys(added)
        frontier = added
        while frontier and chain:
            near = self.in_force_of(chain, self._near(frontier))
            frontier = [f for f in near if f not in found and f not in retracted]
            found.update((f, near[f]) for f in frontier)
        return {f: found[f] for f in self.conflict_candidates(found)}

    def _near(self, ids: list[str]) -> set[str]:
        """Every stored fact that could be in a contradiction with one of the facts `ids` (as
        CANDIDATES finds them): the same matching subject and relation; or, through a declared
        inverse pair r ↔ r2, for a fact (s, r, o), a fact stating the slot (o, r2) it implies, or
        a fact (x, r2, s) whose implied slot (s, r) it states. Reads `facts` through its key indexes."""
        inv: dict[str, set[str]] = {}
        for r, rule in self.relations().items():
            if r2 := rule["inverse_of"]:
                inv.setdefault(r, set()).add(r2)
                inv.setdefault(r2, set()).add(r)
        mine = self.con.execute("SELECT subject_key, relation_key, object_key FROM facts WHERE id = ANY(?::VARCHAR[])",
                                [ids]).fetchall()
        same = {(s, r) for s, r, _ in mine}
        slots = {(o, r2) for s, r, o in mine for r2 in inv.get(r, ())}  # (subject, relation) they imply
        backs = {(r2, s) for s, r, o in mine for r2 in inv.get(r, ())}  # (relation, object) implying their slot
        subjects = sorted({s for s, _ in same | slots})
        objects = sorted({o for _, o in backs})
        rows = []
        for column, keys in (("subject_key", subjects), ("object_key", objects)):  # one index each
            if keys:
                rows += self.con.execute("SELECT id, subject_key, relation_key, object_key FROM facts "
                                         f"WHERE {column} = ANY(?::VARCHAR[])", [keys]).fetchall()
        return {f for f, s, r, o in rows if (s, r) in same or (s, r) in slots or (r, o) in backs}

    def in_force(self, chain: list[str]) -> dict[str, str]:
        """Facts in force at chain[0], given its first-parent chain (newest first): fact id → id of
        the commit whose op put it in force. An op in a newer commit wins; within a commit, a later
        op wins."""
        if not chain:
            return {}
        rows = self.con.execute(f"WITH {IN_FORCE} SELECT id, commit_id FROM in_force", [chain, chain, OP_ADD]).fetchall()
        return dict(rows)

    def in_force_of(self, chain: list[str], ids: Iterable[str]) -> dict[str, str]:
        """`in_force` restricted to the facts `ids`: those of them in force at chain[0] → the commit
        that put each in force. Reads only those facts' ops (a filter on the fact ids, then the
        same rule as IN_FORCE on the few rows that come back), so its cost follows `ids`."""
        ids = list(dict.fromkeys(ids))
        if not chain or not ids:
            return {}
        depth = {c: i for i, c in enumerate(chain)}
        best: dict[str, tuple[int, int, str, str]] = {}
        for fid, cid, pos, op in self.con.execute(
                "SELECT fact_id, commit_id, pos, op FROM commit_ops WHERE fact_id = ANY(?::VARCHAR[])", [ids]).fetchall():
            d = depth.get(cid)
            if d is not None and (fid not in best or (d, -pos) < best[fid][:2]):
                best[fid] = (d, -pos, op, cid)
        return {fid: b[3] for fid, b in best.items() if b[2] == OP_ADD}

    def diff(self, chain_a: list[str], chain_b: list[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """(added, removed, changed) fact ids from the state at chain_a[0] to that at chain_b[0]
        (first-parent chains, newest first). Only facts touched by a commit outside the shared part
        of the chains can differ. `changed` pairs (old, new) facts with the same matching subject
        and relation; they are left out of added and removed."""
        common = set(chain_a) & set(chain_b)
        touched = [c for c in dict.fromkeys(chain_a + chain_b) if c not in common]
        if not touched:
            return [], [], []
        rows = self.con.execute(
            f"""
            WITH t AS (SELECT DISTINCT fact_id FROM commit_ops WHERE commit_id IN (SELECT unnest(?::VARCHAR[]))),
            sides AS (SELECT unnest(?::VARCHAR[]) AS id, unnest(range(len(?::VARCHAR[]))) AS depth, 'a' AS side
                      UNION ALL
                      SELECT unnest(?::VARCHAR[]), unnest(range(len(?::VARCHAR[]))), 'b'),
            ranked AS (SELECT o.fact_id, o.op, s.side,
                              row_number() OVER (PARTITION BY s.side, o.fact_id ORDER BY s.depth, o.pos DESC) AS rn
                       FROM commit_ops o SEMI JOIN t ON o.fact_id = t.fact_id JOIN sides s ON o.commit_id = s.id),
            st AS (SELECT fact_id, bool_or(side = 'a') AS in_a, bool_or(side = 'b') AS in_b
                   FROM ranked WHERE rn = 1 AND op = '{OP_ADD}' GROUP BY fact_id),
            d AS (SELECT st.fact_id, CASE WHEN in_b THEN 'added' ELSE 'removed' END AS kind,
                         f.subject_key, f.relation_key, f.subject, f.relation
                  FROM st JOIN facts f ON f.id = st.fact_id WHERE in_a <> in_b),
            n AS (SELECT *, row_number() OVER (PARTITION BY kind, subject_key, relation_key ORDER BY fact_id) AS k FROM d)
            SELECT n.kind, n.fact_id, m.fact_id FROM n
            LEFT JOIN n m ON m.kind = 'removed' AND n.kind = 'added' AND m.subject_key = n.subject_key
                          AND m.relation_key = n.relation_key AND m.k = n.k
            ORDER BY n.subject, n.relation, n.fact_id
            """, [touched, chain_a, chain_a, chain_b, chain_b]).fetchall()
        paired = {old for kind, _, old in rows if old is not None}
        added = [new for kind, new, old in rows if kind == "added" and old is None]
        removed = [fid for kind, fid, _ in rows if kind == "removed" and fid not in paired]
        changed = [(old, new) for kind, new, old in rows if old is not None]
        return added, removed, changed

    def count_in_force(self, chain: list[str]) -> int:
        """How many facts are in force at chain[0], counted in DuckDB."""
        if not chain:
            return 0
        return self.con.execute(f"WITH {IN_FORCE} SELECT count(*) FROM in_force", [chain, chain, OP_ADD]).fetchone()[0]
