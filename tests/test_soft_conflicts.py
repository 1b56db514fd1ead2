"""Soft conflicts: facts on one relation whose subjects differ as text but whose stored keys at the
first edited layer are near-identical, with different targets. Pure detector tests, then a ledger
on a tiny random Llama (no download): commit refuses, --allow-conflicts records, check fails,
resolve retracts, the decision is remembered and exported."""

from __future__ import annotations

import json

import pytest

from kledger.conflicts import SOFT, find_conflicts, soft_edges
from kledger.records import Fact

np = pytest.importorskip("numpy")


def fact(prompt, subject, target, relation=None):
    return Fact.create(prompt, target, subject=subject, relation=relation)


def test_soft_edges_pure():
    a = fact("the Eiffel Tower is in", "the Eiffel Tower", "Rome")
    b = fact("the Eiffel Tower is in", "Eiffel Tower", "Berlin")  # same suffix, other subject key
    c = fact("the Louvre is in", "Louvre", "Oslo")  # same suffix, far key
    d = fact("Eiffel Tower was built by", "Eiffel Tower", "Rome")  # other relation: never compared
    e = fact("the EIFFEL TOWER is in", "EIFFEL TOWER", "Berlin")  # same object as b: no edge with b
    facts = {f.id: f for f in (a, b, c, d, e)}
    v = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    keys = {a.id: v, b.id: v * 3 + np.array([0, 0.01, 0], dtype=np.float32), c.id: np.array([0, 1.0, 0]),
            d.id: v, e.id: v}
    edges = soft_edges(facts, keys, 0.99)
    pairs = {frozenset(x[:2]) for x in edges}
    assert pairs == {frozenset((a.id, b.id)), frozenset((a.id, e.id))}
    assert all(k == SOFT for *_, k in edges)
    # cos(a, b) = 3 / sqrt(9.0001) = 0.9999944: below a stricter threshold, (a, e) (cos 1) stays
    assert {frozenset(x[:2]) for x in soft_edges(facts, keys, 0.999999)} == {frozenset((a.id, e.id))}
    # a multi-valued relation is never a soft conflict; facts without a key are skipped
    assert soft_edges(facts, keys, 0.99, multi_valued=[a.key[1], b.key[1], e.key[1]]) == []
    assert soft_edges(facts, {a.id: v}, 0.5) == []
    # joined into the graph: one component of kind "soft" whose objects are the choices
    found = find_conflicts(facts, extra_edges=edges)
    assert len(found) == 1 and found[0].kind == "soft"
    assert found[0].objects == ("berlin", "rome")


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from conftest_edit import save_tiny_model_dir  # noqa: E402

from kledger.errors import ConflictError  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402

SETTINGS = {"hparams": {"c0_tokens": 1200, "c0_seq_len": 64, "steps": 4, "n_prefixes": 2, "lam": 5.0}}
PROMPT = "the Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-soft"))


def new_ledger(model_dir, path) -> Ledger:
    lg = Ledger.init(path, model=str(model_dir), settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    lg.set_soft_threshold("0.999")
    return lg


def test_soft_conflict_refused_recorded_checked_resolved_remembered(model_dir, tmp_path):
    lg = new_ledger(model_dir, tmp_path / "a")
    assert lg.config()["soft_threshold"] == 0.999
    lg.add([fact(PROMPT, "the Eiffel Tower", "Rome"), fact("the Louvre is located in the city of", "Louvre", "Oslo")])
    c1 = lg.commit("rome", author="t")
    # same prompt, subject spelled without the article: another slot, the same key
    lg.add([fact(PROMPT, "Eiffel Tower", "Berlin")])
    snap = lg.store.con.execute("SELECT count(*) FROM constraints").fetchone()
    with pytest.raises(ConflictError) as exc:
        lg.commit("berlin", author="t")
    assert "soft" in str(exc.value.conflicts[0].kind)
    assert lg.head() == c1 and len(lg.store.staged()) == 1  # nothing written
    assert lg.store.con.execute("SELECT count(*) FROM constraints").fetchone() == snap
    # recorded as open, then the CI gate fails
    c2 = lg.commit("berlin", author="t", allow_conflicts=True)
    rep = lg.check()
    assert not rep["ok"] and rep["unresolved"] == 1 and rep["soft_checked"] is True
    conf = rep["conflicts"][0]
    assert conf["kind"] == "soft" and sorted(conf["objects"]) == ["berlin", "rome"]
    assert {f["target"] for f in conf["facts"]} == {"Rome", "Berlin"}  # the Louvre is not in it
    assert lg.state(c2).keys() >= {f for f in conf["fact_ids"]}
    # resolve --newest keeps Berlin: Rome is retracted, apply solves without it
    res = lg.resolve_conflicts(strategy="newest", author="t")
    assert res["decided"][0]["keep"] == ["berlin"]
    assert lg.check()["ok"]
    in_force = {f.target for f in lg.store.facts(lg.state(lg.head())).values()}
    assert in_force == {"Oslo", "Berlin"}
    rows = [r for batch in lg.history.constraints_at(lg.head()) for r in batch]
    assert {r.fact_id for r in rows} == set(lg.state(lg.head()))

    # exported decisions travel: a new ledger from the export knows the decision (and threshold)
    lg.export(tmp_path / "text")
    refs = json.loads((tmp_path / "text" / "refs.json").read_text())
    assert refs["decisions"][0]["keep"] == ["berlin"] and refs["soft_threshold"] == "0.999"
    lg.close()
    lg2 = Ledger.init_from(tmp_path / "b", tmp_path / "text")
    assert lg2.store.resolutions()[0][1]["keep"] == ["berlin"] and lg2.soft_threshold() == 0.999
    lg2.close()


def test_remembered_soft_decision_replayed_on_commit_and_loser_not_measured(model_dir, tmp_path):
    lg = new_ledger(model_dir, tmp_path / "a")
    lg.add([fact(PROMPT, "the Eiffel Tower", "Rome")])
    lg.commit("rome", author="t")
    lg.add([fact(PROMPT, "Eiffel Tower", "Berlin")])
    lg.commit("berlin", author="t", allow_conflicts=True)
    lg.resolve_conflicts(keep="Rome", author="t")  # Berlin retracted; decision remembered
    # the same conflict again: the remembered decision applies after the keys are measured
    lg.add([fact(PROMPT, "Eiffel Tower", "Berlin")])
    cid = lg.commit("berlin again", author="t")
    meta = lg.store.commits([cid])[cid].meta
    assert meta["resolved"][0]["remembered"] and meta["resolved"][0]["keep"] == ["rome"]
    assert {f.target for f in lg.store.facts(lg.state(cid)).values()} == {"Rome"}
    assert lg.store.constraints([cid]) == []  # the loser's measured constraints are not stored
    lg.close()


def test_remembered_hard_decision_skips_measuring_the_loser(model_dir, tmp_path, monkeypatch):
    lg = new_ledger(model_dir, tmp_path / "a")
    lg.add([fact(PROMPT, "the Eiffel Tower", "Rome")])
    lg.commit("rome", author="t")
    lg.add([fact(PROMPT, "the Eiffel Tower", "Berlin")])
    lg.commit("berlin", author="t", allow_conflicts=True)
    lg.resolve_conflicts(keep="Rome", author="t")
    measured = []
    real = lg.editor().measure
    monkeypatch.setattr(lg.editor(), "measure", lambda prior, facts, **kw: measured.append(facts) or real(prior, facts, **kw))
    lg.add([fact(PROMPT, "the Eiffel Tower", "Berlin"), fact("the Louvre is located in the city of", "Louvre", "Oslo")])
    cid = lg.commit("again", author="t")
    assert [f.target for f in measured[0]] == ["Oslo"]
    assert lg.store.commits([cid])[cid].meta["resolved"][0]["keep"] == ["rome"]
    lg.close()


def test_soft_threshold_off_and_facts_only_ledger(model_dir, tmp_path):
    lg = new_ledger(model_dir, tmp_path / "a")
    lg.set_soft_threshold("off")
    assert lg.soft_threshold() is None
    lg.add([fact(PROMPT, "the Eiffel Tower", "Rome")])
    lg.commit("rome", author="t")
    lg.add([fact(PROMPT, "Eiffel Tower", "Berlin")])
    lg.commit("berlin", author="t")  # not refused: soft conflicts are off
    assert lg.check()["ok"]
    lg.set_soft_threshold("default")
    assert not lg.check()["ok"]
    lg.close()


def test_resolve_newest_remeasures_kept_facts_as_if_the_loser_never_was(model_dir, tmp_path):
    """B was measured on top of A; after `resolve --newest` its constraints are measured again
    without A, so apply(HEAD) equals a ledger where only B was ever committed."""
    lg = new_ledger(model_dir, tmp_path / "a")
    other = fact("the Louvre is located in the city of", "Louvre", "Oslo")
    lg.add([other])
    lg.commit("oslo", author="t")
    lg.add([fact(PROMPT, "the Eiffel Tower", "Rome")])
    lg.commit("rome", author="t")
    b = fact(PROMPT, "the Eiffel Tower", "Berlin")
    lg.add([b])
    lg.commit("berlin", author="t", allow_conflicts=True)
    res = lg.resolve_conflicts(strategy="newest", author="t")
    cid = res["commit"]
    meta = lg.store.commits([cid])[cid].meta
    assert meta["remeasured"] == [b.id]
    assert lg.state(cid)[b.id] == cid  # B's constraints in force are the re-measured ones
    assert {r.commit_id for r in lg.store.constraints_for_facts([b.id])} == {lg.head(), lg.store.commits([cid])[cid].parents[0]}
    W_resolved, _ = lg.editor().solve(lg.history.constraints_at(lg.head()))

    only = new_ledger(model_dir, tmp_path / "b")
    only.add([other])
    only.commit("oslo", author="t")
    only.add([b])
    only.commit("berlin", author="t")
    W_only, _ = only.editor().solve(only.history.constraints_at(only.head()))
    for la in W_only:
        assert torch.allclose(W_resolved[la], W_only[la], rtol=0, atol=1e-5), la
    # keeping the older side needs no re-measurement: Rome was measured before Berlin existed
    only.close()
    lg.close()


def test_check_staged_and_commit_give_one_verdict_before_anything_is_measured(model_dir, tmp_path, monkeypatch):
    """A soft conflict of a staged fact is found by `check --staged` (its first-layer key measured
    in one short forward pass) and refused by `commit` before any value is optimised; the key
    measured ahead is the key the commit stores."""
    from kledger import model_side
    from kledger.edit import engine
    from kledger.errors import MissingExtraError

    lg = new_ledger(model_dir, tmp_path / "a")
    lg.add([fact(PROMPT, "the Eiffel Tower", "Rome")])
    lg.commit("rome", author="t")
    rome = next(iter(lg.state(lg.head())))
    ahead = lg.editor().first_keys([lg.store.facts([rome])[rome]])[rome]
    stored = lg.store.first_layer_keys([rome])[rome]
    assert np.allclose(ahead, stored, rtol=1e-5, atol=1e-6)

    lg.add([fact(PROMPT, "Eiffel Tower", "Berlin")])
    rep = lg.check(staged=True)
    assert not rep["ok"] and rep["soft_checked"] is True and rep["conflicts"][0]["kind"] == "soft"

    def no_optimising(*a, **k):
        raise AssertionError("a value was optimised for a commit that is refused")

    monkeypatch.setattr(engine, "optimise_values", no_optimising)
    with pytest.raises(ConflictError) as exc:
        lg.commit("berlin", author="t")
    assert exc.value.conflicts[0].key == rep["conflicts"][0]["conflict"]
    assert len(lg.store.staged()) == 1
    # without the model side (a CI gate installed without torch) the staged keys cannot be measured:
    # said, not hidden
    def missing(*a, **k):
        raise MissingExtraError("no torch", "pip install 'kledger[edit]'")

    monkeypatch.setattr(model_side, "first_keys", missing)
    rep = lg.check(staged=True)
    assert rep["ok"] and rep["soft_checked"] is False


@pytest.mark.parametrize("a,b,same", [
    ("the Eiffel Tower", "Eiffel Tower", True), ("EIFFEL TOWER", "the Eiffel Tower", True),
    ("Eiffel Tower", "Eifel Tower", True), ("Eiffel Tower", "Eiffel-Tower", True),
    ("Aruba Football Federation", "Andorran Football Federation", False), ("Paris", "Parma", False),
    ("Danielle Darrieux", "Daniele Darieux", True), ("A", "The A", True), ("the", "The", True),
    ("1990 FIFA World Cup", "1994 FIFA World Cup", False), ("Apollo 11", "Apollo 12", False),
    ("Windows 7", "Windows 8", False), ("Super Bowl XL", "Super Bowl XLI", False), ("Iran", "Iraq", False),
    ("Berg Municipality", "Borg Municipality", False)])
def test_same_entity(a, b, same):
    from kledger.conflicts import same_entity

    assert same_entity(a, b) is same and same_entity(b, a) is same


def test_soft_pairs_of_different_subjects_are_collisions_not_conflicts():
    from kledger.conflicts import COLLISION

    a = fact("Aruba Football Federation belongs to", "Aruba Football Federation", "PBS")
    b = fact("Andorran Football Federation belongs to", "Andorran Football Federation", "FIFA")
    c = fact("the Aruba Football Federation belongs to", "the Aruba Football Federation", "UEFA")
    facts = {f.id: f for f in (a, b, c)}
    v = np.array([1.0, 0.0], dtype=np.float32)
    edges = soft_edges(facts, {a.id: v, b.id: v, c.id: v}, 0.99)
    kinds = {frozenset(e[:2]): e[2] for e in edges}
    assert kinds[frozenset((a.id, b.id))] == COLLISION and kinds[frozenset((b.id, c.id))] == COLLISION
    assert kinds[frozenset((a.id, c.id))] == SOFT
    # a collision joins no conflict: only the alias pair (a, c) is one
    found = find_conflicts(facts, extra_edges=[e for e in edges if e[2] == SOFT])
    assert len(found) == 1 and set(found[0].fact_ids) == {a.id, c.id}
    # with `involving`, only the pairs of those facts: an old collision is not a new fact's
    d = fact("Zurich Football Federation belongs to", "Zurich Football Federation", "FIFA")
    facts[d.id] = d
    far = np.array([0.0, 1.0], dtype=np.float32)
    pairs = soft_edges(facts, {a.id: v, b.id: v, c.id: v, d.id: far}, 0.99, involving=[d.id])
    assert pairs == []
    pairs = soft_edges(facts, {a.id: v, b.id: v, c.id: v, d.id: far}, 0.99, involving=[b.id])
    assert {frozenset(e[:2]) for e in pairs} == {frozenset((a.id, b.id)), frozenset((b.id, c.id))}


def test_a_key_collision_is_committed_and_reported_with_its_effect(model_dir, tmp_path):
    """Two different subjects whose keys coincide at the first edited layer: the commit is not
    refused, and the commit, `check` and `conflicts` report the collision, the commit with what the
    edit did to the other subject's answer."""
    lg = new_ledger(model_dir, tmp_path / "a")
    lg.set_soft_threshold("0.5")  # the tiny random model: subjects that end alike have close keys
    lg.add([fact("the Aruba Football Federation is located in the city of", "Aruba Football Federation", "Rome")])
    c1 = lg.commit("rome", author="t")
    lg.add([fact("the Andorran Football Federation is located in the city of", "Andorran Football Federation",
                 "Oslo")])
    rep = lg.check(staged=True)
    assert rep["ok"] and len(rep["collisions"]) == 1, rep
    c2 = lg.commit("oslo", author="t")
    assert lg.head() == c2 != c1
    (col,) = lg.show(c2)["meta"]["collisions"]
    assert sorted(col["subjects"]) == ["Andorran Football Federation", "Aruba Football Federation"]
    assert col["cosine"] > 0.5 and set(col["effect"]) == {"p_own_before", "p_own_after", "p_new_before", "p_new_after"}
    assert all(0.0 <= x <= 1.0 for x in col["effect"].values())
    rep = lg.check()
    assert rep["ok"] and rep["unresolved"] == 0 and len(rep["collisions"]) == 1
    assert lg.conflicts()["collisions"][0]["fact_ids"] == rep["collisions"][0]["fact_ids"]


def test_resolve_decides_a_staged_soft_conflict(model_dir, tmp_path):
    """The soft conflict that `commit` refuses and `conflicts` shows for a staged fact is one that
    `resolve` can decide (the staged fact's key is measured there too)."""
    lg = new_ledger(model_dir, tmp_path / "a")
    lg.add([fact(PROMPT, "the Eiffel Tower", "Rome")])
    lg.commit("rome", author="t")
    lg.add([fact(PROMPT, "Eiffel Tower", "Berlin")])
    with pytest.raises(ConflictError):
        lg.commit("berlin", author="t")
    assert [c["kind"] for c in lg.conflicts()["conflicts"]] == ["soft"]
    res = lg.resolve_conflicts(strategy="newest", author="t")
    assert res["decided"][0]["keep"] == ["berlin"] and res["commit"] is not None
    assert {f.target for f in lg.store.facts(lg.state(lg.head())).values()} == {"Berlin"}
    assert lg.check()["ok"]
