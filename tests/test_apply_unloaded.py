"""A first `kledger apply` of a revision (nothing cached) solves without loading the model when
the ledger remembers the model's files: W0 read straight from the safetensors files, C0 from the
store; `--out` copies the files with the edited tensors written over. What it writes must equal
what the full path (model loaded, `save_pretrained`) writes, bit for bit in the weights. Files that
do not qualify (not safetensors, not float32) or changed files take the full path. On tiny random
models saved as local Hugging Face directories (no download)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from conftest_edit import THREE_FACTS, TINY_HPARAMS, save_tiny_model_dir, tiny_model, word_corpus  # noqa: E402

from kledger.edit import files as files_mod  # noqa: E402
from kledger.edit import weights as weights_mod  # noqa: E402
from kledger.edit.editor import Editor  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402

FACTS, HPARAMS = THREE_FACTS, TINY_HPARAMS


def build(root, kind="llama", save=None, dtype=None, bin_only=False):
    """A model directory (re-saved with `save`, kwargs of save_pretrained, in `dtype`; with
    `bin_only`, its weights in pytorch_model.bin instead of safetensors) and a ledger of 2 commits on it; the apply cache emptied."""
    model = save_tiny_model_dir(root / "model", kind, corpus_words=None)
    if save or dtype:
        (model / "model.safetensors").unlink()
        tiny_model(kind).to(dtype or torch.float32).save_pretrained(model, **(save or {}))
    if bin_only:  # weights as a pickled state dict only, as older checkpoints have them
        from safetensors.torch import load_file

        torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
        (model / "model.safetensors").unlink()
    corpus = root / "corpus.txt"
    corpus.write_text(word_corpus())
    lg = Ledger.init(root / "proj", model=str(model), settings={"hparams": HPARAMS, "corpus": str(corpus)})
    lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[:2]])
    lg.commit("first", author="t")
    lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2:]])
    lg.commit("second", author="t")
    lg.close()
    clear_cache(root)
    return root


def clear_cache(root):
    shutil.rmtree(root / "proj" / ".kledger" / "cache" / "apply", ignore_errors=True)


def apply(k, root, *args):
    r = k("-C", root / "proj", "apply", *map(str, args), "--json")
    assert r.code == 0, r.err
    return r.json


def refuse_model(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(weights_mod, "load_model", refuse)


def full_path_only(monkeypatch):
    monkeypatch.setattr(Editor, "solve_unloaded", lambda *a, **kw: None)
    monkeypatch.setattr(Editor, "model_files", lambda *a, **kw: None)


def state(d):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d)
    return m.config.to_dict(), {n: t.detach().clone() for n, t in m.state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # GPT-2 stores its down-projection transposed
def test_cold_apply_without_the_model_equals_the_full_path(k, tmp_path, monkeypatch, kind):
    root = build(tmp_path, kind)
    with monkeypatch.context() as mp:
        full_path_only(mp)
        full = apply(k, root, "--delta", root / "full.safetensors", "--out", root / "full")
    assert full["cached"] is False
    clear_cache(root)
    with monkeypatch.context() as mp:
        refuse_model(mp)
        fast = apply(k, root, "--delta", root / "fast.safetensors", "--out", root / "fast")
    assert fast["cached"] is False and {**fast, "model": None, "delta": None, "manifest": None} == \
        {**full, "model": None, "delta": None, "manifest": None}
    assert (root / "full.safetensors").read_bytes() == (root / "fast.safetensors").read_bytes()
    (cfg_a, sd_a), (cfg_b, sd_b) = state(root / "full"), state(root / "fast")
    assert set(sd_a) == set(sd_b) and all(torch.equal(sd_a[n], sd_b[n]) for n in sd_a)
    drop = ("transformers_version", "_name_or_path")
    assert {k_: v for k_, v in cfg_a.items() if k_ not in drop} == {k_: v for k_, v in cfg_b.items() if k_ not in drop}
    base = state(root / "model")[1]
    edited = [n for n in sd_a if not torch.equal(sd_a[n], base[n])]
    assert edited and all("mlp" in n for n in edited)  # the edited down-projections, nothing else
    manifest = json.loads((root / "fast" / "kledger-apply.json").read_text())
    assert manifest["meta"] == json.loads((root / "full" / "kledger-apply.json").read_text())["meta"]
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(manifest["files"])
    # and the model's own files are untouched
    assert torch.equal(base[edited[0]], tiny_model(kind).state_dict()[edited[0]])
    clear_cache(root)
    with monkeypatch.context() as mp:
        refuse_model(mp)
        assert apply(k, root)["cached"] is False
        assert apply(k, root)["cached"] is True  # the unloaded solve filled the cache


def test_sharded_model_only_the_shards_with_edits_are_changed(k, tmp_path, monkeypatch):
    root = build(tmp_path, save={"max_shard_size": "20KB"})
    index = json.loads((root / "model" / files_mod.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    refuse_model(monkeypatch)
    res = apply(k, root, "--out", root / "out")
    edited = {index["weight_map"][f"model.layers.{la}.mlp.down_proj.weight"] for la in res["layers"]}
    for shard in set(index["weight_map"].values()):
        same = (root / "model" / shard).read_bytes() == (root / "out" / shard).read_bytes()
        assert same == (shard not in edited), shard
    monkeypatch.undo()
    _, sd = state(root / "out")
    lg = Ledger.open(root / "proj")
    try:
        weights, _ = lg.editor().solve(lg.history.constraints_at(lg.head()))
    finally:
        lg.close()
    for la, w in weights.items():
        assert torch.equal(sd[f"model.layers.{la}.mlp.down_proj.weight"], w)


@pytest.mark.parametrize("how", [{"bin_only": True}, {"dtype": torch.bfloat16}],
                         ids=["bin", "bf16"])
def test_files_that_do_not_qualify_take_the_full_path(k, tmp_path, how):
    root = build(tmp_path, **how)
    lg = Ledger.open(root / "proj")
    try:
        ed = lg.editor()
        got = ed._remembered()
        assert got is not None and ed.model_files(got[2], got[1].layers) is None
        assert ed.solve_unloaded(lg.history.constraints_at(lg.head())) is None
    finally:
        lg.close()
    res = apply(k, root, "--out", root / "out")
    assert res["cached"] is False and (root / "out" / "model.safetensors").is_file()
    _, sd = state(root / "out")
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_changed_model_file_is_not_read_unloaded(k, tmp_path, monkeypatch):
    root = build(tmp_path)
    w = root / "model" / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    loaded = []
    real = weights_mod.load_model
    monkeypatch.setattr(weights_mod, "load_model", lambda *a, **kw: loaded.append(1) or real(*a, **kw))
    assert apply(k, root)["cached"] is False and loaded  # the full path checked the fingerprint


def test_cold_out_imports_no_transformers(tmp_path):
    """Nor torch: a small revision is solved by Woodbury on the kept inverse of λC0, in numpy
    (kledger.edit.prior)."""
    root = build(tmp_path)
    assert list((root / "proj" / ".kledger" / "cache" / "prior").glob("*.safetensors"))  # kept at init
    code = textwrap.dedent("""
        import sys
        from kledger.cli.main import run
        try:
            run(["-C", sys.argv[1], "apply", "--json", "--out", sys.argv[2]])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("HEAVY", [m for m in ("transformers", "torch") if m in sys.modules], file=sys.stderr)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, str(root / "proj"), str(root / "out")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr and json.loads(r.stdout)["cached"] is False
    assert (root / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("route", ["files", "model"])
def test_out_has_the_usual_modes(k, tmp_path, monkeypatch, route):
    """Every file of an --out directory is readable like the others (no 0600 model file), and the
    directory is not left 0700 by its temporary folder."""
    root = build(tmp_path)
    if route == "model":
        full_path_only(monkeypatch)
    apply(k, root, "--out", root / "out")
    mask = os.umask(0)
    os.umask(mask)
    assert (root / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    modes = {p.name: p.stat().st_mode & 0o777 for p in (root / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes
