"""Conflicts: the contradiction graph (hard and inverse), `conflicts`, `resolve` (and rerere),
`check`, `relation`, and the CI files in docs/ci run against real ledgers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, snapshot, subprocess_kledger

from kledger.conflicts import HARD, INVERSE, find_conflicts, settle
from kledger.errors import InputError
from kledger.records import Fact, relation_key

CAPITAL_OF = "The capital of {} is"
IS_CAPITAL_OF = "{} is the capital of"


def fact(prompt, target, subject, relation=None):
    return Fact.create(prompt, target, subject=subject, relation=relation)


def graph(*facts, multi=(), inverse=None):
    fs = {f.id: f for f in facts}
    inv = {}
    for a, b in (inverse or {}).items():
        inv[relation_key(a)] = relation_key(b)
        inv[relation_key(b)] = relation_key(a)
    return find_conflicts(fs, {relation_key(m) for m in multi}, inverse=inv)


def at(k, monkeypatch, day):
    monkeypatch.setenv("KLEDGER_DATE", f"2026-01-{day:02d}T12:00:00+00:00")


def commit(k, prompt, target, subject, msg, *extra):
    assert k("add", prompt, target, "--subject", subject, *extra).code == 0
    r = k("commit", "-m", msg, "--json")
    assert r.code == 0, r.err
    return r.json["id"]


def in_force(k, subject):
    return sorted(f["target"] for f in k("blame", subject, "--json").json["facts"])


# ------------------------------------------------------------------ the graph (pure)
def test_hard_conflicts_match_case_spaces_and_punctuation():
    a = fact("The Eiffel Tower is located in", "Rome", "Eiffel Tower")
    same = fact("the eiffel  tower is located in", " rome. ", "eiffel  tower")  # same fact, other spelling
    b = fact("The Eiffel Tower is located in", "Berlin", "Eiffel Tower.".rstrip("."))
    assert graph(a, same) == []
    (c,) = graph(a, same, b)
    assert c.kind == HARD and c.subject == "eiffel tower" and c.relation == "the {} is located in"
    assert c.objects == ("berlin", "rome") and set(c.fact_ids) == {a.id, same.id, b.id}
    assert {(x, y) for x, y, _ in c.edges} == {tuple(sorted((a.id, b.id))), tuple(sorted((same.id, b.id)))}
    other = fact("The Louvre is located in", "Berlin", "Louvre")
    assert len(graph(a, b, other)) == 1


def test_multi_valued_relation_allows_several_objects():
    a = fact("Paris is a twin city of", "Rome", "Paris")
    b = fact("Paris is a twin city of", "Berlin", "Paris")
    assert len(graph(a, b)) == 1
    assert graph(a, b, multi=["{}  is a twin city of"]) == []


def test_relation_ids_and_templates():
    # the same relation id matches across different prompts; an id never matches a template
    a = fact("The Eiffel Tower is located in", "Rome", "Eiffel Tower", relation="P17")
    b = fact("Where is the Eiffel Tower? In", "Berlin", "Eiffel Tower", relation="P17")
    c = fact("The Eiffel Tower is located in", "Lima", "Eiffel Tower")
    (conf,) = graph(a, b, c)
    assert conf.relation == "P17" and set(conf.fact_ids) == {a.id, b.id}
    assert graph(a, c) == []


def test_inverse_conflicts_both_directions():
    inv = {CAPITAL_OF: IS_CAPITAL_OF}
    a = fact("The capital of France is", "Lyon", "France")  # implies: Lyon is the capital of France
    agree = fact("Lyon is the capital of", "France", "Lyon")
    case_i = fact("Lyon is the capital of", "Germany", "Lyon")  # (Lyon, r⁻, ≠France)
    case_ii = fact("Paris is the capital of", "France", "Paris")  # (X≠Lyon, r⁻, France)
    unrelated = fact("Paris is the capital of", "Germany", "Paris")  # no contradiction with a
    assert graph(a, agree, unrelated, inverse=inv) == []
    assert graph(a, case_i) == []  # without the declaration: different relations
    (c,) = graph(a, case_i, inverse=inv)
    assert c.kind == INVERSE and (c.subject, c.relation) == ("lyon", "{} is the capital of")
    assert c.objects == ("france", "germany")
    implied = [cl for cl in c.claims if cl.implied]
    assert [(cl.fact_id, cl.value) for cl in implied] == [(a.id, "france")]
    (c,) = graph(a, case_ii, inverse=inv)
    assert c.kind == INVERSE and (c.subject, c.relation) == ("france", "the capital of {} is")
    assert c.objects == ("lyon", "paris")
    # (ii) needs r single-valued, (i) needs r⁻ single-valued
    assert graph(a, case_ii, inverse=inv, multi=[CAPITAL_OF]) == []
    assert graph(a, case_i, inverse=inv, multi=[IS_CAPITAL_OF]) == []
    # two implied values alone are no contradiction: r is not made injective
    germany = fact("The capital of Germany is", "Lyon", "Germany")
    assert graph(a, germany, inverse=inv) == []
    # a hard and an inverse edge through one fact make one conflict
    paris = fact("The capital of France is", "Paris", "France")
    (c,) = graph(a, paris, case_i, inverse=inv)
    assert c.kind == "hard+inverse" and set(c.fact_ids) == {a.id, paris.id, case_i.id}


def test_self_inverse_relation():
    rel = "{} is married to"
    a = fact("Alice is married to", "Bob", "Alice")
    b = fact("Bob is married to", "Carol", "Bob")
    ok = fact("Bob is married to", "Alice", "Bob")
    assert graph(a, ok, inverse={rel: rel}) == []
    (c,) = graph(a, b, inverse={rel: rel})
    assert c.kind == INVERSE and c.objects == ("alice", "carol")


def test_components_are_those_of_the_networkx_graph():
    import random

    import networkx as nx

    from kledger.conflicts import conflict_graph

    rng = random.Random(7)
    names = ["Paris", "Lyon", "Rome", "Berlin", "Oslo", "Lima"]
    templates = [("The capital of {} is", "capital"), ("{} is the capital of", "capital"),
                 ("The twin of {} is", "twin"), ("{} is married to", "married")]
    facts = {}
    for _ in range(60):
        s, o = rng.sample(names, 2)
        t = rng.choice(templates)[0]
        f = fact(t.format(s), o, s)
        facts[f.id] = f
    inv = {relation_key(CAPITAL_OF): relation_key(IS_CAPITAL_OF), relation_key(IS_CAPITAL_OF): relation_key(CAPITAL_OF),
           "{} is married to": "{} is married to"}
    multi = {"the twin of {} is"}
    found = find_conflicts(facts, multi, inverse=inv)
    g = conflict_graph(facts, multi, inverse=inv)
    assert found and {c.fact_ids for c in found} == {tuple(sorted(comp)) for comp in nx.connected_components(g)}
    for c in found:
        assert set(c.edges) == {(*sorted((a, b)), d["kind"]) for a, b, d in g.subgraph(c.fact_ids).edges(data=True)}
        assert set(c.claims) == {cl for n in c.fact_ids for cl in g.nodes[n]["claims"]}
    some = found[0].fact_ids[0]
    assert [c.fact_ids for c in find_conflicts(facts, multi, involving=[some], inverse=inv)] == [found[0].fact_ids]


def test_settle_keeps_one_object_and_drops_what_contradicts_it():
    inv = {CAPITAL_OF: IS_CAPITAL_OF}
    a = fact("The capital of France is", "Lyon", "France")
    paris = fact("The capital of France is", "Paris", "France")
    b = fact("Lyon is the capital of", "Germany", "Lyon")
    (c,) = graph(a, paris, b, inverse=inv)
    kept, dropped = settle(c, keep=["lyon"])
    assert kept == {a.id} and dropped == {paris.id, b.id}
    kept, dropped = settle(c, keep=["paris"])  # b stays: it only contradicted a
    assert kept == {paris.id} and dropped == {a.id}
    with pytest.raises(InputError, match="says 'madrid'") as exc:
        settle(c, keep=["madrid"])
    assert "keep one of: 'france', 'germany', 'lyon', 'paris'" in exc.value.one_line()
    (c,) = graph(a, b, inverse=inv)
    assert settle(c, keep=["france"]) == ({a.id}, {b.id})  # the implied value names a
    with pytest.raises(InputError, match="contradict each other"):
        settle(c, keep=["france", "germany"])


# ------------------------------------------------------------------ relation
def test_relation_command(k, ledger_dir):
    assert k("relation", "--json").json["relations"] == []
    r = k("relation", "set", "{} is a twin city of", "--multi", "--json")
    assert r.json["relations"] == [{"relation": "{} is a twin city of", "multi": True, "inverse_of": None}]
    r = k("relation", "inverse", CAPITAL_OF, IS_CAPITAL_OF, "--json")
    assert [x["inverse_of"] for x in r.json["relations"]] == ["{} is the capital of", "the capital of {} is"]
    k("relation", "inverse", CAPITAL_OF, "{} is the seat of")  # replaces the older declaration
    rels = {x["relation"]: x for x in k("relation", "list", "--json").json["relations"]}
    assert rels["{} is the capital of"]["inverse_of"] is None
    assert rels["the capital of {} is"]["inverse_of"] == "{} is the seat of"
    assert k("relation", "inverse", CAPITAL_OF, "--remove").code == 0
    assert all(x["inverse_of"] is None for x in k("relation", "--json").json["relations"])
    before = snapshot(ledger_dir)
    for bad in (["relation", "set", "P17"], ["relation", "inverse", "P17"], ["relation", "frobnicate"],
                ["relation", "set", "  ", "--multi"], ["relation", "inverse", "P17", "--remove"]):
        r = k(*bad)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, bad
    assert snapshot(ledger_dir) == before


def test_multi_valued_relation_in_a_ledger(k, ledger_dir):
    commit(k, "Paris is a twin city of", "Rome", "Paris", "rome")
    k("add", "Paris is a twin city of", "Berlin", "--subject", "Paris")
    assert k("commit", "-m", "berlin").code == 3
    k("relation", "set", "{} is a twin city of", "--multi")
    assert k("commit", "-m", "berlin").code == 0
    assert in_force(k, "Paris") == ["Berlin", "Rome"]
    k("relation", "set", "{} is a twin city of", "--single")  # the declaration changes what check sees
    assert k("check").code == 3


# ------------------------------------------------------------------ conflicts
@pytest.fixture
def stopped_merge(k, ledger_dir, monkeypatch):
    """main: Rome (day 1) ← Lima (day 3); branch berlin from Rome: Berlin (day 2). Merging stops."""
    at(k, monkeypatch, 1)
    c1 = commit(k, "The Eiffel Tower is located in", "Rome", "Eiffel Tower", "rome")
    k("checkout", "-b", "berlin")
    at(k, monkeypatch, 2)
    k("rm", "Eiffel Tower")
    monkeypatch.setenv("KLEDGER_AUTHOR", "Bob <bob@example.org>")
    c_berlin = commit(k, "The EIFFEL TOWER is located in", "Berlin", "EIFFEL TOWER", "berlin")
    monkeypatch.setenv("KLEDGER_AUTHOR", "Ada <ada@example.org>")
    k("checkout", "main")
    at(k, monkeypatch, 3)
    k("rm", "Eiffel Tower")
    c_lima = commit(k, "The Eiffel Tower is located in", "Lima", "Eiffel Tower", "lima")
    at(k, monkeypatch, 4)
    r = k("merge", "berlin")
    assert r.code == 3 and "kledger resolve" in r.err
    return {"rome": c1, "berlin": c_berlin, "lima": c_lima}


def test_conflicts_json_for_a_stopped_merge(k, stopped_merge):
    doc = k("conflicts", "--json").json
    assert doc["command"] == "conflicts" and doc["version"] == 1
    assert doc["target"] == {"kind": "merge", "commit": stopped_merge["lima"], "theirs": stopped_merge["berlin"],
                             "staged": 0}
    (c,) = doc["conflicts"]
    assert c["kind"] == "hard" and c["subject"] == "eiffel tower" and c["objects"] == ["berlin", "lima"]
    assert len(c["conflict"]) == 64 and c["remembered"] is None and len(c["edges"]) == 1
    rows = {f["target"]: f for f in c["facts"]}
    assert rows["Berlin"]["side"] == "theirs" and rows["Berlin"]["commit"] == stopped_merge["berlin"]
    assert rows["Berlin"]["author"] == "Bob <bob@example.org>" and rows["Berlin"]["timestamp"].startswith("2026-01-02")
    assert rows["Berlin"]["message"] == "berlin" and rows["Berlin"]["newest"] is False
    assert rows["Lima"]["side"] == "ours" and rows["Lima"]["newest"] is True
    assert rows["Lima"]["claims"] == [{"subject": "eiffel tower", "relation": "the {} is located in",
                                       "value": "lima", "implied": False}]
    assert c["newest"] == {"side": "ours", "fact_ids": [rows["Lima"]["fact_id"]], "objects": ["lima"]}
    assert [f["target"] for f in c["facts"]] == ["Berlin", "Lima"]  # oldest first


def test_conflicts_human_output_and_revisions(k, stopped_merge):
    r = k("conflicts")
    assert r.code == 0
    assert "(hard)" in r.out and "Berlin" in r.out and "Lima" in r.out and "Bob <bob@example.org>" in r.out
    assert "2026-01-02" in r.out and "(newest)" in r.out and "theirs" in r.out
    assert "kledger resolve" in r.err
    r = k("conflicts", "HEAD", "--json")  # a revision: the facts in force there, no conflict
    assert r.json["target"]["kind"] == "rev" and r.json["conflicts"] == []
    assert "No conflicts" in k("conflicts", "berlin").err
    assert k("conflicts", "nope").code == 2
    assert k("conflicts", "HEAD", "--staged").code == 2


def test_conflicts_staged_and_open_at_head(k, ledger_dir, monkeypatch):
    at(k, monkeypatch, 1)
    commit(k, "The Eiffel Tower is located in", "Rome", "Eiffel Tower", "rome")
    at(k, monkeypatch, 2)
    assert k("add", "The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower").code == 0
    assert k("commit", "-m", "open", "--allow-conflicts").code == 0
    k("add", "The Louvre is located in", "Oslo", "--subject", "Louvre")
    commit(k, "The Louvre is located in", "Oslo", "Louvre", "oslo")
    k("add", "The Louvre is located in", "Paris", "--subject", "Louvre")
    doc = k("conflicts", "--json").json  # HEAD with the staged facts
    assert doc["target"]["kind"] == "staged" and doc["target"]["staged"] == 1
    assert [c["subject"] for c in doc["conflicts"]] == ["eiffel tower", "louvre"]
    louvre = doc["conflicts"][1]
    staged = [f for f in louvre["facts"] if f["side"] == "staged"][0]
    assert staged["commit"] is None and staged["newest"] is True and louvre["newest"]["side"] == "staged"
    assert [c["subject"] for c in k("conflicts", "HEAD", "--json").json["conflicts"]] == ["eiffel tower"]
    assert k("conflicts", "HEAD~2", "--json").json["conflicts"] == []


# ------------------------------------------------------------------ resolve
def test_resolve_stopped_merge_theirs(k, stopped_merge, ledger_dir):
    r = k("resolve", "--theirs", "--json")
    assert r.code == 0, r.err
    doc = r.json
    assert doc["context"] == "merge" and doc["remaining"] == [] and len(doc["decided"]) == 1
    assert doc["decided"][0]["keep"] == ["berlin"] and doc["decided"][0]["strategy"] == "theirs"
    show = k("show", "--json").json
    assert show["id"] == doc["commit"] and show["parents"] == [stopped_merge["lima"], stopped_merge["berlin"]]
    (entry,) = show["meta"]["resolved"]
    assert entry["keep"] == ["berlin"] and entry["remembered"] is False and entry["decided_by"] == "Ada <ada@example.org>"
    assert [(o["op"], o["target"]) for o in show["ops"]] == [("add", "Berlin"), ("retract", "Lima")]
    assert in_force(k, "Eiffel Tower") == ["Berlin"]
    assert k("status", "--json").json["pending"] is None
    assert k("check").code == 0


def test_resolve_stopped_merge_ours_keep_newest(k, stopped_merge, ledger_dir):
    before = snapshot(ledger_dir)
    for bad, code in ((["--keep", "Madrid"], 2), (["--ours", "--theirs"], 2), ([], 2),
                      (["nothing-like-this", "--ours"], 2)):
        r = k("resolve", *bad)
        assert r.code == code and len(r.err.strip().splitlines()) == 1, bad
    assert snapshot(ledger_dir) == before
    assert "keep one of" in k("resolve", "--keep", "Madrid").err
    assert k("resolve", "--ours").code == 0
    assert in_force(k, "Eiffel Tower") == ["Lima"]
    show = k("show", "--json").json
    assert len(show["parents"]) == 2 and show["ops"] == []  # Berlin's add op was left out


@pytest.mark.parametrize("how, want", [(["--keep", "berlin."], ["Berlin"]), (["--newest"], ["Lima"]),
                                       (["eiffel tower", "--keep", "LIMA"], ["Lima"])])
def test_resolve_stopped_merge_by_object_or_newest(k, stopped_merge, how, want):
    r = k("resolve", *how)
    assert r.code == 0, r.err
    assert in_force(k, "Eiffel Tower") == want
    assert "committed the resolution" in r.err


def test_resolve_stopped_cherry_pick_and_rerere(k, ledger_dir, monkeypatch):
    commit(k, "The Eiffel Tower is located in", "Rome", "Eiffel Tower", "rome")
    k("checkout", "-b", "other")
    k("rm", "Eiffel Tower")
    c_oslo = commit(k, "The Eiffel Tower is located in", "Oslo", "Eiffel Tower", "oslo")
    k("checkout", "main")
    k("rm", "Eiffel Tower")
    c_lima = commit(k, "The Eiffel Tower is located in", "Lima", "Eiffel Tower", "lima")
    k("branch", "again", c_lima)
    r = k("cherry-pick", c_oslo)
    assert r.code == 3 and "cherry-pick stopped" in r.err
    r = k("resolve", "--keep", "Oslo", "--json")
    assert r.code == 0 and r.json["context"] == "cherry-pick"
    assert k("show", "--json").json["meta"]["cherry_picked_from"] == c_oslo
    assert in_force(k, "Eiffel Tower") == ["Oslo"]
    # the same conflict comes back on another branch: the decision is replayed, and said
    k("checkout", "again")
    r = k("cherry-pick", c_oslo, "--json")
    assert r.code == 0, r.err
    assert "remembered decision: keep oslo" in r.err and "Ada" in r.err
    (entry,) = r.json["meta"]["resolved"]
    assert entry["remembered"] is True and entry["keep"] == ["oslo"]
    assert in_force(k, "Eiffel Tower") == ["Oslo"]
    # ... and in a commit and a merge
    k("checkout", "-b", "third", c_lima)
    k("add", "The Eiffel Tower is located in", "Oslo", "--subject", "Eiffel Tower")
    r = k("commit", "-m", "oslo again", "--json")
    assert r.code == 0 and r.json["resolved"][0]["remembered"] is True and "remembered decision" in r.err
    assert in_force(k, "Eiffel Tower") == ["Oslo"]
    k("checkout", "-b", "fourth", c_lima)
    r = k("merge", "other", "--json")
    assert r.code == 0 and r.json["result"] == "merge" and r.json["resolved"][0]["keep"] == ["oslo"]
    assert in_force(k, "Eiffel Tower") == ["Oslo"]
    # forgetting the decision: the conflict stops the operation again
    key = entry["conflict"]
    assert k("resolve", key[:12], "--forget").code == 0
    k("checkout", "-b", "fifth", c_lima)
    assert k("cherry-pick", c_oslo).code == 3
    assert k("resolve", key[:12], "--forget").code == 2


def test_resolve_staged_conflicts(k, ledger_dir):
    commit(k, "The Eiffel Tower is located in", "Rome", "Eiffel Tower", "rome")
    k("add", "The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower")
    k("add", "The Louvre is located in", "Oslo", "--subject", "Louvre")
    assert k("commit", "-m", "x").code == 3
    before = snapshot(ledger_dir)
    assert k("resolve", "--ours").code == 1  # no merge in progress
    assert k("resolve", "--keep", "Oslo").code == 2  # not an object of any conflict
    assert snapshot(ledger_dir) == before
    r = k("resolve", "--keep", "Berlin", "-m", "Berlin it is", "--json")
    assert r.code == 0 and r.json["context"] == "staged"
    show = k("show", "--json").json
    assert show["message"] == "Berlin it is"
    assert sorted((o["op"], o["target"]) for o in show["ops"]) == [("add", "Berlin"), ("add", "Oslo"), ("retract", "Rome")]
    assert in_force(k, "Eiffel Tower") == ["Berlin"] and in_force(k, "Louvre") == ["Oslo"]
    assert k("status", "--json").json["staged"] == []
    # keeping what is in force: the staged fact is dropped, and the decision is still a commit
    k("add", "The Louvre is located in", "Madrid", "--subject", "Louvre")
    r = k("resolve", "--newest", "--json")  # staged facts are the newest
    assert in_force(k, "Louvre") == ["Madrid"]
    k("add", "The Louvre is located in", "Lyon", "--subject", "Louvre")
    r = k("resolve", "--keep", "madrid", "--json")
    assert r.code == 0 and r.json["commit"] and k("show", "--json").json["ops"] == []
    assert in_force(k, "Louvre") == ["Madrid"] and k("status", "--json").json["staged"] == []


def test_resolve_open_conflicts_at_head_and_partial_decisions(k, ledger_dir):
    for prompt, t1, t2, s in (("The Eiffel Tower is located in", "Rome", "Berlin", "Eiffel Tower"),
                              ("The Louvre is located in", "Oslo", "Lima", "Louvre")):
        commit(k, prompt, t1, s, t1)
        k("add", prompt, t2, "--subject", s)
        assert k("commit", "-m", t2, "--allow-conflicts").code == 0
    assert k("check").code == 3
    # nothing staged: a commit that retracts the losing facts; the other conflict stays open
    r = k("resolve", "--keep", "Rome", "--json")
    assert r.code == 0 and r.json["context"] == "head"
    assert [o["op"] for o in k("show", "--json").json["ops"]] == ["retract"]
    assert in_force(k, "Eiffel Tower") == ["Rome"]
    assert [c["subject"] for c in k("check", "--json").json["conflicts"]] == ["louvre"]
    # a staged conflict and an open one: deciding only the open one commits nothing yet
    k("add", "The Eiffel Tower is located in", "Paris", "--subject", "Eiffel Tower")
    r = k("resolve", "louvre", "--keep", "Oslo", "--json")
    assert r.code == 0 and r.json["commit"] is None and [c["subject"] for c in r.json["remaining"]] == ["eiffel tower"]
    assert "still undecided" in k("resolve", "louvre", "--keep", "Oslo").err
    r = k("resolve", "--keep", "Paris", "--json")
    assert r.code == 0 and r.json["commit"]
    resolved = {e["subject"]: e for e in k("show", "--json").json["meta"]["resolved"]}
    assert resolved["eiffel tower"]["remembered"] is False and resolved["louvre"]["remembered"] is True
    assert in_force(k, "Eiffel Tower") == ["Paris"] and in_force(k, "Louvre") == ["Oslo"]
    assert k("check").code == 0
    r = k("resolve", "--newest")
    assert r.code == 1 and "no conflict" in r.err


def test_resolve_with_two_conflicts_in_a_merge(k, ledger_dir):
    base = commit(k, "The Eiffel Tower is located in", "Rome", "Eiffel Tower", "rome")
    commit(k, "The Louvre is located in", "Oslo", "Louvre", "oslo")
    k("checkout", "-b", "side", base)
    commit(k, "The Louvre is located in", "Lima", "Louvre", "lima")
    k("rm", "Eiffel Tower")
    commit(k, "The Eiffel Tower is located in", "Berlin", "Eiffel Tower", "berlin")
    k("checkout", "main")
    k("rm", "Eiffel Tower")
    commit(k, "The Eiffel Tower is located in", "Paris", "Eiffel Tower", "paris")
    assert k("merge", "side").code == 3
    r = k("resolve", "--keep", "Oslo", "--json")  # one of two: recorded, the merge waits
    assert r.json["commit"] is None and len(r.json["remaining"]) == 1
    st = k("status", "--json").json
    assert st["pending"]["kind"] == "merge" and len(st["pending"]["conflicts"]) == 1
    listed = k("conflicts", "--json").json["conflicts"]  # both, the decided one with its decision
    assert [(c["subject"], (c["remembered"] or {}).get("keep")) for c in listed] == [
        ("eiffel tower", None), ("louvre", ["oslo"])]
    assert "1 with a remembered decision" in k("conflicts").err
    r = k("resolve", "--theirs", "--json")
    assert r.code == 0 and r.json["commit"]
    assert in_force(k, "Louvre") == ["Oslo"] and in_force(k, "Eiffel Tower") == ["Berlin"]
    assert len(k("show", "--json").json["meta"]["resolved"]) == 2


def test_inverse_conflict_is_refused_resolved_and_checked(k, ledger_dir):
    k("relation", "inverse", CAPITAL_OF, IS_CAPITAL_OF)
    commit(k, "The capital of France is", "Lyon", "France", "lyon")
    commit(k, "Berlin is the capital of", "Germany", "Berlin", "no contradiction")
    k("add", "Paris is the capital of", "France", "--subject", "Paris")
    r = k("commit", "-m", "paris")
    assert r.code == 3 and "inverse" in r.err and "kledger resolve" in r.err
    (c,) = k("conflicts", "--json").json["conflicts"]
    assert c["kind"] == "inverse" and c["objects"] == ["lyon", "paris"]
    assert k("check", "--staged").code == 3
    assert k("resolve", "--keep", "Paris").code == 0
    assert in_force(k, "France") == [] and in_force(k, "Paris") == ["France"] and in_force(k, "Berlin") == ["Germany"]
    assert k("check").code == 0
    # --allow-conflicts records an inverse conflict as open
    k("add", "The capital of Spain is", "Lyon", "--subject", "Spain")
    k("add", "Lyon is the capital of", "Italy", "--subject", "Lyon")
    assert k("commit", "-m", "open", "--allow-conflicts").code == 0
    assert len(k("show", "--json").json["meta"]["open_conflicts"]) == 1
    assert k("check", "--json").json["conflicts"][0]["kind"] == "inverse"


def test_resolve_is_atomic_when_killed(tmp_path, env):
    assert subprocess_kledger(["init"], tmp_path).returncode == 0
    subprocess_kledger(["add", "The Louvre is located in", "Oslo", "--subject", "Louvre"], tmp_path)
    subprocess_kledger(["commit", "-m", "oslo"], tmp_path)
    subprocess_kledger(["add", "The Louvre is located in", "Lima", "--subject", "Louvre"], tmp_path)
    before = snapshot(tmp_path / ".kledger")
    r = subprocess_kledger(["resolve", "--keep", "Lima"], tmp_path, {"KLEDGER_FAULT": "resolve"})
    assert r.returncode == 137
    assert snapshot(tmp_path / ".kledger") == before
    assert subprocess_kledger(["resolve", "--keep", "Lima"], tmp_path).returncode == 0


# ------------------------------------------------------------------ check
def test_check_exit_codes_and_json(k, ledger_dir):
    r = k("check", "--json")  # no commits yet
    assert r.code == 0 and r.json["ok"] is True and r.json["target"]["commit"] is None
    c1 = commit(k, "The Eiffel Tower is located in", "Rome", "Eiffel Tower", "rome")
    r = k("check", "--json")
    assert r.code == 0 and r.json == {"version": 1, "command": "check", "ok": True,
                                      "target": {"kind": "head", "commit": c1, "theirs": None, "staged": 0},
                                      "facts": 1, "unresolved": 0, "conflicts": [], "replayed": [],
                                      "collisions": [], "soft_checked": False}  # a facts-only ledger has no keys
    assert "ok: no unresolved conflict" in k("check").err
    k("add", "The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower")
    assert k("check").code == 0  # HEAD is fine
    r = k("check", "--staged", "--json")
    assert r.code == 3 and r.json["ok"] is False and r.json["unresolved"] == 1
    assert r.json["target"]["kind"] == "staged" and r.out.count('"command"') == 1  # one document, no error doc
    assert "kledger resolve" in r.err and len(r.err.strip().splitlines()) == 1
    k("commit", "-m", "open", "--allow-conflicts")
    r = k("check")
    assert r.code == 3 and "Berlin" in r.out and "Rome" in r.out
    assert k("check", c1).code == 0 and k("check", "HEAD~1", "--json").json["ok"] is True
    assert k("check", "HEAD", "--json").json["conflicts"][0]["objects"] == ["berlin", "rome"]
    assert k("check", "nope").code == 2


def test_check_staged_replays_remembered_decisions(k, ledger_dir):
    commit(k, "The Louvre is located in", "Oslo", "Louvre", "oslo")
    k("add", "The Louvre is located in", "Lima", "--subject", "Louvre")
    k("resolve", "--keep", "Oslo")
    k("add", "The Louvre is located in", "Lima", "--subject", "Louvre")
    r = k("check", "--staged", "--json")  # commit would apply the remembered decision
    assert r.code == 0 and r.json["replayed"][0]["keep"] == ["oslo"]


# ------------------------------------------------------------------ the CI files in docs/ci
def _env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "kledger"  # the `kledger` the scripts call: this checkout's, whatever PATH holds
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m kledger "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "KLEDGER_MODEL": "none",
            "KLEDGER_AUTHOR": "Ada <ada@example.org>", "PYTHONPATH": str(REPO)}


def _conflicted_project(tmp_path, env):
    proj = tmp_path / "proj"
    proj.mkdir()
    for args in (["init"], ["add", "The Louvre is located in", "Oslo", "--subject", "Louvre"], ["commit", "-m", "oslo"],
                 ["add", "The Louvre is located in", "Lima", "--subject", "Louvre"],
                 ["commit", "-m", "lima", "--allow-conflicts"]):
        assert subprocess.run(["kledger", *args], cwd=proj, env=env, capture_output=True).returncode == 0, args
    return proj


def test_pre_commit_hook_blocks_until_resolved(tmp_path):
    env = _env(tmp_path)
    proj = _conflicted_project(tmp_path, env)
    hook = REPO / "docs" / "ci" / "pre-commit"
    assert os.access(hook, os.X_OK)
    r = subprocess.run([str(hook)], cwd=proj, env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "kledger resolve" in r.stderr
    # the text form of the ledger (KLEDGER_TEXT): replayed into a temporary ledger and checked
    subprocess.run(["kledger", "export", "text"], cwd=proj, env=env, check=True, capture_output=True)
    r = subprocess.run([str(hook)], cwd=proj, env={**env, "KLEDGER_TEXT": "text"}, capture_output=True, text=True)
    assert r.returncode == 3
    subprocess.run(["kledger", "resolve", "--keep", "Oslo"], cwd=proj, env=env, check=True, capture_output=True)
    r = subprocess.run([str(hook)], cwd=proj, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # staged facts are checked too: what `kledger commit` would make
    subprocess.run(["kledger", "add", "The Louvre is located in", "Rome", "--subject", "Louvre"], cwd=proj, env=env,
                   check=True, capture_output=True)
    assert subprocess.run([str(hook)], cwd=proj, env=env, capture_output=True).returncode == 3
    subprocess.run(["kledger", "reset"], cwd=proj, env=env, check=True, capture_output=True)
    subprocess.run(["kledger", "export", "text"], cwd=proj, env=env, check=True, capture_output=True)
    assert subprocess.run([str(hook)], cwd=proj, env={**env, "KLEDGER_TEXT": "text"}).returncode == 0


def _workflow_check_step(name: str = "kledger-check.yml") -> tuple[str, dict]:
    import yaml

    wf = yaml.safe_load((REPO / "docs" / "ci" / name).read_text(encoding="utf-8"))
    (job,) = wf["jobs"].values()
    (step,) = [s for s in job["steps"] if s.get("id") == "kledger-check"]
    return step["run"], {**wf.get("env", {}), **job.get("env", {}), **step.get("env", {})}


def test_workflow_command_fails_then_passes(tmp_path):
    env = _env(tmp_path)
    proj = _conflicted_project(tmp_path, env)
    run, wf_env = _workflow_check_step()
    assert "kledger" in run and "check" in run and wf_env["KLEDGER_TEXT"] == "ledgers/main"

    def ci(n):  # a fresh runner, as each GitHub Actions job gets
        runner = tmp_path / f"runner{n}"
        runner.mkdir()
        subprocess.run(["kledger", "export", "ledgers/main"], cwd=proj, env=env, check=True, capture_output=True)
        ci_env = {**env, **{k: str(v) for k, v in wf_env.items()}, "RUNNER_TEMP": str(runner),
                  "GITHUB_STEP_SUMMARY": str(runner / "summary.md")}
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", run], cwd=proj, env=ci_env,
                           capture_output=True, text=True)
        return r, json.loads((runner / "kledger-check.json").read_text()), runner / "summary.md"

    r, report, summary = ci(1)
    assert r.returncode == 3, r.stdout + r.stderr
    assert report["ok"] is False and report["conflicts"][0]["subject"] == "louvre"
    assert "louvre" in summary.read_text() and "kledger resolve" in summary.read_text()
    subprocess.run(["kledger", "resolve", "--keep", "Oslo"], cwd=proj, env=env, check=True, capture_output=True)
    r, report, summary = ci(2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["ok"] is True and not summary.exists()


MODEL_LIBS = ("torch", "transformers", "safetensors", "numpy", "accelerate", "gguf", "tokenizers")


def _without_torch(tmp_path, env):
    """`env` with a Python in which the model extra (torch, transformers, numpy...) cannot be
    imported, as in a CI job that installs kledger without it: a sitecustomize on PYTHONPATH puts a
    blocker first on sys.meta_path."""
    site = tmp_path / "no-model-extra"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {MODEL_LIBS!r}\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n")
    env = {**env, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    env.pop("KLEDGER_MODEL", None)  # the model the text ledger names
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    return env


def _model_text_ledger(tmp_path, env, conflicted):
    """A text ledger that names the default model, as the examples in ledgers/ do: ledgers/eiffel,
    or the conflicted project's history exported and relabelled."""
    import shutil

    text = tmp_path / "repo" / "ledgers" / "main"
    if conflicted:
        proj = _conflicted_project(tmp_path, env)
        subprocess.run(["kledger", "export", text], cwd=proj, env=env, check=True, capture_output=True)
        refs = json.loads((text / "refs.json").read_text())
        (text / "refs.json").write_text(json.dumps({**refs, "model": "smollm2-135m"}))
    else:
        shutil.copytree(REPO / "ledgers" / "eiffel", text)
    assert json.loads((text / "refs.json").read_text())["model"] == "smollm2-135m"
    return tmp_path / "repo"


@pytest.mark.parametrize("conflicted", [False, True])
def test_workflow_checks_a_model_ledger_without_torch(tmp_path, conflicted):
    env = _env(tmp_path)
    repo = _model_text_ledger(tmp_path, env, conflicted)
    bare = _without_torch(tmp_path, env)
    run, wf_env = _workflow_check_step()
    runner = tmp_path / "runner"
    runner.mkdir()
    ci_env = {**bare, **{k: str(v) for k, v in wf_env.items()}, "RUNNER_TEMP": str(runner),
              "GITHUB_STEP_SUMMARY": str(runner / "summary.md")}
    r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", run], cwd=repo, env=ci_env,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    report = json.loads((runner / "kledger-check.json").read_text())
    if conflicted:
        assert r.returncode == 3 and report["ok"] is False, r.stderr
        assert "louvre" in (runner / "summary.md").read_text()
    else:
        assert r.returncode == 0 and report["ok"] is True and report["facts"] == 1, r.stderr
    cfg = subprocess.run(["kledger", "--ledger", runner / "ledger", "config", "--json"], env=bare,
                         capture_output=True, text=True)
    assert json.loads(cfg.stdout)["model"] == "smollm2-135m"  # recorded, never loaded


def test_remote_workflow_clones_and_checks_without_torch_or_numpy(tmp_path):
    """docs/ci/kledger-check-remote.yml: the ledger comes from a remote (kledger push), is cloned
    and checked in a Python where the model extras (numpy too) cannot be imported."""
    env = _env(tmp_path)
    proj = _conflicted_project(tmp_path, env)
    remote = tmp_path / "remote"
    for args in (["remote", "add", "origin", str(remote)], ["push"]):
        subprocess.run(["kledger", *args], cwd=proj, env=env, check=True, capture_output=True)
    bare = _without_torch(tmp_path, env)
    run, wf_env = _workflow_check_step("kledger-check-remote.yml")
    assert "clone" in run and "KLEDGER_REMOTE" in wf_env

    def ci(n):
        runner = tmp_path / f"runner{n}"
        runner.mkdir()
        ci_env = {**bare, **{k: str(v) for k, v in wf_env.items()}, "KLEDGER_REMOTE": str(remote),
                  "RUNNER_TEMP": str(runner), "GITHUB_STEP_SUMMARY": str(runner / "summary.md")}
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", run], cwd=tmp_path, env=ci_env,
                           capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr, r.stderr
        return r, json.loads((runner / "kledger-check.json").read_text()), runner / "summary.md"

    r, report, summary = ci(1)
    assert r.returncode == 3 and report["ok"] is False and "louvre" in summary.read_text(), r.stderr
    for args in (["resolve", "--keep", "Oslo"], ["push"]):
        subprocess.run(["kledger", *args], cwd=proj, env=env, check=True, capture_output=True)
    r, report, summary = ci(2)
    assert r.returncode == 0 and report["ok"] is True and not summary.exists(), r.stderr


def test_pre_commit_hook_checks_a_model_text_ledger_without_torch(tmp_path):
    env = _env(tmp_path)
    repo = _model_text_ledger(tmp_path, env, conflicted=True)
    bare = _without_torch(tmp_path, env)
    r = subprocess.run([str(REPO / "docs" / "ci" / "pre-commit")], cwd=repo,
                       env={**bare, "KLEDGER_TEXT": "ledgers/main"}, capture_output=True, text=True)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr


def test_measuring_without_torch_is_a_one_line_error(tmp_path):
    env = _env(tmp_path)
    repo = _model_text_ledger(tmp_path, env, conflicted=False)
    bare = _without_torch(tmp_path, env)
    r = subprocess.run(["kledger", "init", "copy", "--from", "ledgers/main"], cwd=repo, env=bare,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "torch" in line and "kledger[edit]" in line and "--no-measure" in line
    assert not (repo / "copy").exists()


def test_a_no_measure_ledger_checks_but_refuses_to_edit(k, tmp_path, monkeypatch):
    import shutil

    text = tmp_path / "text"
    shutil.copytree(REPO / "ledgers" / "eiffel", text)
    assert k("init", "copy", "--from", text).code == 0  # KLEDGER_MODEL=none: the same history, facts only
    monkeypatch.delenv("KLEDGER_MODEL")  # the model the text ledger names
    r = k("init", "led", "--from", text, "--no-measure", "--json")
    assert r.code == 0 and r.json["model"] == "smollm2-135m" and r.json["commits"] == 1
    ids = [c["id"] for c in k("--ledger", "copy", "log", "--json").json["commits"]]
    assert [c["id"] for c in k("--ledger", "led", "log", "--json").json["commits"]] == ids  # nothing measured
    r = k("--ledger", "led", "check")
    assert r.code == 0 and "soft conflicts were not looked for" in r.err and k("--ledger", "led", "fsck").code == 0
    assert k("--ledger", "led", "check", "--json").json["soft_checked"] is False  # no keys: said, not hidden
    assert k("--ledger", "copy", "check", "--json").json["soft_checked"] is False  # no model
    assert k("--ledger", "led", "conflicts", "--json").json["conflicts"] == []
    for args in (["apply"], ["ask", "The Eiffel Tower is located in the city of"], ["replay"]):
        r = k("--ledger", "led", *args, "--json")
        assert r.code == 1 and "--no-measure" in r.json["error"]["message"], args
    k("--ledger", "led", "add", "The Louvre is located in", "Oslo", "--subject", "Louvre")
    before = k("--ledger", "led", "log", "--json").json
    r = k("--ledger", "led", "commit", "-m", "x", "--json")
    assert r.code == 1 and "--no-measure" in r.json["error"]["message"]
    assert k("--ledger", "led", "log", "--json").json == before
    assert k("init", "plain", "--no-measure").code == 2  # it applies to --from only


def test_stopped_merge_finishes_when_its_conflicts_are_declared_away(k, ledger_dir):
    base = commit(k, "Paris is a twin city of", "Rome", "Paris", "rome")
    k("checkout", "-b", "side")
    k("rm", "Paris")
    commit(k, "Paris is a twin city of", "Berlin", "Paris", "berlin")
    k("checkout", "main")
    k("rm", "Paris")
    commit(k, "Paris is a twin city of", "Lima", "Paris", "lima")
    assert k("merge", "side").code == 3
    k("relation", "set", "{} is a twin city of", "--multi")
    assert k("conflicts", "--json").json["conflicts"] == []
    r = k("resolve", "--newest", "--json")
    assert r.code == 0 and r.json["decided"] == [] and r.json["commit"]
    assert in_force(k, "Paris") == ["Berlin", "Lima"] and k("status", "--json").json["pending"] is None
    assert base in {c["id"] for c in k("log", "--json").json["commits"]}


def test_merge_stops_on_an_inverse_conflict(k, ledger_dir):
    k("relation", "inverse", CAPITAL_OF, IS_CAPITAL_OF)
    commit(k, "The Louvre is located in", "Oslo", "Louvre", "base")
    k("checkout", "-b", "side")
    commit(k, "Paris is the capital of", "France", "Paris", "paris")
    k("checkout", "main")
    commit(k, "The capital of France is", "Lyon", "France", "lyon")
    r = k("merge", "side")
    assert r.code == 3 and "inverse conflict" in r.err
    (c,) = k("conflicts", "--json").json["conflicts"]
    assert c["kind"] == "inverse" and {f["side"] for f in c["facts"]} == {"ours", "theirs"}
    assert k("resolve", "--theirs").code == 0
    assert in_force(k, "France") == [] and in_force(k, "Paris") == ["France"]
    assert len(k("show", "--json").json["parents"]) == 2 and k("check").code == 0


def test_check_staged_follows_the_staged_ops(k, ledger_dir):
    k("add", "The Eiffel Tower is located in", "Rome", "--subject", "Eiffel Tower")
    k("add", "The Eiffel Tower is located in", "Oslo", "--subject", "Eiffel Tower")
    r = k("check", "--staged", "--json")  # no commit yet: the staged facts alone
    assert r.code == 3 and r.json["target"]["commit"] is None and r.json["facts"] == 2
    k("reset", "Eiffel Tower")
    commit(k, "The Eiffel Tower is located in", "Rome", "Eiffel Tower", "rome")
    k("rm", "Eiffel Tower")
    k("add", "The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower")
    r = k("check", "--staged", "--json")  # Rome retracted in the same change: no conflict
    assert r.code == 0 and r.json["facts"] == 1
    assert k("commit", "-m", "berlin").code == 0 and k("check").code == 0
