"""Unit tests of the layers under the facade (store, history, decisions, transfer, settings) and
property-based tests (hypothesis) of what the ledger promises on facts-only ledgers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kledger.decisions import Decisions, drop, parse_threshold
from kledger.errors import InputError, RevisionError, UsageError
from kledger.history import History, apply_ops, check_branch_name, pair_changes
from kledger.ledger import Ledger
from kledger.records import OP_ADD, OP_RETRACT, Commit, Constraint, Fact, Op, constraints_hash
from kledger.settings import Settings
from kledger.store import LEDGER_DIR, Store

ENV = Settings(author="Ada <ada@example.org>", date="2026-01-01T00:00:00+00:00", model="none", lock_wait=0.3)
CITIES = ("Paris", "Rome", "Berlin", "Madrid", "Lisbon")
SUBJECTS = ("Eiffel Tower", "Colosseum", "Brandenburg Gate", "Prado", "Belem Tower", "Big Ben")


def fact(subject: str, city: str) -> Fact:
    return Fact.create(f"{subject} is located in", city, subject)


def new_ledger(tmp_path, name="l") -> Ledger:
    return Ledger.init(tmp_path / name, model="none", env=ENV)


def commit_facts(lg: Ledger, facts: list[Fact], msg: str = "m") -> str | None:
    """Commit `facts` (contradictions recorded as open); None when all are in force already."""
    if lg.add(facts)["staged"] == 0:
        return None
    return lg.commit(msg, allow_conflicts=True)


def commit_all(lg: Ledger, history: list) -> list[str]:
    ids = [commit_facts(lg, [fact(s, c) for s, c in batch], f"c{i}") for i, batch in enumerate(history)]
    return [c for c in ids if c is not None]


# ------------------------------------------------------------------------------ settings
def test_settings_read_once_and_validated():
    s = Settings.from_env({"KLEDGER_LOCK_WAIT": "2.5", "KLEDGER_DEVICE": "CUDA:1", "KLEDGER_CACHE": "/tmp/c",
                           "HF_HOME": "/tmp/hf"})
    assert s.lock_wait == 2.5 and s.device == "cuda:1" and str(s.model_cache) == "/tmp/c"
    assert str(s.hub_cache) == "/tmp/hf/hub"
    with pytest.raises(UsageError, match="KLEDGER_LOCK_WAIT"):
        Settings.from_env({"KLEDGER_LOCK_WAIT": "soon"})
    with pytest.raises(UsageError, match="unknown device"):
        Settings.from_env({"KLEDGER_DEVICE": "tpu"})
    assert Settings(date="2026-01-31T12:00:00").now() == "2026-01-31T12:00:00+00:00"
    with pytest.raises(UsageError, match="ISO 8601"):
        Settings(date="yesterday").now()


# ------------------------------------------------------------------------------ store
def test_store_constraints_round_trip_as_records(tmp_path):
    store = Store.create(tmp_path / LEDGER_DIR, {"HEAD": "ref: main", "model": "m"})
    rng = np.random.default_rng(0)
    rows = [Constraint(f"f{i}", la, rng.standard_normal(6).astype(np.float32),
                       rng.standard_normal(4).astype(np.float32), "fp") for i in range(3) for la in (2, 3)]
    with store.transaction():
        store.put_constraints("c1", rows)
    back = store.constraints(["c1"])
    assert all(isinstance(c, Constraint) and c.commit_id == "c1" for c in back)
    assert constraints_hash(back) == constraints_hash(rows)
    by = {(c.fact_id, c.layer): c for c in back}
    for r in rows:
        got = by[(r.fact_id, r.layer)]
        assert got.key.dtype == np.float32 and np.array_equal(got.key, r.key) and np.array_equal(got.value, r.value)
    assert store.measured_facts(["f0", "f9"]) == {"f0"}
    assert store.measured_in(["f1"]) == {"f1": {"c1"}}
    keys = store.first_layer_keys(["f0", "f1", "f9"])
    assert set(keys) == {"f0", "f1"} and np.array_equal(keys["f0"], by[("f0", 2)].key)
    store.close()


def test_store_keeps_a_facts_key_readings_as_rows(tmp_path):
    """Two key readings per fact ([2, d] key and value): stored as rows of the stated widths,
    read back with their shape and hash; soft conflicts read the last (prefixed) one; bytes that are not whole
    rows, or key and value row counts that differ, are refused as damage."""
    from kledger.errors import IntegrityError
    from kledger.store.codec import constraint_from_row

    rng = np.random.default_rng(1)
    store = Store.create(tmp_path / LEDGER_DIR, {"HEAD": "ref: main"})
    rows = [Constraint(f"f{i}", la, rng.standard_normal((2, 6)).astype(np.float32),
                       rng.standard_normal((2, 4)).astype(np.float32), "fp") for i in range(2) for la in (2, 3)]
    with store.transaction():
        store.put_constraints("c1", rows)
    assert store.con.execute("SELECT DISTINCT d_in, d_out FROM constraints").fetchall() == [(6, 4)]
    back = {(c.fact_id, c.layer): c for c in store.constraints(["c1"])}
    assert constraints_hash(back.values()) == constraints_hash(rows)
    for r in rows:
        assert back[(r.fact_id, r.layer)].key.shape == (2, 6) and np.array_equal(back[(r.fact_id, r.layer)].value, r.value)
    assert np.allclose(store.first_layer_keys(["f0"])["f0"], rows[0].key[1])
    key, value = rows[0].key.tobytes(), rows[0].value.tobytes()
    for bad_key, bad_value, says in ((key[:-4], value, "not whole float32 rows"), (key, value[:16], "2 key rows and 1 value rows")):
        with pytest.raises(IntegrityError, match=says):
            constraint_from_row(("c", "f0", 2, "float32", 6, 4, bad_key, bad_value, "fp"))
    store.close()


def test_store_stats_round_trip_in_float64(tmp_path):
    store = Store.create(tmp_path / LEDGER_DIR, {"HEAD": "ref: main"})
    m = np.arange(9, dtype=np.float64).reshape(3, 3) / 7
    with store.transaction():
        store.put_stats("model", "corpus", 4, 1234, m)
        store.put_stats("model", "corpus", 4, 1235, m * 2)  # replaced, not duplicated
    got = store.stats("model", "corpus")
    assert list(got) == [4] and got[4][0] == 1235 and got[4][1].dtype == np.float64
    assert np.array_equal(got[4][1], m * 2)
    assert store.stats("model", "other") == {}
    store.close()


def test_store_transaction_rolls_back(tmp_path):
    store = Store.create(tmp_path / LEDGER_DIR, {"HEAD": "ref: main"})
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.set_ref("main", "abc")
            raise RuntimeError("boom")
    assert store.ref("main") is None
    store.close()


# ------------------------------------------------------------------------------ history
def test_apply_ops_last_op_wins_and_pair_changes():
    assert apply_ops({"a", "b"}, [Op(OP_RETRACT, "a"), Op(OP_ADD, "c"), Op(OP_ADD, "a"), Op(OP_RETRACT, "c")]) == {"a", "b"}
    old, new, other = fact("Prado", "Madrid"), fact("Prado", "Rome"), fact("Big Ben", "Paris")
    facts = {f.id: f for f in (old, new, other)}
    added, removed, changed = pair_changes([new.id, other.id], [old.id], facts)
    assert added == [other.id] and removed == [] and changed == [(old.id, new.id)]


def test_history_resolves_revisions_like_git(tmp_path):
    lg = new_ledger(tmp_path)
    c1 = commit_facts(lg, [fact("Prado", "Madrid")])
    c2 = commit_facts(lg, [fact("Big Ben", "Paris")])
    lg.checkout("side", create=True, start=c1)
    c3 = commit_facts(lg, [fact("Colosseum", "Rome")])
    lg.checkout("main")
    m = lg.merge("side")["head"]
    h = History(lg.store)
    assert h.resolve("HEAD") == m and h.resolve("HEAD^") == c2 and h.resolve("HEAD^2") == c3
    assert h.resolve("HEAD~2") == c1 and h.resolve(c3[:8]) == c3 and h.resolve("side~1") == c1
    assert h.first_parent_chain(m) == [m, c2, c1]
    assert h.ancestors(c3) == {c1, c3} and h.merge_base(c2, c3) == c1
    for bad in ("HEAD~9", "HEAD^3", "nope", ""):
        with pytest.raises(RevisionError):
            h.resolve(bad) if bad else h.resolve("  ")
    assert set(h.state(m)) == set(h.state(c2)) | set(h.state(c3))
    assert h.count_in_force(m) == 3 and h.delta(c2) == ({fact("Big Ben", "Paris").id}, set())
    assert [f.subject for f in h.facts_in_force(m)] == ["Prado", "Big Ben", "Colosseum"]
    lg.close()


@pytest.mark.parametrize("name", ["ok", "feature/x", "v1.2", "a_b-c"])
def test_branch_names_accepted(name):
    assert check_branch_name(name) == name


@pytest.mark.parametrize("name", ["-x", "a..b", "x/", "x.", "HEAD", "main\n", "sp ace", "0" * 40])
def test_branch_names_refused(name):
    with pytest.raises(UsageError):
        check_branch_name(name)


# ------------------------------------------------------------------------------ decisions
def test_decisions_find_hard_conflicts_and_replay_remembered(tmp_path):
    lg = new_ledger(tmp_path)
    rome, paris = fact("Eiffel Tower", "Rome"), fact("Eiffel Tower", "Paris")
    commit_facts(lg, [rome])
    lg.add([paris])
    d = Decisions(lg.store, lg.history, has_model=False)
    pf = d.proposed(staged=True)
    found = d.conflicts_of(pf)
    assert len(found) == 1 and set(found[0].fact_ids) == {rome.id, paris.id}
    assert d.soft_threshold() is None  # no model, no keys, no soft conflicts
    res = lg.resolve_conflicts(keep="Paris")
    assert res["commit"] and lg.state(lg.head()).keys() == {paris.id}
    # the same conflict again: the remembered decision is replayed
    ops, left, entries = d.replay({paris.id}, [Op(OP_ADD, rome.id)], [rome.id])
    assert left == [] and entries[0]["keep"] == ["paris"] and entries[0]["remembered"]
    assert ops == []  # the incoming loser is left out
    lg.close()


def test_drop_leaves_out_adds_and_retracts_facts_in_force():
    ops = [Op(OP_ADD, "a"), Op(OP_ADD, "b")]
    assert drop({"c"}, ops, {"a", "c"}) == [Op(OP_ADD, "b"), Op(OP_RETRACT, "c")]


def test_parse_threshold():
    assert parse_threshold("off") == "off" and float(parse_threshold("default")) > 0.9
    assert parse_threshold(" 0.5 ") == "0.5"
    for bad in ("0", "1.5", "nan", "x"):
        with pytest.raises(UsageError):
            parse_threshold(bad)


# ------------------------------------------------------------------------------ properties
fact_lists = st.lists(st.tuples(st.sampled_from(SUBJECTS), st.sampled_from(CITIES)), min_size=1, max_size=4)
histories = st.lists(fact_lists, min_size=1, max_size=5)
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(history=histories)
def test_property_export_then_init_from_round_trips_every_id(tmp_path_factory, history):
    tmp = tmp_path_factory.mktemp("rt")
    lg = new_ledger(tmp, "a")
    ids = commit_all(lg, history)
    lg.create_branch("side", ids[0])
    lg.export(tmp / "text")
    back = Ledger.init_from(tmp / "b", tmp / "text", env=ENV)
    assert back.store.commit_order().keys() == lg.store.commit_order().keys()
    assert back.store.refs() == lg.store.refs() and back.store.head() == lg.store.head()
    assert back.state(back.head()) == lg.state(lg.head())
    assert back.fsck()["ok"]
    lg.close()
    back.close()


@SETTINGS
@given(history=histories, data=st.data())
def test_property_diff_of_a_revision_with_itself_is_empty(tmp_path_factory, history, data):
    lg = new_ledger(tmp_path_factory.mktemp("diff"))
    ids = commit_all(lg, history)
    rev = data.draw(st.sampled_from(ids))
    assert lg.diff(rev, rev)["counts"] == {"added": 0, "removed": 0, "changed": 0}
    a, b = data.draw(st.sampled_from(ids)), data.draw(st.sampled_from(ids))
    d = lg.diff(a, b, with_facts=False)["counts"]
    e = lg.diff(b, a, with_facts=False)["counts"]
    assert d["added"] == e["removed"] and d["removed"] == e["added"] and d["changed"] == e["changed"]
    lg.close()


@SETTINGS
@given(history=histories, data=st.data())
def test_property_revert_equals_the_history_without_the_commit(tmp_path_factory, history, data):
    """The facts in force after reverting a commit are those of the history without it, wherever
    no later commit touched the same facts."""
    lg = new_ledger(tmp_path_factory.mktemp("rev"))
    ids = commit_all(lg, history)
    target = data.draw(st.sampled_from(ids))
    added, removed = lg.history.delta(target)
    before = set(lg.state(lg.head()))
    later = set().union(*(lg.history.delta(c)[0] | lg.history.delta(c)[1] for c in ids[ids.index(target) + 1:]))
    if (added - before) or not (added & before):  # nothing of it left in force: nothing to revert
        return
    lg.revert(target, allow_conflicts=True)
    after = set(lg.state(lg.head()))
    untouched = (added | removed) - later
    assert after & untouched == (before - added | removed) & untouched
    lg.close()


def test_commit_record_ids_are_content_hashes():
    c = Commit(parents=(), ops=(Op(OP_ADD, "f"),), message="m", author="a", timestamp="t")
    assert c.id == Commit(parents=(), ops=(Op(OP_ADD, "f"),), message="m", author="a", timestamp="t").id
    assert c.id != Commit(parents=(), ops=(Op(OP_ADD, "f"),), message="n", author="a", timestamp="t").id
    with pytest.raises(InputError):
        Fact.create("The tower is in", "Rome", "bridge")


# ------------------------------------------------------------------------------ layering
PKG = __import__("pathlib").Path(__file__).resolve().parents[1] / "kledger"


def _imports(path) -> set[str]:
    """Absolute names of the kledger modules `path` imports (relative imports resolved)."""
    import ast

    rel = path.relative_to(PKG.parent).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("kledger")}


def test_layers_point_one_way():
    files = {p: _imports(p) for p in PKG.rglob("*.py")}
    for path, imported in files.items():
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        if name.startswith("kledger.cli"):
            assert not any(m.startswith(("kledger.edit", "kledger.model_side", "kledger.commits", "kledger.store",
                                         "kledger.history", "kledger.decisions")) for m in imported), \
                f"{name} reaches below the facade: {sorted(imported)}"
        if name.startswith("kledger.edit"):
            assert not any(m.startswith(("kledger.ledger", "kledger.history", "kledger.decisions", "kledger.commits",
                                         "kledger.model_side", "kledger.cli", "kledger.transfer")) for m in imported), \
                f"{name} knows about ledgers: {sorted(imported)}"
        if name != "kledger.settings":
            assert "os.environ" not in path.read_text(), f"{name} reads os.environ (use kledger.settings)"
        if name in ("kledger.history", "kledger.decisions", "kledger.store", "kledger.records", "kledger.transfer"):
            assert not any(m.startswith(("kledger.ledger", "kledger.cli", "kledger.commits")) for m in imported), \
                f"{name} imports a layer above it"


def test_modules_and_functions_stay_small():
    import ast

    for path in PKG.rglob("*.py"):
        src = path.read_text()
        assert len(src.splitlines()) <= 650, f"{path.name} has {len(src.splitlines())} lines"
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 55, f"{path.name}:{node.lineno} {node.name} has {n} lines"


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    """CI logs and redirected output get a line when a stage starts, at most every 10 s, and when
    it ends (once), never minutes of silence."""
    from kledger.cli.output import progress_bar

    with progress_bar() as update:  # pytest's stderr is not a terminal
        update("values", 0, 25)
        update("values", 1, 25)  # within 10 s of the last line: not said
        update("values", 25, 25)
        update("values", 25, 25)  # the end is said once
        update("layers", 0, 5)
        update("values", 0, 25)  # the stage runs again (the next commit of a replay): said again
        update("values", 25, 25)
        update("values", 0, 25)
        update.note("values", "stopped after 9 of 25 steps")  # a stage that ends early says why
        update("values", 9, 9)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["kledger: values 0/25", "kledger: values 25/25",
                                                   "kledger: layers 0/5", "kledger: values 0/25",
                                                   "kledger: values 25/25", "kledger: values 0/25",
                                                   "kledger: values: stopped after 9 of 25 steps",
                                                   "kledger: values 9/9"]
