"""The conflict graph. Pure: facts in, conflicts out; no I/O.

Nodes are facts, edges are contradictions, and a connected component is one conflict. A hard
contradiction is two facts with the same (subject, relation) in matching form and different objects,
where the relation is single-valued (the default; see `kledger relation set --multi`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from .records import Fact, canonical_json, sha256_hex


if TYPE_CHECKING:  # networkx is imported when a graph is built: read commands stay fast
    import networkx as nx


@dataclass(frozen=True)
class Conflict:
    """One connected component of the contradiction graph."""

    kind: str  # "hard" (more kinds are added by the conflicts module's callers)
    subject: str  # matching form
    relation: str  # matching form
    fact_ids: tuple[str, ...]  # sorted
    objects: tuple[str, ...]  # matching forms, sorted

    @property
    def key(self) -> str:
        """Identity of the conflict, independent of which commits brought it: the same subject,
        relation and set of objects give the same key, so a decision can be replayed (rerere)."""
        return sha256_hex(canonical_json([self.kind, self.subject, self.relation, list(self.objects)]))


def conflict_graph(facts: Mapping[str, Fact], multi_valued: Iterable[str] = ()) -> "nx.Graph":
    """Graph over the facts that take part in a contradiction (others are left out: they are not
    in any conflict). Edge attribute `kind` says which contradiction links two facts."""
    import networkx as nx

    multi = set(multi_valued)
    groups: dict[tuple[str, str], list[str]] = {}
    for fid, f in facts.items():
        groups.setdefault(f.key, []).append(fid)
    g = nx.Graph()
    for (subject, relation), ids in groups.items():
        if len(ids) < 2 or relation in multi:
            continue
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                if facts[a].object_key != facts[b].object_key:
                    g.add_edge(a, b, kind="hard")
    return g


def find_conflicts(facts: Mapping[str, Fact], multi_valued: Iterable[str] = (),
                   involving: Iterable[str] | None = None) -> list[Conflict]:
    """Conflicts among `facts`; with `involving`, only those that include one of those fact ids
    (the conflicts a proposed change would bring in)."""
    if len(facts) < 2:
        return []
    import networkx as nx

    g = conflict_graph(facts, multi_valued)
    wanted = None if involving is None else set(involving)
    out = []
    for comp in nx.connected_components(g):
        if wanted is not None and not (comp & wanted):
            continue
        ids = tuple(sorted(comp))
        first = facts[ids[0]]
        out.append(Conflict(kind="hard", subject=first.key[0], relation=first.key[1], fact_ids=ids,
                            objects=tuple(sorted({facts[i].object_key for i in ids}))))
    out.sort(key=lambda c: (c.subject, c.relation))
    return out
