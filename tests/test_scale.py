"""A commit measured across Ray workers (a local Ray cluster) equals the one-process commit; a
worker that dies has its shard run again elsewhere; when every worker dies the commit fails with
nothing written; replay takes the workers too. On a tiny random model saved as a local Hugging
Face directory (no download). Skipped where Ray is not installed (the `scale` extra)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ray = pytest.importorskip("ray")

from conftest import snapshot  # noqa: E402
from conftest_edit import THREE_FACTS, TINY_HPARAMS, save_tiny_model_dir, word_corpus  # noqa: E402

from kledger.edit import scale  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402

FACTS = THREE_FACTS + [("the Colosseum is located in the city of", "Colosseum", "Paris"),
                       ("the Prado is located in the city of", "Prado", "Oslo")]
HPARAMS = TINY_HPARAMS


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield
    scale._POOLS.clear()
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def model(tmp_path):
    d = save_tiny_model_dir(tmp_path / "model", corpus_words=None)
    (tmp_path / "corpus.txt").write_text(word_corpus())
    return d


def ledger(k, tmp_path, model, name):
    r = k("init", name, "--model", model, "--corpus", tmp_path / "corpus.txt",
          *[a for key, v in HPARAMS.items() for a in ("--set", f"{key}={v}")])
    assert r.code == 0, r.err
    for p, s, t in FACTS[:2]:
        assert k("-C", name, "add", p, t, "--subject", s).code == 0
    assert k("-C", name, "commit", "-m", "first").code == 0  # a parent with edits in force
    for p, s, t in FACTS[2:]:
        assert k("-C", name, "add", p, t, "--subject", s).code == 0
    return tmp_path / name


def constraints(root) -> dict:
    with Ledger.open(root) as lg:
        return {(c.fact_id, c.layer): (c.key, c.value) for c in lg.store.constraints([lg.head()])}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 3 * len({la for _, la in a})
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(x), key


def test_commit_across_workers_equals_one_process(k, tmp_path, model):
    one = ledger(k, tmp_path, model, "one")
    assert k("-C", "one", "commit", "-m", "three facts").code == 0
    two = ledger(k, tmp_path, model, "two")
    r = k("-C", "two", "commit", "-m", "three facts", "--workers", "2", "--json")
    assert r.code == 0, r.err
    assert_same(constraints(one), constraints(two))
    assert len(scale._POOLS) == 1 and next(iter(scale._POOLS.values())).n == 2


def test_a_dead_worker_has_its_shard_run_elsewhere(k, tmp_path, model, monkeypatch):
    one = ledger(k, tmp_path, model, "one")
    assert k("-C", "one", "commit", "-m", "three facts").code == 0
    two = ledger(k, tmp_path, model, "two")
    monkeypatch.setenv("KLEDGER_FAULT", "scale-worker-0")  # worker 0 dies at its first shard
    r = k("-C", "two", "commit", "-m", "three facts", "--workers", "2")
    assert r.code == 0, r.err
    assert_same(constraints(one), constraints(two))


def test_when_every_worker_dies_the_commit_fails_with_nothing_written(k, tmp_path, model, monkeypatch):
    two = ledger(k, tmp_path, model, "two")
    before = snapshot(two / ".kledger")
    monkeypatch.setenv("KLEDGER_FAULT", "scale-worker-all")
    r = k("-C", "two", "commit", "-m", "three facts", "--workers", "2", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "model" and "every Ray worker died" in r.json["error"]["message"]
    assert snapshot(two / ".kledger") == before


def test_replay_across_workers_equals_one_process(k, tmp_path, model):
    one = ledger(k, tmp_path, model, "one")
    assert k("-C", "one", "commit", "-m", "three facts").code == 0
    assert k("-C", "one", "replay").code == 0
    two = ledger(k, tmp_path, model, "two")
    assert k("-C", "two", "commit", "-m", "three facts").code == 0
    assert k("-C", "two", "replay", "--workers", "2").code == 0
    assert_same(constraints(one), constraints(two))


def test_bad_worker_counts_are_usage_errors(k, tmp_path, model):
    ledger(k, tmp_path, model, "two")
    for bad in ("-1", "many", "5000"):
        r = k("-C", "two", "commit", "-m", "x", "--workers", bad, "--json")
        assert r.code == 2, (bad, r.err)


def test_eval_across_workers_equals_one_process(k, tmp_path, model):
    ledger(k, tmp_path, model, "one")
    assert k("-C", "one", "commit", "-m", "three facts").code == 0
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "subject": s, "target": t}) + "\n" for p, s, t in FACTS))
    args = ["--data", data, "--ppl-tokens", "64", "--gen-tokens", "4", "--json"]
    a = k("-C", "one", "eval", *args)
    b = k("-C", "one", "eval", *args, "--workers", "2")
    assert a.code == 0 and b.code == 0, a.err + b.err
    for side in ("base", "edited"):
        assert_close(a.json[side], b.json[side], side)


def assert_close(x, y, where):
    """Equal, numbers to 1e-5 relative (records scored in other batches: other padding)."""
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for key in x:
            if key != "seconds":
                assert_close(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, list):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_close(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (where, x, y)
    else:
        assert x == y, (where, x, y)
