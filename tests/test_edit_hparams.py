"""Hyper-parameters: validation, round trip, fingerprint, per-model defaults. No torch."""

from __future__ import annotations

import pytest

from kledger.edit.hparams import HParams, default_layers, defaults_for
from kledger.errors import InputError


def test_round_trip_and_fingerprint():
    hp = HParams(layers=(4, 5, 6), lam=1500.0, lr=1.0)
    d = hp.to_dict()
    assert d["layers"] == [4, 5, 6]
    assert HParams.from_dict(d) == hp
    assert HParams.from_dict(d).fingerprint() == hp.fingerprint()
    assert hp.with_(lam=1501.0).fingerprint() != hp.fingerprint()
    with pytest.raises(InputError):
        HParams.from_dict(d | {"bogus": 1})


@pytest.mark.parametrize("bad", [dict(layers=()), dict(layers=(5, 4)), dict(layers=(3, 3)),
                                 dict(layers=(-1,)), dict(lam=0.0), dict(lr=-1.0),
                                 dict(bos="sometimes"), dict(steps=0), dict(c0_sampler=3),
                                 dict(c0_sampler=2.0), dict(c0_sampler=True)])
def test_validation(bad):
    with pytest.raises(InputError):
        HParams(**bad)


def test_defaults_for():
    hp = defaults_for("llama", 30)
    assert hp.layers == (3, 4, 5, 6, 7) and hp.lr == 1.0 and 1500 <= hp.lam <= 5000
    assert defaults_for("gpt2", 12).layers == default_layers(12)
    for n in range(1, 49):
        layers = default_layers(n)
        assert layers and all(0 <= la < n for la in layers) and list(layers) == sorted(set(layers))


def test_defaults_are_versioned_and_a_ledger_keeps_its_version(tmp_path):
    """New defaults never change what an existing ledger measures with: a ledger records the
    version it was made with, and one made before versions were recorded uses version 1."""
    from kledger import model_side
    from kledger.edit.hparams import DEFAULTS_VERSION
    from kledger.ledger import Ledger

    assert defaults_for("llama", 30, 1) == HParams(layers=(3, 4, 5, 6, 7), lam=3000.0, lr=1.0)
    assert defaults_for("llama", 30, 2) == HParams(layers=(3, 4, 5, 6, 7), lam=1500.0, lr=1.0)
    assert defaults_for("gpt2", 12, 2) == defaults_for("gpt2", 12, 1)  # measured on Llama only
    assert defaults_for("llama", 30, 1).fingerprint() != defaults_for("llama", 30, 2).fingerprint()
    # version 3: the edit settings of 2, the default corpus drawn by the faster sampler, for every model
    assert defaults_for("llama", 30, 3) == defaults_for("llama", 30, 2).with_(c0_sampler=2)
    assert defaults_for("gpt2", 12, 3) == defaults_for("gpt2", 12, 1).with_(c0_sampler=2)
    assert "c0_sampler" not in defaults_for("llama", 30, 2).to_dict()  # older fingerprints unchanged
    assert defaults_for("llama", 30, 3).to_dict()["c0_sampler"] == 2
    with pytest.raises(InputError, match="version 99"):
        defaults_for("llama", 30, 99)
    lg = Ledger.init(tmp_path / "new")
    assert lg.store.meta("defaults_version") == str(DEFAULTS_VERSION)
    assert lg.editor().defaults_version == DEFAULTS_VERSION
    lg.store.con.execute("DELETE FROM meta WHERE key = 'defaults_version'")  # as a ledger made before
    lg._editor = None
    assert model_side.defaults_version(lg) == 1 and lg.editor().defaults_version == 1
    lg.close()
