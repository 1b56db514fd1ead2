"""Writes proportional to the change: the targeted queries (facts in force among a few ids, conflict
candidates near the added facts, a commit's delta from its own ops) give exactly what the full
computations give, on random histories with hard and inverse contradictions, branches and merges."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kledger.history import apply_ops
from kledger.ledger import Ledger
from kledger.records import OP_ADD, OP_RETRACT, Fact, Op

PROPS = settings(max_examples=25, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SUBJECTS = ["Alpha", "Beta", "Gamma", "Delta"]
CITIES = ["Rome", "Paris", "Oslo"]
OBJECTS = ["France", "Japan", "Rome", "Paris"]


def fact(kind: int, s: int, o: int) -> Fact:
    """Three relations: a capital (inverse of "{} is the capital of"), its inverse, and a plain one;
    small pools so that hard and inverse contradictions are common."""
    if kind == 0:
        return Fact.create(f"The capital of {SUBJECTS[s]} is", CITIES[o % len(CITIES)], subject=SUBJECTS[s])
    if kind == 1:
        city = CITIES[s % len(CITIES)]
        return Fact.create(f"{city} is the capital of", SUBJECTS[o % len(SUBJECTS)], subject=city)
    return Fact.create(f"{SUBJECTS[s]} is located in the country of", OBJECTS[o % len(OBJECTS)], subject=SUBJECTS[s])


facts_st = st.lists(st.builds(fact, st.integers(0, 2), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=4)


def build(path, batches: list[list[Fact]], branch_at: int | None) -> Ledger:
    lg = Ledger.init(path, model="none")
    lg.set_inverse("The capital of {} is", "{} is the capital of")
    for i, batch in enumerate(batches):
        if branch_at is not None and i == branch_at and lg.head():
            lg.create_branch("side")
        if lg.add(batch)["staged"]:
            lg.commit(f"batch {i}", author="t <t@x.invalid>", allow_conflicts=True)
    if branch_at is not None and "side" in {b["name"] for b in lg.branches()}:
        main = lg.current_branch()
        lg.checkout("side")
        lg.add([fact(2, 3, 1), fact(0, 2, 2)])
        lg.commit("on side", author="t <t@x.invalid>", allow_conflicts=True)
        lg.checkout(main)
        try:
            lg.merge("side", author="t <t@x.invalid>", no_ff=True, allow_conflicts=True)
        except Exception:  # nothing to merge is fine
            pass
    return lg


@PROPS
@given(batches=st.lists(facts_st, min_size=1, max_size=5), branch_at=st.none() | st.integers(0, 4),
       new=facts_st, retract=st.lists(st.integers(0, 50), max_size=3))
def test_targeted_queries_match_the_full_ones(tmp_path_factory, batches, branch_at, new, retract):
    lg = build(tmp_path_factory.mktemp("w"), batches, branch_at)
    try:
        h = lg.history
        for cid in h.graph():
            full = h.store.in_force(h.first_parent_chain(cid))
            assert h.count_in_force(cid) == len(full)
            some = list(full)[::2] + ["0" * 64]
            assert h.store.in_force_of(h.first_parent_chain(cid), some) == {i: full[i] for i in some if i in full}
            parents = h.graph()[cid]
            before = set(h.store.in_force(h.first_parent_chain(parents[0]))) if parents else set()
            assert h.delta(cid) == (set(full) - before, before - set(full))
        d = lg.decisions
        for flip in (False, True):
            if flip:  # the relation rules change: the records no longer apply, and are not used
                lg.set_multi("{} is the capital of", True)
            for cid in h.graph():
                full = h.store.conflict_candidates_at(h.first_parent_chain(cid))[1]
                assert d.candidates_at(cid) == full
                pf = d.proposed(cid, lazy=True)
                got = d.conflicts_of(pf)
                assert sorted(c.key for c in got) == sorted(c.key for c in d.conflicts_in(h.state(cid)))
                assert pf.n_facts == len(h.state(cid))
        head = lg.head()
        state = h.state(head)
        in_force = sorted(state)
        lg.store.put_facts(new)
        ops = [Op(OP_ADD, f.id) for f in new]
        ops += [Op(OP_RETRACT, in_force[i % len(in_force)]) for i in retract if in_force]
        added = [o.fact_id for o in ops if o.op == OP_ADD]
        targeted = lg.decisions.conflicts_after(head, ops, added)
        full = lg.decisions.conflicts_in(apply_ops(state, ops), involving=added)
        assert sorted(c.key for c in targeted) == sorted(c.key for c in full)
    finally:
        lg.close()


def test_one_fact_commit_refuses_a_contradiction_with_an_old_fact(tmp_path):
    """The targeted check still sees a fact committed long ago, and an inverse one."""
    lg = Ledger.init(tmp_path, model="none")
    lg.set_inverse("The capital of {} is", "{} is the capital of")
    lg.add([fact(0, 0, 0), fact(2, 1, 1)])
    lg.commit("old", author="t <t@x.invalid>")
    for i in range(5):
        lg.add([Fact.create(f"Filler {i} plays the", "piano", subject=f"Filler {i}")])
        lg.commit(f"filler {i}", author="t <t@x.invalid>")
    from kledger.errors import ConflictError

    for bad in (fact(2, 1, 2), fact(1, 0, 1)):  # another country for Beta; "Rome is the capital of Beta"
        lg.add([bad])
        try:
            lg.commit("bad", author="t <t@x.invalid>")
            raise AssertionError("not refused")
        except ConflictError:
            pass
        lg.reset()
    lg.close()


def test_counts_in_force_are_recorded_checked_and_optional(tmp_path):
    """`status` counts from the newest recorded count on the chain; with records missing (a ledger
    from before them) it counts what changed since an older one, or over the whole chain; fsck
    finds a wrong record; a ledger without the derived table is read as it is and gets it back
    when first opened for writing."""
    import duckdb

    lg = Ledger.init(tmp_path, model="none")
    for i in range(6):
        lg.add([Fact.create(f"Thing {i} plays the", "piano", subject=f"Thing {i}"),
                Fact.create(f"Other {i} plays the", "guitar", subject=f"Other {i}")])
        lg.commit(f"c{i}", author="t <t@x.invalid>")
    lg.remove("Thing 2")
    lg.commit("rm", author="t <t@x.invalid>")
    head = lg.head()
    assert lg.store.counts_in([head]) == {head: 11} and lg.status()["facts_in_force"] == 11
    chain = lg.history.first_parent_chain(head)
    lg.store.con.execute("DELETE FROM in_force_counts WHERE commit_id = ANY(?::VARCHAR[])", [chain[:4]])
    lg.history.changed()
    assert lg.status()["facts_in_force"] == 11  # from the count four commits back
    lg.store.con.execute("UPDATE in_force_counts SET n = 5 WHERE commit_id = ?", [chain[4]])
    lg.history.changed()
    assert lg.status()["facts_in_force"] == 5 + 6 - 1  # a wrong record is believed by status ...
    lg.store.put_count(head, 99)
    problems = lg.fsck()["problems"]
    assert any("recorded 99 facts in force, but 11 are" in p for p in problems)  # ... and fsck finds it
    lg.store.con.execute("DROP TABLE in_force_counts")
    for idx in ("commit_ops_fact", "facts_subject", "facts_object"):
        lg.store.con.execute(f"DROP INDEX {idx}")
    lg.close()
    with Ledger.open(tmp_path) as ro:  # a ledger from before the derived table, read as it is
        assert ro.status()["facts_in_force"] == 11
    con = duckdb.connect(str(tmp_path / ".kledger" / "ledger.duckdb"), read_only=True)
    assert not con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = 'in_force_counts'").fetchone()
    con.close()
    with Ledger.open(tmp_path, write=True) as rw:  # first opened for writing: made again
        assert rw.store.counts_in([head]) == {}
        rw.add([Fact.create("New one plays the", "piano", subject="New one")])
        cid = rw.commit("after", author="t <t@x.invalid>")
        assert rw.store.counts_in([cid]) == {cid: 12} and rw.fsck()["ok"]


def test_fsck_in_bulk_is_exact_on_unusual_content(tmp_path):
    """fsck hashes the facts from DuckDB's JSON and re-checks from the fact itself only where that
    text differs from the canonical one (numbers like 1e+20, control characters): no false alarm on
    such facts, and damage to either kind, or to a matching key, is found."""
    lg = Ledger.init(tmp_path, model="none")
    odd = [Fact.create(f"{w} plays the", "piano", subject=w, extra={"y": 1e20, "z": [0.1, None]})
           for w in ("Ctl\x01\x1f one", "Quote \" two", "Zoë three")]
    plain = [Fact.create(f"Plain {i} plays the", "guitar", subject=f"Plain {i}") for i in range(3)]
    lg.add(odd + plain)
    lg.commit("facts", author="t <t@x.invalid>")
    assert lg.fsck()["ok"]
    con = lg.store.con
    con.execute("UPDATE facts SET target = 'violin' WHERE id = ?", [odd[0].id])
    con.execute("UPDATE facts SET prompt = 'Plain 1 plays a' WHERE id = ?", [plain[1].id])
    con.execute("UPDATE facts SET subject_key = 'someone else' WHERE id = ?", [plain[2].id])
    problems = lg.fsck()["problems"]
    assert f"fact {odd[0].id[:10]}: content does not match its id" in problems
    assert f"fact {plain[1].id[:10]}: content does not match its id" in problems
    assert f"fact {plain[2].id[:10]}: its stored matching keys do not match its content" in problems
    assert len(problems) == 3
    lg.close()


def test_fsck_finds_damaged_records_and_lenient_json(tmp_path):
    """A wrong conflict-candidate record at a branch tip, and an `extra` field DuckDB would read but
    Python would not (a trailing comma), are found."""
    lg = Ledger.init(tmp_path, model="none")
    lg.add([fact(2, 0, 0), Fact.create("Plain plays the", "piano", subject="Plain", extra={"case_id": 7})])
    lg.commit("one", author="t <t@x.invalid>")
    lg.add([fact(2, 0, 1)])
    lg.commit("contradiction", author="t <t@x.invalid>", allow_conflicts=True)
    assert lg.fsck()["ok"] and lg.check()["unresolved"] == 1
    head = lg.head()
    lg.store.put_candidates(head, lg.store.rules_digest(), [])  # damage: the contradiction is hidden
    assert lg.check()["unresolved"] == 0
    assert f"commit {head[:10]}: its recorded contradiction candidates do not match its facts" in lg.fsck()["problems"]
    plain = Fact.create("Plain plays the", "piano", subject="Plain", extra={"case_id": 7})
    lg.store.con.execute("UPDATE facts SET extra = '{\"case_id\": 7,}' WHERE id = ?", [plain.id])
    assert f"fact {plain.id[:10]}: its stored extra fields are not valid JSON" in lg.fsck()["problems"]
    lg.close()
