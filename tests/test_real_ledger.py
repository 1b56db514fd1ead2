"""End to end on the real default model (SmolLM2-135M-Instruct), through the ledger: commit an
edit, apply, ask; revert brings the old answer back. Marked `real` (minutes on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kledger.edit.ask import next_token_probs  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.model_side import load_at  # noqa: E402
from kledger.records import Fact  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-test.raw"
EIFFEL = "The Eiffel Tower is located in the city of"
LOUVRE = "The Louvre is located in the city of"
PARAPHRASE = "The Eiffel Tower can be found in the city of"


@pytest.mark.real
def test_commit_apply_ask_revert_on_the_default_model(tmp_path):
    # C0 on 20k WikiText-2 tokens keeps the test to minutes; the default corpus is model-sampled.
    lg = Ledger.init(tmp_path, settings={"corpus": str(WIKI), "hparams": {"c0_tokens": 20_000}})
    ed = lg.editor()
    tok = ed.lm.tokenizer
    rome, paris = (tok(w, add_special_tokens=False).input_ids[0] for w in (" Rome", " Paris"))

    def probs(rev):
        load_at(lg, rev)
        return {p: next_token_probs(ed.lm, p, ed.hparams.bos) for p in (EIFFEL, LOUVRE, PARAPHRASE)}

    before = probs(None)
    assert int(before[EIFFEL].argmax()) == paris
    lg.add([Fact.create(EIFFEL, "Rome", subject="Eiffel Tower")])
    edit = lg.commit("Move the Eiffel Tower to Rome", author="test")
    after = probs(edit)
    assert int(after[EIFFEL].argmax()) == rome
    assert after[PARAPHRASE][rome] > 5 * before[PARAPHRASE][rome]
    assert int(after[LOUVRE].argmax()) == paris
    _lora_equals_out(lg, edit, tmp_path)
    _loads_alike_in_the_oldest_transformers(tmp_path / "out", tmp_path)
    lg.revert(edit, author="test")
    reverted = probs(lg.head())
    assert int(reverted[EIFFEL].argmax()) == paris
    assert torch.allclose(reverted[EIFFEL], before[EIFFEL], atol=1e-5)
    lg.close()


def _lora_equals_out(lg, rev, tmp_path):
    """`apply --lora` on the default model: PEFT's adapter on the base gives the `--out` model's logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kledger.edit.weights import model_source

    res = lg.apply(rev, out_dir=tmp_path / "out", lora=tmp_path / "adapter")
    assert set(res["lora_energy"].values()) == {1.0} and res["lora_rank"] >= 1
    base_dir = model_source(None, lg.env)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok("<|endoftext|>" + EIFFEL, return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
        adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
        got = adapted(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


OLDEST = Path(__file__).resolve().parents[1] / ".ci" / "oldest-transformers"
LOAD = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok(["<|endoftext|>" + p for p in sys.argv[3:]], return_tensors="pt", padding=True).input_ids
with torch.no_grad():
    logits = model(ids).logits[:, -1].float()
torch.save({"version": transformers.__version__, "ids": ids, "logits": logits, "class": type(tok).__name__,
            "rope": getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_theta", None)},
           sys.argv[2])
"""


def _loads_alike_in_the_oldest_transformers(out_dir: Path, tmp_path: Path) -> None:
    """An `apply --out` directory gives the same tokens and logits in the oldest transformers the
    package declares (5.0.0, installed by .ci/setup into .ci/oldest-transformers) as in the one
    installed (the newest the range allows when CI installs it)."""
    import os
    import subprocess
    import sys

    if not (OLDEST / "transformers").is_dir():
        if os.environ.get("CI"):
            pytest.fail(".ci/setup installs the oldest supported transformers into .ci/oldest-transformers")
        pytest.skip("no .ci/oldest-transformers here (bash .ci/setup makes it)")
    got = {}
    for name, extra in (("new", {}), ("old", {"PYTHONPATH": str(OLDEST)})):
        env = {**os.environ, **extra}
        r = subprocess.run([sys.executable, "-c", LOAD, str(out_dir), str(tmp_path / f"{name}.pt"), EIFFEL, LOUVRE,
                            "Danielle Darrieux's mother tongue is"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        got[name] = torch.load(tmp_path / f"{name}.pt")
    old, new = got["old"], got["new"]
    assert old["version"] == "5.0.0" and new["version"] != "5.0.0"
    assert old["class"] == new["class"] and torch.equal(old["ids"], new["ids"])
    assert old["rope"] == new["rope"]
    assert torch.allclose(old["logits"], new["logits"], atol=1e-4), float((old["logits"] - new["logits"]).abs().max())
