"""Real-model edit on SmolLM2-135M-Instruct (marked `real`; about a minute on 2 CPU cores once the
model cache exists). C0 is measured on 20k tokens of WikiText-2 from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kledger.edit.engine import EditRequest, compute_constraints  # noqa: E402
from kledger.edit.hooks import boundary_token, encode  # noqa: E402
from kledger.edit.hparams import defaults_for  # noqa: E402
from kledger.edit.spec import get_weight  # noqa: E402
from kledger.edit.stats import compute_c0  # noqa: E402
from kledger.edit.weights import load_model  # noqa: E402
from kledger.settings import Settings  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-test.raw"
EIFFEL = "The Eiffel Tower is located in the city of"
LOUVRE = "The Louvre is located in the city of"
PARAPHRASE = "The Eiffel Tower can be found in the city of"


@pytest.mark.real
def test_real_edit_eiffel_tower_to_rome():
    lm = load_model(env=Settings.from_env())
    tok = lm.tokenizer
    hp = defaults_for(lm.model_type, lm.n_layers)
    bos = boundary_token(tok, hp.bos)
    rome, paris = (tok(w, add_special_tokens=False).input_ids[0] for w in (" Rome", " Paris"))

    def probs(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(lm.model(torch.tensor([encode(tok, prompt, bos)])).logits[0, -1], -1)

    before = {p: probs(p) for p in (EIFFEL, LOUVRE, PARAPHRASE)}
    assert int(before[EIFFEL].argmax()) == paris
    c0, _ = compute_c0(lm, hp.layers, WIKI.read_text(), n_tokens=20_000)
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    diag: dict = {}
    compute_constraints(lm, [EditRequest(EIFFEL, "Eiffel Tower", "Rome")], hp, c0, W0, {}, diagnostics=diag)
    after = {p: probs(p) for p in (EIFFEL, LOUVRE, PARAPHRASE)}
    assert int(after[EIFFEL].argmax()) == rome
    assert int(after[LOUVRE].argmax()) == paris
    assert after[PARAPHRASE][rome] > 5 * before[PARAPHRASE][rome]
    assert after[PARAPHRASE][rome] > after[PARAPHRASE][paris]
