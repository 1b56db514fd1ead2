"""A model loaded across devices (KLEDGER_MAX_MEMORY: accelerate's device_map, the rest offloaded
to disk) edits exactly as the model in one piece; a split that offloads an edited layer is refused.
On a tiny random model saved as a local Hugging Face directory, split on the CPU: its last decoder
layer, final norm and LM head go to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest_edit import TINY_HPARAMS, save_tiny_model_dir, word_corpus  # noqa: E402

from kledger.ledger import Ledger  # noqa: E402

HPARAMS = TINY_HPARAMS
FACTS = [("the capital of France is", "France", "Rome"), ("the Louvre is located in the city of", "Louvre", "Berlin")]
SPLIT = "cpu=140000"  # bytes: the embeddings and decoder layers 0-2 of the tiny model fit, layer 3 onwards does not
TOO_SMALL = "cpu=130000"  # layer 2, an edited layer, no longer fits


def make(k, tmp_path, name):
    r = k("init", name, "--model", tmp_path / "model", "--corpus", tmp_path / "corpus.txt",
          *[a for key, v in HPARAMS.items() for a in ("--set", f"{key}={v}")])
    assert r.code == 0, r.err
    for p, s, t in FACTS:
        assert k("-C", name, "add", p, t, "--subject", s).code == 0
    return k("-C", name, "commit", "-m", "two facts", "--json")


@pytest.fixture
def model(tmp_path, monkeypatch):
    save_tiny_model_dir(tmp_path / "model", corpus_words=None)
    (tmp_path / "corpus.txt").write_text(word_corpus())
    monkeypatch.setenv("KLEDGER_CACHE", str(tmp_path / "cache" / "models"))


def constraints(root):
    with Ledger.open(root) as lg:
        return {(c.fact_id, c.layer): (c.key, c.value) for c in lg.store.constraints([lg.head()])}


def test_split_model_edits_as_the_whole_one(k, tmp_path, model, monkeypatch):
    assert make(k, tmp_path, "whole").code == 0
    monkeypatch.setenv("KLEDGER_MAX_MEMORY", SPLIT)
    assert make(k, tmp_path, "split").code == 0
    with Ledger.open(tmp_path / "split") as lg:
        placed = lg.editor().lm.model.hf_device_map
    assert placed["model.layers.2"] == "cpu" and placed["model.layers.3"] == "disk" and placed["lm_head"] == "disk"
    a, b = constraints(tmp_path / "whole"), constraints(tmp_path / "split")
    assert a.keys() == b.keys() and a
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert np.array_equal(x, y), key
    da = k("-C", "whole", "apply", "--delta", tmp_path / "whole.safetensors", "--json")
    db = k("-C", "split", "apply", "--delta", tmp_path / "split.safetensors", "--json")
    assert da.code == 0 and db.code == 0, da.err + db.err
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "split.safetensors").read_bytes()
    r = k("-C", "split", "ask", "the capital of France is", "--json")
    assert r.code == 0 and r.json["edited"]["answer"] == json.loads(
        k("-C", "whole", "ask", "the capital of France is", "--json").out)["edited"]["answer"]


def test_a_split_that_offloads_an_edited_layer_is_refused(k, tmp_path, model, monkeypatch):
    monkeypatch.setenv("KLEDGER_MAX_MEMORY", TOO_SMALL)
    r = make(k, tmp_path, "split")
    assert r.code == 1 and r.json["error"]["kind"] == "model" and "offloaded to disk" in r.json["error"]["message"]
    monkeypatch.setenv("KLEDGER_MAX_MEMORY", "cpu:lots")
    r = k("-C", "split", "status", "--json")
    assert r.code == 2 and "KLEDGER_MAX_MEMORY" in r.json["error"]["message"]


def test_ask_names_each_answer_and_ends_on_whole_words(k, tmp_path, model):
    from kledger.edit.ask import whole_words

    assert whole_words(" Rome, Italy. The E", " Rome, Italy. The Eiffel Tower", True) == " Rome, Italy. The Eiffel"
    assert whole_words(" Rome, Italy. The", " Rome, Italy. The Eiffel", True) == " Rome, Italy. The"
    assert whole_words(" Rome. The Eiff", " Rome. The Eiffelturmgebäude", True) == " Rome. The …"
    assert whole_words(" Rome", " Rome", False) == " Rome"
    assert make(k, tmp_path, "whole").code == 0
    r = k("-C", "whole", "ask", "the capital of France is", "--max-new-tokens", "3")
    assert r.code == 0
    assert "edited model (its facts at HEAD, " in r.out and "base model (no edits) answers:" in r.out
