"""The ledger with a model: commits store constraints measured against apply(parent), and `apply`
of any revision is the one-shot solve of the constraints in force. On a tiny random Llama saved
as a local Hugging Face directory (no download)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
import numpy as np  # noqa: E402

pytest.importorskip("transformers")

from conftest_edit import FACTS, save_tiny_model_dir  # noqa: E402

from kledger.edit.solve import rel_fro, sequential_update, solve_layer  # noqa: E402
from kledger.errors import FingerprintError  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.model_side import load_at  # noqa: E402
from kledger.records import Fact  # noqa: E402

SETTINGS = {"hparams": {"c0_tokens": 1200, "c0_seq_len": 64, "steps": 6, "n_prefixes": 2, "lam": 5.0}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def history(model_dir, tmp_path_factory):
    """5 commits of 2 facts each, made one after another (sequential editing)."""
    root = tmp_path_factory.mktemp("ledger")
    lg = Ledger.init(root, model=str(model_dir), settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    ids = []
    for i in range(5):
        lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2 * i:2 * i + 2]])
        ids.append(lg.commit(f"batch {i}", author="t"))
    ed = lg.editor()
    left_by_last_commit = {la: ed.lm.model.model.layers[la].mlp.down_proj.weight.detach().clone()
                           for la in ed.hparams.layers}
    yield lg, ids, left_by_last_commit
    lg.close()


def rows_at(lg, cid):
    """The constraints in force at `cid` (all commits together), checked against the fingerprint."""
    rows = [r for batch in lg.history.constraints_at(cid) for r in batch]
    lg.editor().check(rows)
    return rows


def stacked(rows, layer):
    rows = sorted((r for r in rows if r.layer == layer), key=lambda r: r.fact_id)
    return (torch.stack([torch.from_numpy(r.key) for r in rows]).double(),
            torch.stack([torch.from_numpy(r.value) for r in rows]).double())


def test_commits_store_constraints_with_fingerprints(history):
    lg, ids, _ = history
    ed = lg.editor()
    for cid in ids:
        c = lg.store.commit(cid)
        assert c.constraints is not None and len(c.constraints) == 64
    rows = rows_at(lg, ids[-1])
    assert len(rows) == 10 * len(ed.hparams.layers)
    fp_id, body = ed.fingerprint()
    assert {r.fingerprint for r in rows} == {fp_id}
    assert lg.store.fingerprint(fp_id)["hparams"]["lam"] == 5.0
    assert lg.fsck()["ok"]


def test_sequential_equals_one_shot(history):
    """The paper's claim: the sequential updates, commit by commit with the running H, equal the
    one-shot solve over all stored constraints, to float64 round-off."""
    lg, ids, left = history
    ed = lg.editor()
    lam, c0 = ed.hparams.lam, ed.c0()
    one_shot, _ = ed.solve(lg.history.constraints_at(ids[-1]))
    for la in ed.hparams.layers:
        W = ed.W0[la].double()
        H = None
        for cid in ids:
            parent = lg.graph()[cid][0] if lg.graph()[cid] else None
            new = [r for r in rows_at(lg, cid) if r.fact_id in set(lg.state(cid)) - set(lg.state(parent))]
            K, V = stacked(new, la)
            W, H = sequential_update(W, K, V, c0[la], lam, H)
        K_all, V_all = stacked(rows_at(lg, ids[-1]), la)
        exact = solve_layer(ed.W0[la], K_all, V_all, c0[la], lam)
        assert rel_fro(W, exact) < 1e-9
        assert rel_fro(one_shot[la].double(), exact) < 1e-6  # stored as float32
        # the weights the last commit left in the model are apply(HEAD)
        assert rel_fro(left[la].double(), exact) < 1e-5


def test_revert_equals_solve_without_that_commit(history):
    lg, ids, _ = history
    lg.revert(ids[2], author="t")
    ed = lg.editor()
    after, info = ed.solve(lg.history.constraints_at(lg.head()))
    assert info["facts"] == 8
    keep = [r for r in rows_at(lg, ids[-1]) if r.fact_id not in {o.fact_id for o in lg.store.commit(ids[2]).ops}]
    for la in ed.hparams.layers:
        K, V = stacked(keep, la)
        assert rel_fro(after[la].double(), solve_layer(ed.W0[la], K, V, ed.c0()[la], ed.hparams.lam)) < 1e-6


def test_apply_is_cached_and_writes_outputs(history, tmp_path):
    lg, ids, _ = history
    ed = lg.editor()
    _, first = ed.solve(lg.history.constraints_at(ids[1]))
    _, again = ed.solve(lg.history.constraints_at(ids[1]))
    assert again["cached"] and again["cache_key"] == first["cache_key"]
    from transformers import AutoModelForCausalLM

    from kledger.edit.weights import save_delta, save_model

    weights, _ = ed.solve(lg.history.constraints_at(ids[1]))
    load_at(lg, ids[1])
    save_model(ed.lm.model, ed.lm.tokenizer, tmp_path / "out")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    la = ed.hparams.layers[0]
    assert torch.allclose(m.model.layers[la].mlp.down_proj.weight, weights[la])
    t, manifest = save_delta(tmp_path / "delta.safetensors", weights, ed.lm.spec)
    assert t.is_file() and manifest.is_file()


def test_solver_modes_differ_and_no_history_forgets(history):
    lg, ids, _ = history
    ed = lg.editor()
    acc, _ = ed.solve(lg.history.constraints_at(ids[-1]), "accumulated")
    nohist, _ = ed.solve(lg.history.constraints_at(ids[-1]), "no-history")
    alpha, _ = ed.solve(lg.history.constraints_at(ids[-1]), "alphaedit")
    la = ed.hparams.layers[-1]
    assert rel_fro(nohist[la].double(), acc[la].double()) > 1e-6
    assert torch.isfinite(alpha[la]).all()


def test_fingerprint_mismatch_is_refused(history):
    lg, ids, _ = history
    # a different λ means different hyper-parameters than the constraints were measured with
    lg.store.set_meta("hparams", '{"c0_tokens": 1200, "c0_seq_len": 64, "steps": 6, "n_prefixes": 2, "lam": 50.0}')
    try:
        fresh = lg.editor(model=lg.model)  # a new Editor reads the ledger's settings again
        with pytest.raises(FingerprintError, match="hyper-parameters"):
            fresh.solve(lg.history.constraints_at(ids[-1]))
    finally:
        lg.store.set_meta("hparams", '{"c0_tokens": 1200, "c0_seq_len": 64, "lam": 5.0, "n_prefixes": 2, "steps": 6}')
        lg._editor = None


def test_fsck_rehashes_constraints(history):
    lg, ids, _ = history
    con = lg.store.con
    (row,) = con.execute("SELECT rowid, value FROM constraints ORDER BY rowid LIMIT 1").fetchall()
    con.execute("UPDATE constraints SET value = ? WHERE rowid = ?", [bytes(len(row[1])), row[0]])
    try:
        rep = lg.fsck()
        assert not rep["ok"] and any("constraints do not match" in p for p in rep["problems"])
    finally:
        con.execute("UPDATE constraints SET value = ? WHERE rowid = ?", [row[1], row[0]])
    assert lg.fsck()["ok"]


def test_init_from_text_ledger_measures_constraints(model_dir, tmp_path):
    from conftest import REPO

    lg = Ledger.init_from(tmp_path, REPO / "ledgers" / "counterfact-demo", model=str(model_dir),
                          settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    try:
        ed = lg.editor()
        assert len({r.fact_id for r in rows_at(lg, lg.head())}) == len(lg.state(lg.head())) == 30
        assert lg.fsck()["ok"]
        _, info = ed.solve(lg.history.constraints_at(lg.head()))
        assert info["facts"] == 30
    finally:
        lg.close()


def test_replay_measures_afresh_like_a_fresh_history(model_dir, tmp_path):
    """History A, B, C. Drop B by cherry-picking C onto A: C keeps the constraints it was measured
    with on top of B. `replay A` measures C afresh on A, exactly as a history of A then C."""
    settings = {**SETTINGS, "corpus": str(model_dir / "corpus.txt")}
    A, B, C = FACTS[0:2], FACTS[2:4], FACTS[4:6]
    a = Ledger.init(tmp_path / "a", model=str(model_dir), settings=settings)
    ids = []
    for i, batch in enumerate((A, B, C)):
        a.add([Fact.create(p, t, subject=s) for p, s, t in batch])
        ids.append(a.commit(f"batch {i}", author="t"))
    a.checkout("without-b", create=True, start=ids[0])
    picked = a.cherry_pick(ids[2], author="t")
    stale = {(r.fact_id, r.layer): r for r in rows_at(a, picked)}
    res = a.replay(ids[0], author="t")
    assert res["replayed"] == 1 and res["mapping"] == {picked: res["head"]} and a.fsck()["ok"]
    assert set(a.state(a.head())) == set(a.state(picked))
    fresh = Ledger.init(tmp_path / "b", model=str(model_dir), settings=settings)
    for i, batch in enumerate((A, C)):
        fresh.add([Fact.create(p, t, subject=s) for p, s, t in batch])
        fresh.commit(f"batch {i}", author="t")
    replayed = {(r.fact_id, r.layer): r for r in rows_at(a, a.head())}
    clean = {(r.fact_id, r.layer): r for r in rows_at(fresh, fresh.head())}
    assert replayed.keys() == clean.keys() == stale.keys()
    for key, r in clean.items():
        assert np.allclose(replayed[key].key, r.key, atol=1e-5)
        assert np.allclose(replayed[key].value, r.value, atol=1e-5)
    c_fact = Fact.create(C[0][0], C[0][2], subject=C[0][1]).id
    la = a.editor().hparams.layers[0]
    assert not np.allclose(stale[(c_fact, la)].value, replayed[(c_fact, la)].value, atol=1e-4)
    a.close()
    fresh.close()


def test_a_prompt_longer_than_the_context_is_refused_before_measuring(model_dir, tmp_path, monkeypatch):
    """A commit whose prompt does not fit the model's context (128 positions here) fails with an
    InputError at once: before C0, the prior solve or any value optimisation; nothing is committed."""
    from conftest import snapshot

    from kledger.edit import editor, engine
    from kledger.errors import InputError

    lg = Ledger.init(tmp_path, model=str(model_dir), settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    lg.add([Fact.create("the " * 140 + "Eiffel Tower is located in", "Rome", subject="Eiffel Tower")])
    lg.close()
    before = snapshot(tmp_path / ".kledger")
    for name, mod in (("c0", editor.Editor), ("optimise_values", engine), ("solve", editor.Editor)):
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **kw: pytest.fail(f"{_n} ran for a too-long prompt"))
    with Ledger.open(tmp_path, write=True) as lg:
        with pytest.raises(InputError, match=r"128.*context|context.*128"):
            lg.commit("too long", author="t")
    assert snapshot(tmp_path / ".kledger") == before


@pytest.mark.parametrize("n, warned", [(99, False), (100, True)])
def test_a_large_model_commit_says_what_it_costs_before_it_starts(k, model_dir, monkeypatch, n, warned):
    """`commit` on a model ledger warns before measuring 100 facts or more; here the commit itself is
    interrupted at once (as Ctrl-C would), and the ledger keeps its staged facts."""
    assert k("init", "--model", str(model_dir)).code == 0
    facts = [Fact.create(f"The colour of thing {i} is", f"colour {i}", f"thing {i}") for i in range(n)]
    with Ledger.open(".", write=True) as lg:
        lg.add(facts)

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Ledger, "commit", interrupted)
    r = k("commit", "-m", "many")
    assert r.code == 1 and "aborted" in r.err, (r.code, r.err, r.out)
    assert (f"this commit measures {n} facts on the model" in r.err) == warned, r.err
    assert k("status", "--json").json["staged"].__len__() == n


@pytest.mark.parametrize("takes", [False, True])
def test_a_commit_reports_how_its_facts_landed_and_names_those_that_did_not_take(k, model_dir, monkeypatch, takes):
    """Each measured commit records every new fact's probability of its object on its own prompt
    with the commit solved in (the number `kledger eval` gives for that revision) and names the
    facts below kledger.model_side.WEAK_BELOW, with a warning from `kledger commit`. An edit too
    weak to take (a learning rate of 1e-6): every fact is named; with the threshold at 0, none."""
    from kledger import model_side

    if takes:
        monkeypatch.setattr(model_side, "WEAK_BELOW", 0.0)
    monkeypatch.setenv("KLEDGER_MODEL", str(model_dir))
    assert k("init", "--corpus", str(model_dir / "corpus.txt"), "--set", "c0_tokens=1200", "--set", "c0_seq_len=64",
             "--set", "steps=2", "--set", "n_prefixes=1", "--set", "lam=5", "--set", "lr=0.000001").code == 0
    with Ledger.open(".", write=True) as lg:
        lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[:2]])
    r = k("commit", "-m", "two", "--json")
    assert r.code == 0, r.err
    doc = r.json
    with Ledger.open(".") as lg:
        meta = lg.show(doc["id"])["meta"]
        ev = lg.evaluate(doc["id"], gen_tokens=0, ppl_tokens=0)
    p_eval = {rec["fact_id"]: rec["edited"]["p_new_prompt"] for rec in ev["records"]}
    assert meta["landed"] == doc["landed"] and set(meta["landed"]) == set(p_eval)
    assert all(abs(meta["landed"][f] - p_eval[f]) < 1e-3 for f in p_eval), (meta["landed"], p_eval)
    assert all(p < 0.5 for p in p_eval.values())  # a tiny random model, barely edited
    shown = k("show").out
    assert "landed: 2 fact(s), P(object | own prompt) mean" in shown and not any(f in shown for f in meta["landed"])
    assert ("did not take (P < 0.5): 2 fact(s)" in shown) != takes, shown
    e = k("eval", "--gen-tokens", "0", "--ppl-tokens", "0")
    assert e.code == 0, e.err
    if takes:
        assert "weak" not in meta and doc["weak"] == [] and "did not take" not in r.err and ev["weak"] == []
        assert "0 of 2 fact(s) in force do not hold (P(object | own prompt) < 0)" in e.err, e.err
    else:
        assert sorted(w["fact_id"] for w in doc["weak"]) == sorted(meta["landed"]) and meta["weak_below"] == 0.5
        assert "warning: 2 new fact(s) did not take" in r.err and repr(FACTS[0][0]) in r.err, r.err
        assert sorted(w["fact_id"] for w in ev["weak"]) == sorted(p_eval) and ev["weak_below"] == 0.5
        assert "2 of 2 fact(s) in force do not hold (P(object | own prompt) < 0.5):" in e.err, e.err


def test_value_dtype_is_set_when_the_ledger_is_made_and_a_bad_one_is_refused(k, model_dir, monkeypatch):
    """`kledger init --set value_dtype=...`: bfloat16 commits (its fingerprint names it); an
    unknown precision is refused in one line before any ledger is made."""
    monkeypatch.setenv("KLEDGER_MODEL", str(model_dir))
    bad = k("init", "--set", "value_dtype=half")
    assert bad.code == 2 and "value_dtype must be one of float32, bfloat16, auto" in bad.err, bad.err
    assert len(bad.err.strip().splitlines()) == 1 and not os.path.exists(".kledger")
    assert k("init", "--corpus", str(model_dir / "corpus.txt"), "--set", "c0_tokens=1200", "--set", "c0_seq_len=64",
             "--set", "steps=2", "--set", "n_prefixes=1", "--set", "value_dtype=bfloat16").code == 0
    with Ledger.open(".", write=True) as lg:
        assert lg.editor().hparams.value_dtype == "bfloat16"
        lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[:2]])
    r = k("commit", "-m", "two", "--json")
    assert r.code == 0 and len(r.json["landed"]) == 2, r.err


def test_two_key_readings_are_stored_as_rows_solved_reverted_and_checked(model_dir, tmp_path):
    """A ledger made with key_readings=2 stores each fact's constraint at a layer as [2, d] key
    and value rows (the fingerprint names it), apply of any revision is the one-shot solve of
    every stored row, revert drops both rows of a fact, soft conflicts read one key per fact
    (its prefixed reading, nearest the context mean), and a row cut short is caught by fsck and by the reads."""
    from kledger.errors import IntegrityError

    settings = {"hparams": {**SETTINGS["hparams"], "key_readings": 2}, "corpus": str(model_dir / "corpus.txt")}
    lg = Ledger.init(tmp_path / "two", model=str(model_dir), settings=settings)
    try:
        ids = []
        for i in range(3):
            lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2 * i:2 * i + 2]])
            ids.append(lg.commit(f"batch {i}", author="t"))
        ed = lg.editor()
        fp_id, body = ed.fingerprint()
        assert body["hparams"]["key_readings"] == 2
        rows = rows_at(lg, ids[-1])
        assert len(rows) == 6 * len(ed.hparams.layers)
        assert all(r.key.shape == (2, 48) and r.value.shape[0] == 2 and r.fingerprint == fp_id for r in rows)
        assert not all(np.allclose(r.key[0], r.key[1]) for r in rows)  # the bare and the prefixed readings differ

        def rows_of(sel, la):
            sel = sorted((r for r in sel if r.layer == la), key=lambda r: r.fact_id)
            return (torch.from_numpy(np.concatenate([r.key for r in sel])).double(),
                    torch.from_numpy(np.concatenate([r.value for r in sel])).double())

        head, _ = ed.solve(lg.history.constraints_at(ids[-1]))
        for la in ed.hparams.layers:
            K, V = rows_of(rows, la)
            assert K.shape[0] == 12
            assert rel_fro(head[la].double(), solve_layer(ed.W0[la], K, V, ed.c0()[la], ed.hparams.lam)) < 1e-6
        lg.revert(ids[1], author="t")
        after, info = ed.solve(lg.history.constraints_at(lg.head()))
        gone = {o.fact_id for o in lg.store.commit(ids[1]).ops}
        assert info["facts"] == 4 and len(gone) == 2
        for la in ed.hparams.layers:
            K, V = rows_of([r for r in rows if r.fact_id not in gone], la)
            assert rel_fro(after[la].double(), solve_layer(ed.W0[la], K, V, ed.c0()[la], ed.hparams.lam)) < 1e-6
        keys = lg.store.first_layer_keys(sorted({r.fact_id for r in rows}))
        first = min(ed.hparams.layers)
        for r in rows:
            if r.layer == first:
                assert keys[r.fact_id].shape == (48,) and np.allclose(keys[r.fact_id], r.key[1])
        staged = ed.first_keys([lg.store.facts([rows[0].fact_id])[rows[0].fact_id]])[rows[0].fact_id]
        assert np.allclose(staged, keys[rows[0].fact_id], atol=1e-5)  # a staged fact's key is read the same way
        assert lg.fsck()["ok"]
        lg.store.con.execute("UPDATE constraints SET value = value[:-4] WHERE commit_id = ?", [ids[0]])
        assert not lg.fsck()["ok"]
        with pytest.raises(IntegrityError, match="not whole float32 rows"):
            lg.store.constraints([ids[0]])
    finally:
        lg.close()
