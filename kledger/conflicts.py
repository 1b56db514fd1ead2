"""The conflict graph. Pure: facts in, conflicts out; no I/O.

Nodes are facts, edges are contradictions, and a connected component is one conflict.

Matching. Every fact is compared in matching form (`Fact.key`, `Fact.object_key`): subjects and
objects case-folded, NFKC-normalised, punctuation and runs of spaces collapsed; the relation is the
relation id when the data gives one (CounterFact's P-codes) and else the prompt template with the
subject replaced by `{}` (spaces collapsed, case folded). A fact with a relation id and a fact with a
template are therefore about different relations, even when the template would read the same.

A *slot* is a (subject, relation) pair in matching form. A fact (s, r, o) *states* the value o in
the slot (s, r). When r has a declared inverse r⁻ (`kledger relation inverse`), the fact also
*implies* the value s in the slot (o, r⁻): "The capital of France is → Lyon" implies "Lyon is the
capital of → France".

Contradictions (edges), in a slot whose relation is single-valued (the default; see
`kledger relation set --multi`):

- hard: two facts that both state a value in the same slot, with different values.
- inverse: a fact F = (s, r, o) with r⁻ declared, and a fact G that states a value in F's implied
  slot (o, r⁻) other than s. Spelled out for A = (France, r, Lyon), r⁻ = "{} is the capital of":
  (i) A contradicts every fact (Lyon, r⁻, x) with x ≠ France, when r⁻ is single-valued;
  (ii) A contradicts every fact (X, r⁻, France) with X ≠ Lyon, when r is single-valued, because
  that fact implies (France, r, X) in the slot where A states Lyon — this is case (i) seen from the
  other fact, so the one rule "an implied value disagrees with a stated value" covers both.
  Two *implied* values never form an edge on their own: an inverse declaration compares facts on
  one relation with facts on the other, it does not make r injective ("the capital of France is
  Lyon" and "the capital of Germany is Lyon" are only compared with facts stated on r⁻). A relation
  may be its own inverse ("{} is married to"); the same rules apply.

A slot in which an edge lies is *contested*; the *claims* of a conflict are the values its facts
state or imply in its contested slots, and a decision (`kledger resolve --keep OBJECT`) names one of
those values (see `settle`).

- soft: two facts on the same relation (same relation key, or the same prompt text after the
  subject) whose subjects do not match as text but whose keys at the first edited layer are
  near-identical (cosine above the ledger's threshold), with different objects: the model reads
  them as one subject ("the Eiffel Tower" and "Eiffel Tower"), so least squares would average
  their values. `soft_edges` finds them from the stored keys; they are passed to
  `find_conflicts(..., extra_edges=...)` and join the same graph, so a soft edge can merge
  components and a decision about them uses the facts' stated objects.

- collision (not a contradiction): the same near-identical keys for two subjects that are *not*
  one entity written two ways ("Aruba Football Federation" and "Andorran Football Federation",
  whose last token, which dominates an early layer's key, is the same). Which of the two a soft
  pair is, `same_entity` decides from the subjects' text: the same words up to case, punctuation
  and a leading article, or typos in long words (see there). A
  collision is a limit of the edit (one least-squares key for two subjects, so editing one can
  move the other's answer), not a disagreement about the world: it is reported, never refused,
  and joins no conflict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

from .errors import InputError
from .records import Fact, canonical_json, normalize, sha256_hex

if TYPE_CHECKING:  # networkx is imported when a Graph is asked for: read commands stay fast
    import networkx as nx

HARD = "hard"
INVERSE = "inverse"
SOFT = "soft"
COLLISION = "collision"  # near-identical keys of two different subjects: reported, not a conflict
_ARTICLES = frozenset({"the", "a", "an"})
TYPO_MIN_LEN = 5  # letters a word needs before a one-letter difference counts as a typo

# Cosine of first-edited-layer keys above which two subjects count as one (soft conflicts), for
# ledgers that set none. Measured with `python bench/soft_threshold.py --records 1000` on
# SmolLM2-135M-Instruct (layer 3), CounterFact train records 0-999: the largest cosine between two
# different subjects on the same relation template is 0.964 (3,687 pairs), so 0.965 flags none of
# them, and flags 92.7% of subjects spelled with/without a leading "the" and 29% of one-letter typos.
SOFT_THRESHOLD = 0.965


@dataclass(frozen=True)
class Claim:
    """A value a fact gives a contested slot: stated (its own object) or implied (by an inverse)."""

    fact_id: str
    subject: str  # the slot's subject, matching form
    relation: str  # the slot's relation key
    value: str  # matching form
    implied: bool = False

    def to_dict(self) -> dict:
        return {"fact_id": self.fact_id, "subject": self.subject, "relation": self.relation,
                "value": self.value, "implied": self.implied}


@dataclass(frozen=True)
class Conflict:
    """One connected component of the contradiction graph.

    `subject` and `relation` name the component's first contested slot (its only one for a hard
    conflict); `objects` are the values claimed in its contested slots (the choices for `--keep`);
    `kind` is the kinds of its edges joined by '+' ("hard", "inverse", "hard+inverse")."""

    kind: str
    subject: str  # matching form
    relation: str  # matching form
    fact_ids: tuple[str, ...]  # sorted
    objects: tuple[str, ...]  # matching forms, sorted
    edges: tuple[tuple[str, str, str], ...] = ()  # (fact id, fact id, kind), sorted
    claims: tuple[Claim, ...] = ()  # in contested slots, sorted

    @property
    def key(self) -> str:
        """Identity of the conflict, independent of which commits brought it: the same subject,
        relation and set of objects give the same key, so a decision can be replayed (rerere)."""
        return sha256_hex(canonical_json([self.kind, self.subject, self.relation, list(self.objects)]))

    def values_of(self, fact_ids: Iterable[str]) -> tuple[str, ...]:
        """The values the given facts claim in this conflict's contested slots, sorted."""
        ids = set(fact_ids)
        return tuple(sorted({c.value for c in self.claims if c.fact_id in ids}))


def _slots(facts: Mapping[str, Fact], inverse: Mapping[str, str]):
    """slot → (stated claims, implied claims)."""
    slots: dict[tuple[str, str], tuple[list[Claim], list[Claim]]] = {}
    for fid, f in facts.items():
        s, r = f.key
        o = f.object_key
        slots.setdefault((s, r), ([], []))[0].append(Claim(fid, s, r, o, False))
        r_inv = inverse.get(r)
        if r_inv is not None:
            slots.setdefault((o, r_inv), ([], []))[1].append(Claim(fid, o, r_inv, s, True))
    return slots


def contradictions(facts: Mapping[str, Fact], multi_valued: Iterable[str] = (),
                   inverse: Mapping[str, str] | None = None,
                   extra_edges: Iterable[tuple[str, str, str]] = ()) -> Iterator[tuple[Claim, Claim, str]]:
    """The edges of the conflict graph: (claim, claim, kind) for every pair of facts that
    contradict each other, with the claims (in the contested slot) that disagree. `inverse` maps a
    relation key to its declared inverse (both directions)."""
    multi = set(multi_valued)
    for (_, relation), (stated, implied) in _slots(facts, inverse or {}).items():
        if not stated or relation in multi or len(stated) + len(implied) < 2:
            continue
        for i, a in enumerate(stated):  # stated against stated: hard
            for b in stated[i + 1:]:
                if a.value != b.value and a.fact_id != b.fact_id:
                    yield a, b, HARD
        for a in stated if implied else ():  # stated against implied: inverse (implied against implied: never)
            for b in implied:
                if a.value != b.value and a.fact_id != b.fact_id:
                    yield a, b, INVERSE
    for a, b, kind in extra_edges:
        if a in facts and b in facts and a != b:
            fa, fb = facts[a], facts[b]
            yield Claim(a, *fa.key, fa.object_key), Claim(b, *fb.key, fb.object_key), kind


def soft_suffix(f: Fact) -> str:
    """The prompt text after the subject, in matching form: what a soft conflict compares when the
    relation keys differ (e.g. "The Eiffel Tower is in" and "Eiffel Tower is in")."""
    i = f.prompt.find(f.subject)
    return normalize(f.prompt[i + len(f.subject):]) if i >= 0 else ""


def _entity_words(subject: str) -> list[str]:
    words = re.findall(r"\w+", normalize(subject))
    while len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return words


def _edit_distance(a: str, b: str, cap: int) -> int:
    """Levenshtein distance of `a` and `b`, or `cap + 1` as soon as it is known to exceed `cap`."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        if min(cur) > cap:
            return cap + 1
        prev = cur
    return prev[-1]


def same_entity(a: str, b: str) -> bool:
    """Whether two subjects read as one entity written two ways: the same words once case,
    punctuation and a leading article are set aside ("The Eiffel Tower", "eiffel tower"), or the
    same number of words where each word that differs is a typo of the other: both at least
    TYPO_MIN_LEN letters, no digits, edit distance 1 (2 from 10 letters). Numbers, short words and
    numerals are never typos: "Apollo 11" and "Apollo 12", "Iran" and "Iraq", "Super Bowl XL" and
    "Super Bowl XLI" are different entities."""
    wa, wb = _entity_words(a), _entity_words(b)
    if wa == wb:
        return True
    if len(wa) != len(wb):
        return False
    for x, y in zip(wa, wb):
        if x == y:
            continue
        if min(len(x), len(y)) < TYPO_MIN_LEN or any(ch.isdigit() for ch in x + y):
            return False
        cap = 2 if max(len(x), len(y)) >= 10 else 1
        if _edit_distance(x, y, cap) > cap:
            return False
    return True


def soft_edges(facts: Mapping[str, Fact], keys: Mapping[str, "object"], threshold: float,
               multi_valued: Iterable[str] = (), involving: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """Soft pairs: (fact, fact, kind) for pairs on the same relation (relation key, or prompt text
    after the subject) whose subjects differ in matching form, whose objects differ, and whose keys
    (1-D float vectors, numpy) have cosine similarity above `threshold`; kind is "soft" (a
    contradiction) when `same_entity` says the subjects are one entity, else "collision". Facts
    without a key are skipped; with `involving`, only pairs with one of those facts. Pairs are
    compared within a relation group only (one Gram matrix per group), so the cost is the sum of
    the squared group sizes."""
    import numpy as np

    multi = set(multi_valued)
    groups: dict[tuple[str, str], list[str]] = {}
    for fid, f in facts.items():
        if fid not in keys or f.key[1] in multi:
            continue
        groups.setdefault(("relation", f.key[1]), []).append(fid)
        suffix = soft_suffix(f)
        if suffix:
            groups.setdefault(("suffix", suffix), []).append(fid)
    found: set[tuple[str, str]] = set()
    wanted = None if involving is None else set(involving)
    for ids in groups.values():
        if len(ids) < 2 or len({facts[i].object_key for i in ids}) < 2:
            continue
        if wanted is not None and wanted.isdisjoint(ids):
            continue
        ids = sorted(ids)
        M = np.stack([np.asarray(keys[i], dtype=np.float64) for i in ids])  # [n, d_in]
        M /= np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-30)
        G = M @ M.T
        for a, b in zip(*np.nonzero(np.triu(G, 1) > threshold)):
            fa, fb = facts[ids[a]], facts[ids[b]]
            if wanted is not None and ids[a] not in wanted and ids[b] not in wanted:
                continue
            if fa.object_key != fb.object_key and fa.key[0] != fb.key[0]:
                found.add((ids[a], ids[b]))
    return [(a, b, SOFT if same_entity(facts[a].subject, facts[b].subject) else COLLISION) for a, b in sorted(found)]


def key_cosine(a: "object", b: "object") -> float:
    """Cosine similarity of two keys (1-D float vectors)."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-300))


def conflict_graph(facts: Mapping[str, Fact], multi_valued: Iterable[str] = (),
                   inverse: Mapping[str, str] | None = None,
                   extra_edges: Iterable[tuple[str, str, str]] = ()) -> "nx.Graph":
    """The conflict graph as a networkx Graph, over the facts that take part in a contradiction
    (others are left out: they are in no conflict). Edge attribute `kind` says which contradiction
    links two facts; node attribute `claims` is the set of the fact's claims in contested slots."""
    import networkx as nx

    g = nx.Graph()
    for a, b, kind in contradictions(facts, multi_valued, inverse, extra_edges):
        g.add_edge(a.fact_id, b.fact_id, kind=kind)
        for c in (a, b):
            g.nodes[c.fact_id].setdefault("claims", set()).add(c)
    return g


def find_conflicts(facts: Mapping[str, Fact], multi_valued: Iterable[str] = (),
                   involving: Iterable[str] | None = None, inverse: Mapping[str, str] | None = None,
                   extra_edges: Iterable[tuple[str, str, str]] = ()) -> list[Conflict]:
    """Conflicts among `facts`: the connected components of `conflict_graph`; with `involving`,
    only those that include one of those fact ids (the conflicts a proposed change would bring in).
    Sorted by subject, relation and key.

    The components are found by union-find over `contradictions`, the same edges `conflict_graph`
    puts in a networkx Graph (tests/test_conflicts.py checks that they agree): importing networkx
    costs more than the whole search on the few candidates of a 100,000-fact ledger."""
    root: dict[str, str] = {}

    def find(x: str) -> str:
        root.setdefault(x, x)
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    edges: dict[tuple[str, str], str] = {}
    claims: dict[str, set[Claim]] = {}
    for a, b, kind in contradictions(facts, multi_valued, inverse, extra_edges):
        edges[tuple(sorted((a.fact_id, b.fact_id)))] = kind
        for c in (a, b):
            claims.setdefault(c.fact_id, set()).add(c)
        root[find(a.fact_id)] = find(b.fact_id)
    components: dict[str, list[str]] = {}
    for n in claims:
        components.setdefault(find(n), []).append(n)
    by_comp: dict[str, list[tuple[str, str, str]]] = {}
    for (a, b), kind in edges.items():
        by_comp.setdefault(find(a), []).append((a, b, kind))
    wanted = None if involving is None else set(involving)
    out = []
    for r, comp in components.items():
        if wanted is not None and wanted.isdisjoint(comp):
            continue
        cl = tuple(sorted({c for n in comp for c in claims[n]},
                          key=lambda c: (c.subject, c.relation, c.value, c.fact_id, c.implied)))
        es = tuple(sorted(by_comp[r]))
        out.append(Conflict(kind="+".join(sorted({e[2] for e in es})), subject=cl[0].subject,
                            relation=cl[0].relation, fact_ids=tuple(sorted(comp)),
                            objects=tuple(sorted({c.value for c in cl})), edges=es, claims=cl))
    out.sort(key=lambda c: (c.subject, c.relation, c.key))
    return out


def settle(conflict: Conflict, *, keep: Iterable[str] | None = None,
           keep_facts: Iterable[str] | None = None) -> tuple[frozenset[str], frozenset[str]]:
    """A decision applied to one conflict: (facts kept, facts dropped).

    With `keep` (values in matching form), the kept facts are those that claim one of the values in
    a contested slot; with `keep_facts`, those facts. Every fact that contradicts a kept fact is
    dropped; the rest of the component stays. Raises InputError when nothing is kept, when kept
    facts contradict each other, or when what stays still contains a contradiction."""
    comp = set(conflict.fact_ids)
    if keep is not None:
        values = set(keep)
        kept = {c.fact_id for c in conflict.claims if c.value in values}
        what = " / ".join(repr(v) for v in sorted(values))
    else:
        kept = comp & set(keep_facts or ())
        what = "those facts"
    if not kept:
        raise InputError(f"no fact in conflict {conflict.key[:10]} says {what}",
                         f"keep one of: {', '.join(repr(o) for o in conflict.objects)}")
    dropped = {b if a in kept else a for a, b, _ in conflict.edges if a in kept or b in kept}
    if kept & dropped:
        raise InputError(f"keeping {what} keeps facts that contradict each other (conflict {conflict.key[:10]})",
                         "keep a single object with --keep OBJECT")
    stays = comp - dropped
    if any(a in stays and b in stays for a, b, _ in conflict.edges):
        raise InputError(f"keeping {what} leaves contradictions in conflict {conflict.key[:10]}",
                         f"keep another object (one of: {', '.join(repr(o) for o in conflict.objects)})")
    return frozenset(kept), frozenset(dropped)
