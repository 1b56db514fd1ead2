"""A second `kledger apply` of the same revision answers from the apply cache without loading the
model (nor importing torch): the ledger remembers which fingerprint the model's files hash to.
Changed files, settings or a damaged cache entry fall back to the full path and its checks. On
tiny random models saved as local Hugging Face directories (no download)."""

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
from conftest_edit import save_tiny_model_dir, tiny_model, word_corpus  # noqa: E402

from kledger.edit import weights as weights_mod  # noqa: E402
from kledger.edit.editor import MEMO_KEY, Editor  # noqa: E402
from kledger.errors import FingerprintError  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402

FACTS = [
    ("the Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
    ("the Louvre is located in the city of", "Louvre", "Berlin"),
    ("the capital of France is", "France", "Rome"),
    ("the capital of Italy is", "Italy", "Paris"),
]
HPARAMS = {"c0_tokens": 1200, "c0_seq_len": 64, "steps": 4, "n_prefixes": 1, "lam": 5.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(word_corpus())
    return p


def _build(tmp_path_factory, kind, corpus):
    """A model directory and, beside it, a ledger with 2 commits of 2 facts made on it."""
    base = tmp_path_factory.mktemp(f"apply-cache-{kind}")
    model = base / "model"
    save_tiny_model_dir(model, kind, corpus_words=None)
    root = base / "proj"
    lg = Ledger.init(root, model=str(model), settings={"hparams": HPARAMS, "corpus": str(corpus)})
    for i in range(2):
        lg.add([Fact.create(p, t, subject=s) for p, s, t in FACTS[2 * i:2 * i + 2]])
        lg.commit(f"batch {i}", author="t")
    lg.close()
    return base


@pytest.fixture(scope="module")
def templates(tmp_path_factory, corpus):
    built = {}

    def get(kind="llama"):
        if kind not in built:
            built[kind] = _build(tmp_path_factory, kind, corpus)
        return built[kind]

    return get


def _copy(template, dst):
    """A copy of a template's ledger (its cache and memory included) on the template's model,
    which stays where it is: the model's path is part of the fingerprint."""
    shutil.copytree(template / "proj", dst / "proj")
    return dst


@pytest.fixture
def proj(templates, tmp_path):
    return _copy(templates("llama"), tmp_path)


def apply(k, proj, *args):
    r = k("-C", proj / "proj", "apply", *map(str, args), "--json")
    assert r.code == 0, r.err
    return r.json


def editor(proj) -> tuple[Ledger, Editor]:
    lg = Ledger.open(proj / "proj", write=True)
    return lg, lg.editor()


def cached_at_head(proj) -> bool:
    lg, ed = editor(proj)
    try:
        return ed.cached(lg.history.constraints_at(lg.head())) is not None
    finally:
        lg.close()


def cache_file(proj, key):
    return proj / "proj" / ".kledger" / "cache" / "apply" / f"{key}.safetensors"


def refuse_model(monkeypatch, solve_too=True):
    """Loading the model (or solving again) fails the test."""

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded or the constraints solved again")

    monkeypatch.setattr(weights_mod, "load_model", refuse)
    if solve_too:
        monkeypatch.setattr(Editor, "_solve_batches", refuse)


def test_second_apply_is_a_cache_hit_without_the_model(k, proj, monkeypatch):
    first = apply(k, proj)  # the commits cached HEAD~1 (measured against it), not HEAD
    assert first["cached"] is False and first["facts"] == 4
    lg = Ledger.open(proj / "proj")
    assert json.loads(lg.store.meta(MEMO_KEY))["fingerprints"]  # remembered by the commits already
    lg.close()
    refuse_model(monkeypatch)
    again = apply(k, proj)
    assert again == {**first, "cached": True}
    prev = apply(k, proj, "HEAD~1")
    assert prev["cached"] is True and prev["facts"] == 2


def test_cached_apply_imports_no_torch(k, proj):
    assert apply(k, proj)["cached"] is False
    code = textwrap.dedent("""
        import sys
        from kledger.cli.main import run
        try:
            run(["-C", sys.argv[1], "apply", "--json", "--delta", sys.argv[2]])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("HEAVY", [m for m in ("torch", "transformers") if m in sys.modules], file=sys.stderr)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, str(proj / "proj"), str(proj / "d.safetensors")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr and json.loads(r.stdout)["cached"] is True
    assert (proj / "d.safetensors").is_file()


def test_changed_model_files_invalidate(k, tmp_path_factory, corpus):
    proj = _build(tmp_path_factory, "llama", corpus)  # its own model directory, which this test changes
    first = apply(k, proj)
    assert cached_at_head(proj)
    # Same weights, file rewritten: the remembered identity no longer matches, so the full path
    # loads the model, finds the same fingerprint (the cache entry is still good) and remembers it.
    w = proj / "model" / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not cached_at_head(proj)
    again = apply(k, proj)
    assert again["cached"] is True and again["cache_key"] == first["cache_key"]
    assert cached_at_head(proj)
    # Different weights: no answer from the cache, and the fingerprint check refuses as always.
    shutil.rmtree(proj / "model")
    save_tiny_model_dir(proj / "model", seed=1, corpus_words=None)
    assert not cached_at_head(proj)
    lg, ed = editor(proj)
    try:
        with pytest.raises(FingerprintError, match="base model weights"):
            ed.solve(lg.history.constraints_at(lg.head()))
    finally:
        lg.close()
    r = k("-C", proj / "proj", "apply", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "fingerprint"


def test_other_hparams_or_corpus_miss_then_refuse(k, proj):
    assert apply(k, proj)["cached"] is False
    lg = Ledger.open(proj / "proj", write=True)
    hp = lg.store.meta("hparams")
    lg.store.set_meta("hparams", json.dumps({**json.loads(hp), "lam": 50.0}))
    ed = lg.editor()
    try:
        assert ed.cached(lg.history.constraints_at(lg.head())) is None
        with pytest.raises(FingerprintError, match="hyper-parameters"):
            ed.solve(lg.history.constraints_at(lg.head()))
    finally:
        lg.store.set_meta("hparams", hp)
        lg.close()
    assert cached_at_head(proj)
    lg = Ledger.open(proj / "proj", write=True)
    other = proj / "other-corpus.txt"
    other.write_text(word_corpus(seed=1))
    lg.store.set_meta("corpus", str(other))
    ed = lg.editor()
    try:
        assert ed.cached(lg.history.constraints_at(lg.head())) is None
        with pytest.raises(FingerprintError, match="C0"):
            ed.solve(lg.history.constraints_at(lg.head()))
    finally:
        lg.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_file_is_recomputed(k, proj, damage):
    first = apply(k, proj, "--delta", proj / "a.safetensors")
    path = cache_file(proj, first["cache_key"])
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF  # inside the tensors: only the checksum stored with them tells
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    assert not cached_at_head(proj) and not path.exists()  # a damaged entry is dropped
    path.write_bytes(bytes(data))
    again = apply(k, proj, "--delta", proj / "b.safetensors")  # the full path drops and re-solves it
    assert again["cached"] is False and again["cache_key"] == first["cache_key"]
    assert (proj / "a.safetensors").read_bytes() == (proj / "b.safetensors").read_bytes()
    assert apply(k, proj)["cached"] is True


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # GPT-2 stores its down-projection transposed
def test_delta_from_cache_equals_delta_from_a_solve(k, templates, tmp_path, monkeypatch, kind):
    proj = _copy(templates(kind), tmp_path)
    solved = apply(k, proj, "--delta", proj / "solved.safetensors")
    assert solved["cached"] is False
    refuse_model(monkeypatch)
    cached = apply(k, proj, "--delta", proj / "cached.safetensors")
    assert cached["cached"] is True
    a, b = proj / "solved.safetensors", proj / "cached.safetensors"
    assert a.read_bytes() == b.read_bytes()
    ma = json.loads((proj / "solved.safetensors.json").read_text())
    mb = json.loads((proj / "cached.safetensors.json").read_text())
    assert {**ma, "file": None} == {**mb, "file": None}
    from safetensors.torch import load_file

    tensors, solved_w = load_file(str(b)), load_file(str(cache_file(proj, solved["cache_key"])))
    sd = tiny_model(kind).state_dict()
    assert len(tensors) == len(solved_w) and set(tensors) <= set(sd)
    for name, t in tensors.items():
        layer = ma["tensors"][name]["layer"]
        assert t.shape == sd[name].shape
        assert torch.equal(t.T if kind == "gpt2" else t, solved_w[str(layer)])


def test_out_from_cache_does_not_solve_again(k, proj, monkeypatch):
    first = apply(k, proj)
    monkeypatch.setattr(Editor, "_solve_batches", lambda *a, **kw: pytest.fail("solved again"))
    res = apply(k, proj, "--out", proj / "out")
    assert res["cached"] is True and res["cache_key"] == first["cache_key"]
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cached = load_file(str(cache_file(proj, first["cache_key"])))
    m = AutoModelForCausalLM.from_pretrained(proj / "out")
    for la, w in cached.items():
        assert torch.equal(m.model.layers[int(la)].mlp.down_proj.weight, w)


def test_read_only_ledger_remembers_nothing(proj):
    """A ledger opened for reading writes nothing: what it learns on the way (the memo) is kept
    in memory (Store.upgrade would write it) and is gone when it closes."""
    lg = Ledger.open(proj / "proj", write=True)
    lg.store.set_meta(MEMO_KEY, "{}")
    lg.close()
    lg = Ledger.open(proj / "proj")
    try:
        ed = lg.editor()
        assert ed.solve(lg.history.constraints_at(lg.resolve("HEAD~1")))[1]["facts"] == 2
        assert lg.store.deferred  # learnt, not written
    finally:
        lg.close()
    with Ledger.open(proj / "proj") as lg:
        assert lg.store.meta(MEMO_KEY) == "{}"


# ------------------------------------------------------------------ --out and --delta lose nothing
def tree(root):
    """Every path under `root` → its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def users_model_dir(d):
    """A directory of the user's own: a sharded checkpoint, its index, an old .bin and notes."""
    d.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin"):
        (d / name).write_bytes(b"weights of mine")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (d / "notes.txt").write_text("mine")
    return d


def load_out(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d)


def test_out_refuses_a_directory_it_did_not_write_before_solving(k, proj, monkeypatch):
    out = users_model_dir(proj / "out")
    before = tree(out)
    refuse_model(monkeypatch)  # the path is checked before the model is loaded or anything solved
    r = k("-C", proj / "proj", "apply", "--out", out, "--json")
    assert r.code == 2 and r.json["error"]["kind"] == "input"
    msg = r.json["error"]["message"]
    assert str(out) in msg and "--force" in msg and "\n" not in r.err.strip()
    assert tree(out) == before
    # a file where the directory would go, and a missing parent: refused the same way, nothing made
    (proj / "file").write_text("mine")
    for bad in (proj / "file", proj / "no" / "such" / "dir"):
        r = k("-C", proj / "proj", "apply", "--out", bad, "--json")
        assert r.code == 2 and r.json["error"]["kind"] == "input", bad
    assert (proj / "file").read_text() == "mine" and not (proj / "no").exists()


def test_out_force_replaces_the_directory_as_a_whole(k, proj):
    out = users_model_dir(proj / "out")
    res = apply(k, proj, "--out", out, "--force")
    assert res["model"] == str(out)
    names = {p.name for p in out.iterdir()}
    assert not names & {"model-00001-of-00002.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                        "notes.txt"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "kledger-apply.json"} <= names
    assert load_out(out) is not None
    assert sorted(p.name for p in proj.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_out_replaces_its_own_output_and_writes_it_whole(k, proj):
    out = proj / "out"
    first = apply(k, proj, "--out", out, "HEAD~1")
    manifest = json.loads((out / "kledger-apply.json").read_text())
    assert manifest["format"] == "kledger-model/1" and manifest["meta"]["revision"] == first["revision"]
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"kledger-apply.json"}
    second = apply(k, proj, "--out", out)  # a previous kledger output: replaced without --force
    assert json.loads((out / "kledger-apply.json").read_text())["meta"]["revision"] == second["revision"]
    (out / "notes.txt").write_text("mine")  # ... unless something was added to it since
    r = k("-C", proj / "proj", "apply", "--out", out, "--json")
    assert r.code == 2 and "notes.txt" in r.json["error"]["message"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("route", ["files", "model"])
def test_out_failing_mid_write_leaves_the_directory_as_it_was(k, proj, monkeypatch, route):
    """Whether --out copies the model's files (no model loaded) or saves the loaded model."""
    out = proj / "out"
    apply(k, proj, "--out", out, "HEAD~1")
    before = tree(out)

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    if route == "files":
        from kledger.edit import files

        monkeypatch.setattr(files.shutil, "copyfile", disk_full)
    else:
        monkeypatch.setattr(Editor, "model_files", lambda *a, **kw: None)
        monkeypatch.setattr(type(load_out(out)), "save_pretrained", disk_full)
    r = k("-C", proj / "proj", "apply", "--out", out, "--json")
    assert r.code == 1 and "No space left" in r.json["error"]["message"]
    assert tree(out) == before
    assert sorted(p.name for p in proj.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("existing", [False, True])
def test_out_killed_mid_write_leaves_no_partial_model(k, proj, existing):
    out = proj / "out"
    if existing:
        apply(k, proj, "--out", out, "HEAD~1")
    before = tree(out) if existing else None
    env = {**os.environ, "PYTHONPATH": str(REPO), "KLEDGER_FAULT": "apply-out"}
    r = subprocess.run([sys.executable, "-m", "kledger", "-C", str(proj / "proj"), "apply", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 137, r.stderr
    if existing:
        assert tree(out) == before  # still the complete previous output
    else:
        assert not out.exists()  # never a directory that loads as if complete
    assert apply(k, proj, "--out", out)["model"] == str(out)  # a leftover temporary blocks nothing
    assert load_out(out) is not None


def test_delta_refuses_a_file_it_did_not_write_before_solving(k, proj, monkeypatch):
    target = proj / "edit.safetensors"
    target.write_bytes(b"mine")
    refuse_model(monkeypatch)
    r = k("-C", proj / "proj", "apply", "--delta", target, "--json")
    assert r.code == 2 and r.json["error"]["kind"] == "input" and "--force" in r.json["error"]["message"]
    assert target.read_bytes() == b"mine" and not (proj / "edit.safetensors.json").exists()
    other = proj / "other.safetensors"
    (proj / "other.safetensors.json").write_text("{}")  # the manifest's place holds a file of the user's
    assert k("-C", proj / "proj", "apply", "--delta", other, "--json").code == 2
    assert (proj / "other.safetensors.json").read_text() == "{}" and not other.exists()
    for bad in (proj / "no" / "d.safetensors", proj):  # a missing parent; a directory
        assert k("-C", proj / "proj", "apply", "--delta", bad, "--json").code == 2


def test_delta_replaces_its_own_file_or_with_force(k, proj):
    target = proj / "edit.safetensors"
    first = apply(k, proj, "--delta", target, "HEAD~1")
    second = apply(k, proj, "--delta", target)  # kledger's own delta: replaced
    assert json.loads((proj / "edit.safetensors.json").read_text())["meta"]["revision"] == second["revision"]
    assert first["revision"] != second["revision"]
    mine = proj / "mine.safetensors"
    mine.write_bytes(b"mine")
    apply(k, proj, "--delta", mine, "--force")
    assert json.loads((proj / "mine.safetensors.json").read_text())["file"] == "mine.safetensors"
    assert sorted(p.name for p in proj.iterdir() if p.name.startswith(".")) == []


def test_out_replaces_by_two_renames_where_there_is_no_atomic_exchange(k, proj, monkeypatch):
    out = users_model_dir(proj / "out")
    monkeypatch.setattr(weights_mod, "_exchange", lambda a, b: False)
    res = apply(k, proj, "--out", out, "--force")
    assert not (out / "notes.txt").exists() and (out / "kledger-apply.json").is_file()
    assert json.loads((out / "kledger-apply.json").read_text())["meta"]["revision"] == res["revision"]
    assert sorted(p.name for p in proj.iterdir() if p.name.startswith(".")) == []
