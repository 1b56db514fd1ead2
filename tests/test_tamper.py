"""Tampering with a model ledger's stored constraints or its apply cache: detected before anything
is solved (`apply`, `ask`, `eval`, a commit's parent solve refuse with one line pointing to
`kledger fsck`), and reported by fsck. On a tiny random Llama (no download)."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import snapshot  # noqa: E402
from conftest_edit import FACTS, save_tiny_model_dir  # noqa: E402

from kledger.edit.cache import read_cache, write_cache  # noqa: E402
from kledger.errors import IntegrityError  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402

SETTINGS = {"hparams": {"c0_tokens": 1200, "c0_seq_len": 64, "steps": 3, "n_prefixes": 1, "lam": 5.0}}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A ledger with 2 commits of 2 facts, applied once (so the apply cache holds HEAD)."""
    model_dir = save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-tamper"))
    root = tmp_path_factory.mktemp("clean")
    lg = Ledger.init(root, model=str(model_dir), settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    for i in range(2):
        lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2 * i:2 * i + 2]])
        lg.commit(f"batch {i}", author="t")
    lg.apply()
    lg.close()
    return root


@pytest.fixture
def ledger(clean, tmp_path):
    """A fresh copy of the clean ledger, opened for writing."""
    shutil.copytree(clean / ".kledger", tmp_path / ".kledger")
    lg = Ledger.open(tmp_path, write=True)
    yield lg
    lg.close()


def tamper(lg: Ledger, sql: str) -> None:
    lg.store.con.execute(sql)
    lg.history.changed()


def refused(lg: Ledger) -> None:
    """Every path that solves refuses with one line pointing to fsck, and writes nothing."""
    path = lg.path
    lg.close()
    before = snapshot(path)
    with Ledger.open(path, write=True) as lg2:
        for call in (lambda: lg2.apply(),
                     lambda: lg2.ask("the Louvre is located in the city of", top=2, max_new_tokens=1),
                     lambda: lg2.evaluate(ppl_tokens=0, gen_tokens=0)):
            with pytest.raises(IntegrityError) as exc:
                call()
            assert "fsck" in exc.value.one_line() and "\n" not in exc.value.one_line()
        assert not lg2.fsck()["ok"]
    assert snapshot(path) == before  # the refused apply, ask and eval wrote nothing
    with Ledger.open(path, write=True) as lg2:
        lg2.add([Fact.create(FACTS[5][0], FACTS[5][2], subject=FACTS[5][1])])
    staged = snapshot(path)
    with Ledger.open(path, write=True) as lg2, pytest.raises(IntegrityError):
        lg2.commit("more", author="t")  # measuring a new fact solves HEAD first
    assert snapshot(path) == staged
    with Ledger.open(path, write=True) as lg2:
        lg2.reset()
    assert {k: v for k, v in snapshot(path).items() if k != "facts"} == {k: v for k, v in before.items() if k != "facts"}


def test_clean_ledger_applies_and_passes_fsck(ledger):
    assert ledger.fsck()["ok"] and ledger.apply()["cached"]


def test_flipped_value_bytes_are_refused(ledger):
    rowid, value = ledger.store.con.execute(
        "SELECT rowid, value FROM constraints WHERE rowid = (SELECT min(rowid) FROM constraints)").fetchone()
    flipped = bytes([value[0] ^ 0x40]) + bytes(value[1:])
    ledger.store.con.execute("UPDATE constraints SET value = ? WHERE rowid = ?", [flipped, rowid])
    refused(ledger)


def test_a_deleted_layer_row_is_refused(ledger):
    tamper(ledger, "DELETE FROM constraints WHERE rowid = (SELECT max(rowid) FROM constraints)")
    refused(ledger)


def test_changed_shape_and_dtype_columns_are_refused(ledger):
    tamper(ledger, "UPDATE constraints SET d_in = d_in - 1 WHERE rowid = (SELECT min(rowid) FROM constraints)")
    refused(ledger)
    ledger = Ledger.open(ledger.path, write=True)  # (refused closed it)
    tamper(ledger, "UPDATE constraints SET d_in = d_in + 1, dtype = 'float64' WHERE rowid = (SELECT min(rowid) FROM constraints)")
    with pytest.raises(IntegrityError):
        ledger.apply()
    problems = ledger.fsck()["problems"]
    assert any("cannot be read" in p or "constraints hash" in p for p in problems)
    ledger.close()


def test_a_forged_cache_entry_is_not_served(ledger):
    """An entry rewritten outside kledger, with a valid-looking MAC made without the ledger's
    secret, is deleted and solved again."""
    first = ledger.apply()
    path = ledger.path / "cache" / "apply" / f"{first['cache_key']}.safetensors"
    secret = ledger.store.meta("apply_cache_secret")
    weights = read_cache(path, first["cache_key"], secret)
    assert weights is not None
    forged = {la: w * 1.5 for la, w in weights.items()}
    write_cache(path, first["cache_key"], forged, "0" * 64)  # the format is public, the secret is not
    assert read_cache(path, first["cache_key"], secret) is None and not path.exists()
    ledger._editor = None
    again = ledger.apply()
    assert not again["cached"]  # solved again, not served from the forged file
    solved = read_cache(path, first["cache_key"], secret)
    assert all(torch.allclose(torch.from_numpy(solved[la]), torch.from_numpy(weights[la])) for la in weights)



def test_a_forged_inverse_of_the_prior_is_not_used(ledger):
    """The kept inverse of λC0 (kledger.edit.prior) rewritten outside kledger with a MAC made
    without the ledger's secret: the small solve computes it again and gives the same weights."""
    from kledger.edit.prior import PRIOR_FORMAT

    first = ledger.apply()
    secret = ledger.store.meta("apply_cache_secret")
    (path,) = (ledger.path / "cache" / "prior").glob("*.safetensors")
    key = path.stem
    M = read_cache(path, key, secret, fmt=PRIOR_FORMAT, dtype="<f8")
    assert M is not None
    write_cache(path, key, {la: m * 3.0 for la, m in M.items()}, "0" * 64, fmt=PRIOR_FORMAT, dtype="<f8")
    before = read_cache(ledger.path / "cache" / "apply" / f"{first['cache_key']}.safetensors", first["cache_key"], secret)
    shutil.rmtree(ledger.path / "cache" / "apply")
    ledger._editor = None
    again = ledger.apply()
    assert not again["cached"]
    solved = read_cache(ledger.path / "cache" / "apply" / f"{first['cache_key']}.safetensors", first["cache_key"], secret)
    assert all((solved[la] == before[la]).all() for la in before)  # bit for bit: M computed again
    assert read_cache(path, key, secret, fmt=PRIOR_FORMAT, dtype="<f8") is not None  # and kept again

# ------------------------------------------------------------------------------ fsck's coverage
@pytest.fixture
def facts_only(tmp_path, monkeypatch):
    monkeypatch.setenv("KLEDGER_AUTHOR", "t")
    lg = Ledger.init(tmp_path / "f", model="none")
    for i in range(3):
        lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2 * i:2 * i + 2]])
        lg.commit(f"batch {i}")
    yield lg
    lg.close()


def fsck_says(lg: Ledger, needle: str) -> None:
    lg.history.changed()
    problems = lg.fsck()["problems"]
    assert any(needle in p for p in problems), problems


def test_fsck_sees_changed_matching_keys(facts_only):
    facts_only.store.con.execute("UPDATE facts SET subject_key = 'someone else' WHERE rowid = 1")
    fsck_says(facts_only, "matching keys do not match")


def test_fsck_sees_a_scaled_c0(ledger):
    blob = ledger.store.con.execute("SELECT matrix FROM stats LIMIT 1").fetchone()[0]
    import numpy as np

    scaled = (np.frombuffer(blob, dtype="<f8") * 4).tobytes()
    ledger.store.con.execute("UPDATE stats SET matrix = ? WHERE rowid = (SELECT min(rowid) FROM stats)", [scaled])
    fsck_says(ledger, "does not match its checksum")
    ledger._editor = None
    with pytest.raises(IntegrityError):  # C0 is read to solve
        ledger.apply(mode="alphaedit")


def test_fsck_sees_order_cycles_dangling_staged_and_a_bad_head(facts_only):
    con = facts_only.store.con
    head = facts_only.head()
    con.execute("UPDATE commits SET seq = 100 WHERE id = (SELECT id FROM commits ORDER BY seq LIMIT 1)")
    fsck_says(facts_only, "stored before its parent")
    con.execute("INSERT INTO staged VALUES (0, 'add', 'ffffffffffff')")
    fsck_says(facts_only, "staged fact ffffffffff is missing")
    con.execute("UPDATE meta SET value = 'ref: no such' WHERE key = 'HEAD'")
    fsck_says(facts_only, "not a valid branch name")
    # a branch rewound outside kledger (to a commit that exists: only the record of moves shows it)
    con.execute("UPDATE meta SET value = 'ref: main' WHERE key = 'HEAD'")
    root_commit = facts_only.first_parent_chain(head)[-1]
    con.execute("UPDATE refs SET commit_id = ? WHERE name = 'main'", [root_commit])
    fsck_says(facts_only, "branch main: moved outside kledger")
    con.execute("UPDATE refs SET commit_id = ? WHERE name = 'main'", [head])
    # a parent cycle: walks refuse instead of never returning
    con.execute("UPDATE meta SET value = 'ref: main' WHERE key = 'HEAD'")
    root = facts_only.first_parent_chain(head)[-1]
    con.execute("UPDATE commits SET parents = [?] WHERE id = ?", [head, root])
    facts_only.history.changed()
    with pytest.raises(IntegrityError, match="its own ancestor"):
        facts_only.status()


# ------------------------------------------------------------------------------ the base model
def _edit_model(model_dir, change) -> None:
    """Rewrite the model directory with `change(model)` applied (as a tamperer with write access
    to the model's files would)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        change(model)
    model.save_pretrained(model_dir)


@pytest.mark.parametrize("where", ["embeddings", "edited layer"])
def test_a_changed_base_model_is_refused_and_nothing_is_written(tmp_path, where):
    from kledger.errors import FingerprintError

    model_dir = save_tiny_model_dir(tmp_path / "model")
    with Ledger.init(tmp_path / "l", model=str(model_dir),
                     settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")}) as lg:
        lg.add([Fact.create(FACTS[0][0], FACTS[0][2], subject=FACTS[0][1])])
        lg.commit("one", author="t")
        lg.apply()
        layer = lg.editor().hparams.layers[0]
    if where == "embeddings":
        _edit_model(model_dir, lambda m: m.get_input_embeddings().weight.mul_(1.5))
    else:
        _edit_model(model_dir, lambda m: m.model.layers[layer].mlp.down_proj.weight.add_(0.01))
    before = snapshot(tmp_path / "l")
    with Ledger.open(tmp_path / "l", write=True) as lg:
        with pytest.raises(FingerprintError) as exc:
            lg.apply(mode="no-history")  # (another mode: no cache entry to answer from)
        assert ("outside the edited layers" if where == "embeddings" else "base model weights") in exc.value.message
    assert snapshot(tmp_path / "l") == before  # no C0, memo or anything else stored by the refused apply
