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
