"""`kledger apply --lora DIR`: the change of each edited layer as a PEFT LoRA adapter. PEFT loads
it onto the base model with logits equal to the `--out` model's, `merge_and_unload()` gives its
weights, `--rank` truncates with the energy kept reported, and the adapter is the same whether the
model was loaded or not. On tiny random models saved as local Hugging Face directories (no
download); GPT-2 stores its down-projection transposed (PEFT's fan_in_fan_out)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest_edit import THREE_FACTS, TINY_HPARAMS, save_tiny_model_dir, word_corpus  # noqa: E402

from kledger.edit.editor import Editor  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402

FACTS, HPARAMS = THREE_FACTS, TINY_HPARAMS


def build(root, kind):
    model = save_tiny_model_dir(root / "model", kind, corpus_words=None)
    (root / "corpus.txt").write_text(word_corpus())
    lg = Ledger.init(root / "proj", model=str(model), settings={"hparams": HPARAMS, "corpus": str(root / "corpus.txt")})
    lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[:2]])
    lg.commit("two", author="t")
    lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2:]])
    lg.commit("one more", author="t")
    lg.close()
    return root


def apply(k, root, *args):
    r = k("-C", root / "proj", "apply", *map(str, args), "--json")
    assert r.code == 0, r.err
    return r.json


def logits(model, tok):
    ids = tok("the Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapter_on_the_base_equals_the_edited_model(k, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = build(tmp_path, kind)
    res = apply(k, root, "--out", root / "out", "--lora", root / "adapter")
    assert res["lora"] == str(root / "adapter") and 1 <= res["lora_rank"] <= len(FACTS)
    assert set(res["lora_energy"].values()) == {1.0} and max(res["lora_exact_rank"].values()) == res["lora_rank"]
    tok = AutoTokenizer.from_pretrained(root / "model")
    edited = AutoModelForCausalLM.from_pretrained(root / "out")
    base = AutoModelForCausalLM.from_pretrained(root / "model")
    if kind == "llama":  # the edit changed something (the tiny GPT-2's edits are too small to show here;
        # for it the test checks that PEFT takes the transposed layout: A and B of the wrong shapes fail to load)
        assert not torch.allclose(logits(base, tok), logits(edited, tok), atol=1e-4)
    adapted = peft.PeftModel.from_pretrained(base, root / "adapter")
    assert torch.allclose(logits(adapted, tok), logits(edited, tok), atol=1e-4)
    merged = adapted.merge_and_unload().state_dict()
    want = edited.state_dict()
    for name, w in want.items():
        assert torch.allclose(merged[name], w, atol=1e-5), name
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == res["lora_rank"] and config["fan_in_fan_out"] == (kind == "gpt2")


def test_rank_truncates_and_says_how_much_is_kept(k, tmp_path):
    root = build(tmp_path, "llama")
    full = apply(k, root, "--lora", root / "exact")
    assert full["lora_rank"] >= 2
    cut = apply(k, root, "--lora", root / "cut", "--rank", "1")
    assert cut["lora_rank"] == 1 and all(0 < e < 1 for e in cut["lora_energy"].values())
    r = k("-C", root / "proj", "apply", "--lora", root / "cut", "--rank", "1")
    assert r.code == 0 and "truncated" in r.err


def test_adapter_is_the_same_with_the_model_loaded(k, tmp_path, monkeypatch):
    root = build(tmp_path, "llama")
    apply(k, root, "--lora", root / "unloaded")
    shutil.rmtree(root / "proj" / ".kledger" / "cache" / "apply")
    monkeypatch.setattr(Editor, "model_files", lambda *a, **kw: None)  # the model's files do not qualify
    monkeypatch.setattr(Editor, "solve_unloaded", lambda *a, **kw: None)
    apply(k, root, "--lora", root / "loaded")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (root / "unloaded" / name).read_bytes() == (root / "loaded" / name).read_bytes()


def test_bad_lora_options_are_refused_before_any_work(k, tmp_path):
    root = build(tmp_path, "llama")
    for args in (["--rank", "2"], ["--lora", root / "a", "--rank", "0"], ["--lora", root / "a", "--out", root / "a"],
                 ["--lora", root / "a", "--out", root / "a" / "inner"]):
        r = k("-C", root / "proj", "apply", *map(str, args), "--json")
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, (args, r.err)
    assert not (root / "a").exists()


def test_two_branches_served_as_two_adapters_of_one_base(k, tmp_path):
    """docs/adapters.md: one base model, one adapter per branch, switched with set_adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = build(tmp_path, "llama")
    with Ledger.open(root / "proj", write=True) as lg:
        lg.checkout("experiment", create=True, start="HEAD~1")
        lg.add([Fact.create("the Colosseum is located in the city of", "Paris", subject="Colosseum")])
        lg.commit("an experiment", author="t")
        lg.checkout("main")
    (root / "adapters").mkdir()
    (root / "models").mkdir()
    for branch in ("main", "experiment"):
        apply(k, root, branch, "--lora", root / "adapters" / branch, "--out", root / "models" / branch)
    tok = AutoTokenizer.from_pretrained(root / "model")
    served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "model"),
                                            root / "adapters" / "main", adapter_name="main")
    served.load_adapter(root / "adapters" / "experiment", adapter_name="experiment")
    outs = {}
    for branch in ("main", "experiment"):
        served.set_adapter(branch)
        outs[branch] = logits(served, tok)
        want = logits(AutoModelForCausalLM.from_pretrained(root / "models" / branch), tok)
        assert torch.allclose(outs[branch], want, atol=1e-4), branch
    assert not torch.allclose(outs["main"], outs["experiment"], atol=1e-4)
