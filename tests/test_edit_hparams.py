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
                                 dict(bos="sometimes"), dict(steps=0)])
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
