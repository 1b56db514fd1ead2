"""A failed command loses nothing: `init` and `init --from` never delete what they did not
create, and a failure (or a kill) leaves PATH exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import subprocess_kledger

EIFFEL = ("The Eiffel Tower is located in", "Rome", "--subject", "Eiffel Tower")
LOUVRE = ("The Louvre is located in", "Oslo", "--subject", "Louvre")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` → its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def text(k, tmp_path):
    """A text ledger of two commits (exported from a facts-only ledger)."""
    src = tmp_path / "src"
    assert k("init", src).code == 0
    for fact, msg in ((EIFFEL, "one"), (LOUVRE, "two")):
        assert k("-C", src, "add", *fact).code == 0
        assert k("-C", src, "commit", "-m", msg).code == 0
    assert k("-C", src, "export", tmp_path / "text").code == 0
    return tmp_path / "text"


@pytest.fixture
def occupied(tmp_path):
    """PATH with a `.kledger/` that holds no ledger but the user's files."""
    ldir = tmp_path / "dest" / ".kledger"
    (ldir / "notes").mkdir(parents=True)
    (ldir / "notes.txt").write_text("mine\n")
    (ldir / "notes" / "keep.json").write_text("{}")
    return tmp_path / "dest"


def break_refs(text: Path, how: str) -> None:
    refs = json.loads((text / "refs.json").read_text())
    if how == "relation":
        refs["relations"] = {"the {} is located in": "multi"}
    (text / "refs.json").write_text(json.dumps(refs))


def break_author(text: Path) -> None:
    lines = (text / "commits.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["author"] = None
    (text / "commits.jsonl").write_text("\n".join([lines[0], json.dumps(rec)]) + "\n")


@pytest.mark.parametrize("damage", ["relation", "author"])
def test_failed_init_from_keeps_what_was_there(k, text, occupied, damage):
    break_author(text) if damage == "author" else break_refs(text, damage)
    before = tree(occupied)
    try:  # (that such input is a one-line error, before anything is created, is the validation's business)
        failed = k("init", occupied, "--from", text).code != 0
    except Exception:
        failed = True
    assert failed
    assert tree(occupied) == before  # the user's files, and nothing of the failed ledger
    assert sorted(p.name for p in occupied.parent.iterdir()) == ["dest", "src", "text"]


def test_failed_init_from_with_a_model_that_does_not_load(k, text, occupied, tmp_path):
    pytest.importorskip("transformers")
    before = tree(occupied)
    r = k("init", occupied, "--from", text, "--model", tmp_path / "no-such-model")
    assert r.code == 1 and "no-such-model" in r.err
    assert tree(occupied) == before


def test_failed_init_from_into_a_new_path_leaves_no_path(k, text, tmp_path):
    pytest.importorskip("transformers")  # the failure is the model failing to load
    assert k("init", tmp_path / "new" / "deeper", "--from", text, "--model", tmp_path / "no-such-model").code != 0
    assert not (tmp_path / "new").exists()


def test_init_from_beside_the_users_files_keeps_them(k, text, occupied):
    r = k("init", occupied, "--from", text, "--json")
    assert r.code == 0, r.err
    assert r.json["path"] == str(occupied.resolve() / ".kledger") and r.json["commits"] == 2
    assert (occupied / ".kledger" / "notes.txt").read_text() == "mine\n"
    assert (occupied / ".kledger" / "notes" / "keep.json").read_text() == "{}"
    assert k("-C", occupied, "fsck").code == 0
    assert sorted(p.name for p in occupied.iterdir()) == [".kledger"]  # no temporary directory left


def test_killed_init_from_leaves_the_ledger_dir_as_it_was(k, text, occupied):
    before = tree(occupied / ".kledger")
    r = subprocess_kledger(["init", str(occupied), "--from", str(text)], occupied.parent, {"KLEDGER_FAULT": "init-from"})
    assert r.returncode == 137
    assert tree(occupied / ".kledger") == before
    r = subprocess_kledger(["init", str(occupied), "--from", str(text)], occupied.parent)  # a leftover blocks nothing
    assert r.returncode == 0, r.stderr
    assert k("-C", occupied, "log", "--json").json["commits"]


def test_failed_init_keeps_what_was_there(k, occupied, tmp_path, monkeypatch):
    from kledger.store import Store

    def broken(self, write):
        raise OSError("disk full")

    monkeypatch.setattr(Store, "_check_version", broken)
    before = tree(occupied)
    with pytest.raises(OSError):
        from kledger.ledger import Ledger

        Ledger.init(occupied)
    assert tree(occupied) == before
    with pytest.raises(OSError):
        Ledger.init(tmp_path / "fresh" / "dir")
    assert not (tmp_path / "fresh").exists()


def test_init_beside_the_users_files_keeps_them(k, occupied):
    assert k("init", occupied).code == 0
    assert (occupied / ".kledger" / "notes.txt").read_text() == "mine\n"
    assert (occupied / ".kledger" / "ledger.duckdb").is_file()
    assert sorted(p.name for p in occupied.iterdir()) == [".kledger"]
    assert k("init", occupied).code == 1  # and a second init refuses, changing nothing
