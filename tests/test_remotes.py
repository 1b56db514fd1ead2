"""Remotes: clone, fetch, push, pull, remote-tracking refs, fast-forward and its refusal, concurrent
pushes, damaged packs refused with nothing written, killed pushes; every test on both kinds of
remote, a directory and S3 (a local S3-compatible server, tests/conftest_remote.py). Facts-only
ledgers here; measured constraints and C0 across a remote are in test_remotes_model.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import snapshot, subprocess_kledger
from conftest_remote import delete, names, read, refs, size, write

from kledger.ledger import Ledger
from kledger.records import canonical_json, sha256_hex
from kledger.remote_kinds import open_remote
from kledger.store.packs import MANIFEST


def ok(r):
    assert r.code == 0, r.err
    return r.json if r.out.strip().startswith("{") else r


def fact(k, where, prompt, target, subject):
    ok(k("-C", where, "add", prompt, target, "--subject", subject))


def commit(k, where, msg):
    ok(k("-C", where, "commit", "-m", msg))


@pytest.fixture
def origin(k, remote_url):
    """A ledger `a` with two commits, pushed to the remote at `remote_url` (its URL is returned)."""
    ok(k("init", "a"))
    fact(k, "a", "The Eiffel Tower is located in", "Rome", "Eiffel Tower")
    commit(k, "a", "one")
    fact(k, "a", "The Louvre is located in", "Berlin", "Louvre")
    commit(k, "a", "two")
    ok(k("-C", "a", "remote", "add", "origin", remote_url))
    res = ok(k("-C", "a", "push", "--json"))
    assert res["commits"] == 2 and res["old"] is None and res["packs"] == 1
    return remote_url


def head(k, where):
    return ok(k("-C", where, "status", "--json"))["head"]


def remote_refs(url: str) -> dict:
    return refs(url)


def pack_bytes(url: str, pack_id: str) -> int:
    return sum(size(url, "packs", pack_id, n) for n in names(url, "packs", pack_id))


def test_clone_equals_origin_and_tracks_it(k, origin, tmp_path):
    res = ok(k("clone", origin, "b", "--json"))
    assert res["commits"] == 2 and res["branch"] == "main"
    assert head(k, "b") == head(k, "a")
    assert snapshot(tmp_path / "b" / ".kledger")["facts"] == snapshot(tmp_path / "a" / ".kledger")["facts"]
    assert ok(k("-C", "b", "fsck", "--json"))["ok"]
    log = ok(k("-C", "b", "log", "--json"))["commits"]
    assert [c["message"] for c in log] == ["two", "one"] and "origin/main" in log[0]["refs"]
    rows = ok(k("-C", "b", "branch", "-a", "--json"))["branches"]
    assert {(r["name"], bool(r.get("remote"))) for r in rows} == {("main", False), ("origin/main", True)}
    assert ok(k("-C", "b", "status", "--json"))["upstream"] == {"ref": "origin/main", "commit": head(k, "a"),
                                                                 "ahead": 0, "behind": 0}
    assert ok(k("-C", "b", "show", "origin/main~1", "--json"))["message"] == "one"
    assert ok(k("-C", "b", "remote", "list", "--json"))["remotes"] == [{"name": "origin", "url": origin}]


def test_fetch_moves_only_the_new_commits_objects(k, origin):
    ok(k("clone", origin, "b"))
    assert ok(k("-C", "b", "fetch", "--json"))["bytes"] == 0  # nothing new: nothing moved
    fact(k, "a", "The Colosseum is located in", "Paris", "Colosseum")
    commit(k, "a", "three")
    pushed = ok(k("-C", "a", "push", "--json"))
    assert pushed["commits"] == 1
    got = ok(k("-C", "b", "fetch", "--json"))
    newest = remote_refs(origin)["packs"][-1]
    assert got["packs"] == 1 and got["commits"] == 1 and got["bytes"] == pack_bytes(origin, newest) == pushed["bytes"]
    assert got["updated"]["origin/main"]["new"] == head(k, "a")
    st = ok(k("-C", "b", "status", "--json"))
    assert st["upstream"]["behind"] == 1 and st["upstream"]["ahead"] == 0 and st["head"] != head(k, "a")
    ok(k("-C", "b", "pull"))
    assert head(k, "b") == head(k, "a")


def diverge(k, origin, theirs=("The Colosseum is located in", "Paris", "Colosseum", "from b"),
            mine=("The Prado is located in", "Oslo", "Prado", "from a")) -> None:
    """A clone `b` pushes a commit of the fact `theirs`; `a` commits `mine` on the same branch:
    a's push is not a fast-forward. Each fact: (prompt, object, subject, commit message)."""
    ok(k("clone", origin, "b"))
    for where, (prompt, obj, subject, message) in (("b", theirs), ("a", mine)):
        fact(k, where, prompt, obj, subject)
        commit(k, where, message)
        if where == "b":
            ok(k("-C", "b", "push"))


def test_non_fast_forward_push_is_refused_then_pull_merges(k, origin):
    diverge(k, origin)
    refs = remote_refs(origin)
    r = k("-C", "a", "push", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "state" and "non-fast-forward" in r.json["error"]["message"]
    assert remote_refs(origin) == refs  # the remote as it was
    assert ok(k("-C", "a", "status", "--json"))["upstream"]["ahead"] == 1
    pulled = ok(k("-C", "a", "pull", "--json"))
    assert pulled["merge"]["result"] == "merge" and pulled["fetch"]["commits"] == 1
    ok(k("-C", "a", "push"))
    ok(k("-C", "b", "pull"))
    assert head(k, "a") == head(k, "b")
    assert ok(k("-C", "b", "status", "--json"))["facts_in_force"] == 4


def test_force_push_replaces_the_remote_branch(k, origin):
    diverge(k, origin)
    assert k("-C", "a", "push").code == 1
    res = ok(k("-C", "a", "push", "origin", "main", "--force", "--json"))
    assert res["forced"] is True and res["new"] == head(k, "a") and res["old"] == head(k, "b")
    assert remote_refs(origin)["branches"]["main"] == head(k, "a")
    got = ok(k("-C", "b", "fetch", "--json"))
    assert got["updated"]["origin/main"] == {"old": head(k, "b"), "new": head(k, "a")}
    up = ok(k("-C", "b", "status", "--json"))["upstream"]
    assert (up["ahead"], up["behind"]) == (1, 1)
    assert ok(k("-C", "a", "push", "--json"))["old"] == head(k, "a")  # now up to date
    ok(k("-C", "a", "checkout", "-b", "topic"))
    assert ok(k("-C", "a", "push", "origin", "topic", "--json"))["commits"] == 0  # its commits are there
    assert set(remote_refs(origin)["branches"]) == {"main", "topic"}


def test_concurrent_pushes_one_wins(k, origin, tmp_path, monkeypatch):
    ok(k("clone", origin, "b"))
    for who in ("a", "b"):
        fact(k, who, f"The Prado {who} is in", "Oslo" if who == "a" else "Rome", f"Prado {who}")
        commit(k, who, f"from {who}")
    kind = type(open_remote(origin))
    real = kind.swap_refs
    raced = []

    def swap(self, version, doc):  # b pushes between a's read of the refs and a's swap
        if not raced:
            raced.append(1)
            with Ledger.open(tmp_path / "b", write=True) as lg:
                lg.push()
        return real(self, version, doc)

    with monkeypatch.context() as mp:
        mp.setattr(kind, "swap_refs", swap)
        r = k("-C", "a", "push", "--json")
    assert r.code == 1 and "lost a race" in r.json["error"]["message"]
    assert remote_refs(origin)["branches"]["main"] == head(k, "b")
    ok(k("clone", origin, "c"))  # the remote is consistent: a fresh clone checks every object
    assert head(k, "c") == head(k, "b")


def test_concurrent_push_processes(k, origin, tmp_path):
    """Two `kledger push` processes at once, each with a commit the other lacks: one wins."""
    ok(k("clone", origin, "b"))
    for who in ("a", "b"):
        fact(k, who, f"The Prado {who} is in", "Oslo", f"Prado {who}")
        commit(k, who, f"from {who}")
    env = {**os.environ, "KLEDGER_AUTHOR": "Ada <ada@example.org>", "KLEDGER_MODEL": "none"}
    procs = [subprocess.Popen([sys.executable, "-m", "kledger", "-C", str(tmp_path / w), "push", "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in ("a", "b")]
    codes = [p.wait(timeout=120) for p in procs]
    assert sorted(codes) == [0, 1], [p.stderr.read() for p in procs]
    winner = "ab"[codes.index(0)]
    assert remote_refs(origin)["branches"]["main"] == head(k, winner)
    ok(k("clone", origin, "c"))
    assert head(k, "c") == head(k, winner)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "manifest"])
def test_damaged_pack_is_refused_with_nothing_written(k, origin, tmp_path, damage):
    ok(k("clone", origin, "b"))
    fact(k, "a", "The Colosseum is located in", "Paris", "Colosseum")
    commit(k, "a", "three")
    ok(k("-C", "a", "push"))
    pid = remote_refs(origin)["packs"][-1]
    where = ("packs", pid, "commits.parquet")
    if damage == "flip":
        data = bytearray(read(origin, *where))
        data[len(data) // 2] ^= 0xFF
        write(origin, bytes(data), *where)
    elif damage == "truncate":
        write(origin, read(origin, *where)[:100], *where)
    elif damage == "missing":
        delete(origin, *where)
    else:
        text = read(origin, "packs", pid, MANIFEST).decode().replace('"commits"', '"commits" ', 1)
        write(origin, text.encode(), "packs", pid, MANIFEST)
    before = snapshot(tmp_path / "b" / ".kledger")
    r = k("-C", "b", "fetch", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "integrity" and "nothing was written" in r.json["error"]["message"]
    assert snapshot(tmp_path / "b" / ".kledger") == before
    r = k("clone", origin, "c", "--json")
    assert r.code == 1 and not (tmp_path / "c").exists()


def republish(origin: str, local, sql: str) -> None:
    """The remote's newest pack copied into `local`, its commits file replaced by `sql` over it
    (DuckDB, `{path}` the file), its manifest made to match, and the result published under its
    new id as the remote's only pack: files consistent with their manifest, contents not."""
    import duckdb

    from kledger.store.packs import file_sha256

    pid = remote_refs(origin)["packs"][-1]
    local.mkdir()
    for n in names(origin, "packs", pid):
        (local / n).write_bytes(read(origin, "packs", pid, n))
    path = local / "commits.parquet"
    duckdb.connect().execute(f"COPY ({sql.format(path=path)}) TO '{local / 'x.parquet'}' (FORMAT parquet)")
    os.replace(local / "x.parquet", path)
    manifest = json.loads((local / MANIFEST).read_text())
    manifest["files"]["commits"].update(sha256=file_sha256(path), bytes=path.stat().st_size)
    text = canonical_json(manifest)
    (local / MANIFEST).write_text(text)
    new_id = sha256_hex(text)
    for n in names(origin, "packs", pid):
        write(origin, (local / n).read_bytes(), "packs", new_id, n)
    remote = open_remote(origin)
    version, doc = remote.read_refs()
    assert remote.swap_refs(version, {**doc, "packs": [new_id]})


def test_forged_commit_is_refused(k, origin, tmp_path):
    """A pack whose files match its manifest but whose commit was altered (and the manifest and
    refs rewritten to match): the commit's id no longer matches its content."""
    republish(origin, tmp_path / "forged", "SELECT * REPLACE ('forged' AS message) FROM read_parquet('{path}')")
    r = k("clone", origin, "c", "--json")
    assert r.code == 1 and "does not match its id" in r.json["error"]["message"] and not (tmp_path / "c").exists()


@pytest.mark.parametrize("point", ["push-pack", "push-refs"])
def test_killed_push_leaves_the_remote_consistent(k, origin, tmp_path, point):
    fact(k, "a", "The Colosseum is located in", "Paris", "Colosseum")
    commit(k, "a", "three")
    refs = remote_refs(origin)
    r = subprocess_kledger(["-C", str(tmp_path / "a"), "push"], tmp_path, {"KLEDGER_FAULT": point})
    assert r.returncode == 137, r.stderr
    assert remote_refs(origin) == refs  # refs last: the remote still says what it said
    ok(k("clone", origin, "c"))
    assert ok(k("-C", "c", "log", "--json"))["commits"][0]["message"] == "two"
    ok(k("-C", "a", "push"))  # pushing again completes
    ok(k("-C", "c", "pull"))
    assert head(k, "c") == head(k, "a")


def test_bad_remote_input_is_one_line_and_changes_nothing(k, origin, tmp_path):
    before = snapshot(tmp_path / "a" / ".kledger")
    for args, kind in ((["remote", "add", "origin", "/x"], "state"), (["remote", "add", "a/b", "/x"], "usage"),
                       (["remote", "remove", "nope"], "usage"), (["fetch", "nope"], "usage"),
                       (["push", "origin", "nope"], "usage"), (["remote", "frob"], "usage"),
                       (["remote", "add", "x", ""], "input")):
        r = k("-C", "a", *args, "--json")
        assert r.code == 2 if kind in ("usage", "input") else r.code == 1, (args, r.err)
        assert r.json["error"]["kind"] == kind and len(r.err.strip().splitlines()) == 1
    assert snapshot(tmp_path / "a" / ".kledger") == before
    r = k("clone", origin + "-nothing-here", "z", "--json")
    assert r.code == 2 and "not a kledger remote" in r.json["error"]["message"] and not (tmp_path / "z").exists()


def test_push_to_a_location_that_holds_something_else(k, origin, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    ok(k("-C", "a", "remote", "add", "junk", junk))
    r = k("-C", "a", "push", "junk", "--json")
    assert r.code == 2 and "not a kledger remote" in r.json["error"]["message"]
    assert os.listdir(junk) == ["notes.txt"]


def test_unreachable_object_store_is_a_one_line_remote_error(k, s3_server, tmp_path, monkeypatch):
    """An object store's failure (not parametrized by kind: a directory has no endpoint to miss)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    r = k("clone", "s3://kledger-nowhere/ledger", "z", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "remote" and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "z").exists()


def test_push_refuses_a_ledger_of_another_setup(k, origin, tmp_path):
    ok(k("init", "m"))
    fact(k, "m", "The Prado is located in", "Oslo", "Prado")
    commit(k, "m", "x")
    with Ledger.open(tmp_path / "m", write=True) as lg:
        lg.store.set_meta("model", "another-model")
    ok(k("-C", "m", "remote", "add", "origin", origin))
    refs = remote_refs(origin)
    r = k("-C", "m", "push", "origin", "main", "--force", "--json")
    assert r.code == 1 and "another setup (model differ)" in r.json["error"]["message"]
    assert remote_refs(origin) == refs


def test_checkout_of_a_remote_branch_makes_a_local_one(k, origin, tmp_path):
    ok(k("-C", "a", "checkout", "-b", "topic"))
    fact(k, "a", "The Prado is located in", "Oslo", "Prado")
    commit(k, "a", "on topic")
    ok(k("-C", "a", "push", "origin", "topic"))
    ok(k("clone", origin, "b"))
    assert [r["name"] for r in ok(k("-C", "b", "branch", "--json"))["branches"]] == ["main"]
    res = ok(k("-C", "b", "checkout", "topic", "--json"))
    assert (res["branch"], res["head"]) == ("topic", head(k, "a"))
    assert ok(k("-C", "b", "status", "--json"))["upstream"]["ref"] == "origin/topic"
    assert k("-C", "b", "checkout", "nothing-like-it").code == 2


def test_pull_stops_on_a_contradiction_like_merge(k, origin, tmp_path):
    diverge(k, origin, ("The Prado is located in", "Oslo", "Prado", "Prado in Oslo"),
            ("The Prado is located in", "Lima", "Prado", "Prado in Lima"))
    before = head(k, "a")
    r = k("-C", "a", "pull", "--json")
    assert r.code == 3 and r.json["error"]["kind"] == "conflict"
    assert head(k, "a") == before and ok(k("-C", "a", "status", "--json"))["pending"]["kind"] == "merge"
    ok(k("-C", "a", "resolve", "--keep", "Lima"))
    assert ok(k("-C", "a", "status", "--json"))["upstream"]["ahead"] == 2  # its commit and the merge
    ok(k("-C", "a", "push"))
    ok(k("-C", "b", "pull"))
    assert ok(k("-C", "b", "check", "--json"))["ok"] is True


@pytest.mark.parametrize("doc", [{"packs": ["../../escape"]}, {"branches": {"../x": "0" * 64}},
                                 {"branches": {"main": "not-a-commit"}}, {"stats": "x"}])
def test_damaged_refs_are_refused_and_name_no_path_outside(k, origin, tmp_path, doc):
    ok(k("clone", origin, "b"))
    remote = open_remote(origin)
    version, current = remote.read_refs()
    assert remote.swap_refs(version, {**current, **doc})
    before = snapshot(tmp_path / "b" / ".kledger")
    r = k("-C", "b", "fetch", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "integrity" and "refs" in r.json["error"]["message"]
    assert snapshot(tmp_path / "b" / ".kledger") == before and not (tmp_path / "escape").exists()


def test_pack_of_other_columns_is_refused(k, origin, tmp_path):
    """Files that match a (rewritten) manifest but are not what a pack holds."""
    republish(origin, tmp_path / "odd", "SELECT 1 AS x")
    r = k("clone", origin, "c", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "integrity" and not (tmp_path / "c").exists()
