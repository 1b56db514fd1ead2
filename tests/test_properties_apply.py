"""Property-based tests (hypothesis) of what `apply` promises, on a tiny random Llama (no
download): applying any subset of the commits equals the one-shot solve over exactly the stored
constraints of those commits, and reverting a commit equals the solve without its constraints.
The reference solve reads the stored constraints by commit (`Store.constraints`), a path
independent of the history's constraints-in-force query that `apply` uses."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_edit import FACTS, save_tiny_model_dir  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kledger.edit.solve import rel_fro, solve_layer  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402

SETTINGS = {"hparams": {"c0_tokens": 1200, "c0_seq_len": 64, "steps": 4, "n_prefixes": 1, "lam": 5.0}}
N_COMMITS = 4
TOL = 1e-5  # float32 weights against the float64 one-shot solve
_names = itertools.count()


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """4 commits of 2 facts each on main, made one after another (sequential editing)."""
    model_dir = save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-prop"))
    lg = Ledger.init(tmp_path_factory.mktemp("ledger"), model=str(model_dir),
                     settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    ids = []
    for i in range(N_COMMITS):
        lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2 * i:2 * i + 2]])
        ids.append(lg.commit(f"batch {i}", author="t"))
    yield lg, ids
    lg.close()


def one_shot(lg: Ledger, commits: list[str]) -> dict[int, torch.Tensor]:
    """The one-shot solve over exactly the stored constraints of `commits`, per edited layer."""
    ed = lg.editor()
    rows = lg.store.constraints(commits)
    out = {}
    for la in ed.hparams.layers:
        sel = sorted((r for r in rows if r.layer == la), key=lambda r: r.fact_id)
        K = torch.stack([torch.from_numpy(r.key) for r in sel]) if sel else torch.zeros(0, ed.W0[la].shape[1])
        V = torch.stack([torch.from_numpy(r.value) for r in sel]) if sel else torch.zeros(0, ed.W0[la].shape[0])
        out[la] = solve_layer(ed.W0[la], K, V, ed.c0()[la], ed.hparams.lam)
    return out


def applied(lg: Ledger, rev: str) -> dict[int, torch.Tensor]:
    """What `apply REV` writes into the model's edited layers."""
    weights, info = lg.editor().solve(lg.history.constraints_at(lg.resolve(rev)))
    assert info["mode"] == "accumulated"
    return weights


def branch_without(lg: Ledger, ids: list[str], dropped: set[str]) -> str:
    """A new branch at main's tip with the commits in `dropped` reverted; its name."""
    name = f"prop-{next(_names)}"
    lg.checkout(name, create=True, start=ids[-1])
    for cid in sorted(dropped, key=ids.index, reverse=True):
        lg.revert(cid, author="t")
    lg.checkout("main")
    return name


PROPS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(keep=st.sets(st.integers(0, N_COMMITS - 1), min_size=1))
def test_apply_of_any_subset_is_the_one_shot_solve_of_its_constraints(ledger, keep):
    lg, ids = ledger
    kept = [ids[i] for i in sorted(keep)]
    rev = branch_without(lg, ids, set(ids) - set(kept))
    got, want = applied(lg, rev), one_shot(lg, kept)
    assert set(lg.state(lg.resolve(rev))) == {r.fact_id for r in lg.store.constraints(kept)}
    for la, W in want.items():
        assert rel_fro(got[la].double(), W) < TOL, (la, sorted(keep))


@PROPS
@given(i=st.integers(0, N_COMMITS - 1))
def test_revert_of_a_commit_is_the_solve_without_its_constraints(ledger, i):
    lg, ids = ledger
    rev = branch_without(lg, ids, {ids[i]})
    want = one_shot(lg, [c for c in ids if c != ids[i]])
    got = applied(lg, rev)
    for la, W in want.items():
        assert rel_fro(got[la].double(), W) < TOL, la
    # and reverting it changes the weights: the commit's constraints were in the solve
    full = applied(lg, "main")
    assert any(rel_fro(full[la].double(), W) > 1e-4 for la, W in want.items())
