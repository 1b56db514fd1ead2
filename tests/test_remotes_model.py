"""Remotes carry what a ledger measured: a clone applies to weights bit-identical to the origin's
without measuring anything, C0 travels once, a later pack holds only its commit's constraints, and
`check` on a clone needs no torch. On a tiny random model saved as a local Hugging Face directory
(no download), through both kinds of remote (a directory, S3 on a local server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from conftest_edit import THREE_FACTS, TINY_HPARAMS, save_tiny_model_dir, word_corpus  # noqa: E402
from conftest_remote import names, read, refs, size  # noqa: E402

from kledger.edit import engine  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402
from kledger.store.packs import MANIFEST  # noqa: E402

FACTS, HPARAMS = THREE_FACTS, TINY_HPARAMS


def ok(r):
    assert r.code == 0, r.err
    return r.json


def pushed_ledger(tmp_path, remote_url, hparams=HPARAMS) -> str:
    """Ledger `a` (tiny model) with one commit for each of two facts, pushed to `remote_url`."""
    model = save_tiny_model_dir(tmp_path / "model", corpus_words=None)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(word_corpus())
    lg = Ledger.init(tmp_path / "a", model=str(model), settings={"hparams": hparams, "corpus": str(corpus)})
    for i, (p, s, t) in enumerate(FACTS[:2]):
        lg.add([Fact.create(p, t, subject=s)])
        lg.commit(f"fact {i}", author="t")
    lg.add_remote("origin", remote_url)
    assert lg.push()["commits"] == 2
    lg.close()
    return remote_url


@pytest.fixture
def origin(tmp_path, remote_url):
    return pushed_ledger(tmp_path, remote_url)


def packs(remote):
    return [json.loads(read(remote, "packs", p, MANIFEST)) for p in refs(remote)["packs"]]


def test_clone_applies_bit_identical_weights_without_measuring(k, origin, tmp_path, monkeypatch):
    a = ok(k("-C", "a", "apply", "--delta", tmp_path / "a.safetensors", "--json"))
    monkeypatch.setattr(engine, "compute_constraints", lambda *x, **kw: pytest.fail("measured on the clone"))
    monkeypatch.setattr(engine, "optimise_values", lambda *x, **kw: pytest.fail("measured on the clone"))
    ok(k("clone", origin, "b", "--json"))
    b = ok(k("-C", "b", "apply", "--delta", tmp_path / "b.safetensors", "--json"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert {**a, "delta": None, "manifest": None, "cached": None} == {**b, "delta": None, "manifest": None,
                                                                       "cached": None}
    assert ok(k("-C", "b", "fsck", "--json"))["ok"]
    (first,) = packs(origin)
    assert first["stats"] and first["files"]["stats"]["rows"] == len(first["stats"]) > 0  # C0, per edited layer
    assert first["files"]["constraints"]["rows"] == 2 * len(first["stats"])  # 2 facts × the edited layers


def test_later_pack_holds_only_its_commit(k, origin, tmp_path):
    ok(k("clone", origin, "b", "--json"))
    with Ledger.open(tmp_path / "a", write=True) as lg:
        p, s, t = FACTS[2]
        lg.add([Fact.create(p, t, subject=s)])
        lg.commit("fact 2", author="t")
        lg.push()
    first, second = packs(origin)
    assert second["stats"] == [] and second["files"]["stats"]["rows"] == 0  # C0 travelled once
    assert second["files"]["commits"]["rows"] == 1 and second["files"]["facts"]["rows"] == 1
    assert 2 * second["files"]["constraints"]["rows"] == first["files"]["constraints"]["rows"]  # 1 fact of 2
    got = ok(k("-C", "b", "pull", "--json"))
    newest = refs(origin)["packs"][-1]
    assert got["fetch"]["packs"] == 1
    assert got["fetch"]["bytes"] == sum(size(origin, "packs", newest, n) for n in names(origin, "packs", newest))
    a = ok(k("-C", "a", "apply", "--json"))
    b = ok(k("-C", "b", "apply", "--json"))
    assert a["cache_key"] == b["cache_key"] and a["facts"] == b["facts"] == 3


def test_check_on_a_clone_imports_no_torch(k, origin, tmp_path):
    ok(k("clone", origin, "b", "--json"))
    code = textwrap.dedent("""
        import sys
        from kledger.cli.main import run
        try:
            run(["-C", sys.argv[1], "check", "--json"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("HEAVY", [m for m in ("torch", "transformers") if m in sys.modules], file=sys.stderr)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr and json.loads(r.stdout)["ok"] is True


def test_two_key_readings_travel_and_apply_identically(k, tmp_path, remote_url):
    """A ledger with two key readings per fact (key_readings=2: [2, d] rows per constraint) pushes
    and clones like any other: the clone applies to the same weights without measuring, its
    constraints are the origin's rows, and fsck passes on both."""
    pushed_ledger(tmp_path, remote_url, {**HPARAMS, "key_readings": 2})
    a = ok(k("-C", "a", "apply", "--delta", tmp_path / "a.safetensors", "--json"))
    ok(k("clone", remote_url, "b", "--json"))
    b = ok(k("-C", "b", "apply", "--delta", tmp_path / "b.safetensors", "--json"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a["facts"] == b["facts"] == 2
    with Ledger.open(tmp_path / "a") as la, Ledger.open(tmp_path / "b") as lb:
        ra = la.store.constraints(la.store.commit_order())
        rb = lb.store.constraints(lb.store.commit_order())
        assert len(ra) == len(rb) > 0 and all(r.key.shape[0] == 2 for r in rb)
        assert all((x.key == y.key).all() and (x.value == y.value).all() for x, y in zip(ra, rb))
    assert ok(k("-C", "b", "fsck", "--json"))["ok"]
