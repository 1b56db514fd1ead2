"""Every ledger command through the CLI, in-process, on fresh ledgers."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, REPO, snapshot

EIFFEL = ("The Eiffel Tower is located in", "Rome", "--subject", "Eiffel Tower")
LOUVRE = ("The Louvre is located in", "London", "--subject", "Louvre")
DARRIEUX = ("Danielle Darrieux's mother tongue is", "English", "--subject", "Danielle Darrieux")


def commit_fact(k, fact, msg):
    assert k("add", *fact).code == 0
    r = k("commit", "-m", msg, "--json")
    assert r.code == 0, r.err
    return r.json["id"]


# ------------------------------------------------------------------ init and discovery
def test_init_creates_ledger_and_refuses_twice(k, tmp_path):
    r = k("init", "--json")
    assert r.code == 0
    assert r.json["path"] == str(tmp_path / ".kledger") and r.json["branch"] == "main"
    assert (tmp_path / ".kledger" / "ledger.duckdb").is_file()
    r = k("init")
    assert r.code == 1 and "already exists" in r.err


def test_commands_find_ledger_upward_and_ledger_option(k, tmp_path, monkeypatch):
    k("init", "proj")
    (tmp_path / "proj" / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "proj" / "a" / "b")
    assert k("status", "--json").json["branch"] == "main"
    monkeypatch.chdir(tmp_path)
    r = k("status")
    assert r.code == 1 and "kledger init" in r.err and len(r.err.strip().splitlines()) == 1
    assert k("--ledger", "proj", "status", "--json").json["facts_in_force"] == 0
    assert k("--ledger", "proj/.kledger", "status").code == 0
    assert k("--ledger", "nowhere", "status").code == 1


def test_version_and_usage_errors(k):
    assert k("--version").out.startswith("kledger ")
    r = k("log", "--bogus")
    assert r.code == 2 and "no such option" in r.err.lower()


# ------------------------------------------------------------------ staging and committing
def test_add_status_reset_commit(k, ledger_dir):
    assert k("add", *EIFFEL).code == 0
    assert k("add", *LOUVRE).code == 0
    st = k("status", "--json").json
    assert [s["target"] for s in st["staged"]] == ["Rome", "London"]
    assert st["staged"][0]["relation"] == "The {} is located in"
    assert k("add", *EIFFEL, "--json").json == {"version": 1, "command": "add", "staged": 0, "skipped": 1, "fact_ids": []}
    assert k("reset", "Louvre", "--json").json["unstaged"] == 1
    assert len(k("status", "--json").json["staged"]) == 1
    r = k("commit", "-m", "Move the Eiffel Tower", "--author", "Bob <bob@x>", "--json")
    assert r.code == 0 and r.json["added"] == 1
    st = k("status", "--json").json
    assert st["staged"] == [] and st["facts_in_force"] == 1 and st["head"] == r.json["id"]
    show = k("show", "--json").json
    assert show["author"] == "Bob <bob@x>" and show["message"] == "Move the Eiffel Tower"
    assert show["ops"][0]["op"] == "add" and show["ops"][0]["target"] == "Rome"
    # re-adding a fact in force is a no-op
    assert k("add", *EIFFEL, "--json").json["staged"] == 0
    assert k("status").code == 0


def test_commit_ids_are_content_addressed(k, tmp_path, monkeypatch):
    monkeypatch.setenv("KLEDGER_DATE", "2026-01-01T00:00:00+00:00")
    # same content in two ledgers → same id; a different message → a different id
    out = []
    for d, msg in (("a", "m"), ("b", "m"), ("c", "other")):
        k("init", d)
        k("--ledger", d, "add", *EIFFEL)
        out.append(k("--ledger", d, "commit", "-m", msg, "--json").json["id"])
    assert out[0] == out[1] != out[2]
    assert len(out[0]) == 64


def test_commit_errors_leave_ledger_unchanged(k, ledger_dir):
    r = k("commit", "-m", "nothing")
    assert r.code == 1 and "nothing staged" in r.err
    k("add", *EIFFEL)
    before = snapshot(ledger_dir)
    r = k("commit", "-m", "  ")
    assert r.code == 2 and "empty commit message" in r.err
    assert snapshot(ledger_dir) == before


@pytest.mark.parametrize("args, needle", [
    (("The Eiffel Tower is located in", "Rome", "--subject", "Big Ben"), "does not occur in prompt"),
    (("The Eiffel Tower is located in", "  ", "--subject", "Eiffel Tower"), "empty target"),
    (("The Eiffel Tower is located in", "Rome"), "missing --subject"),
    (("The Eiffel Tower is located in",), "missing PROMPT and TARGET"),
])
def test_add_bad_input(k, ledger_dir, args, needle):
    before = snapshot(ledger_dir)
    r = k("add", *args)
    assert r.code == 2 and needle in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert snapshot(ledger_dir) == before


def test_add_file_formats(k, ledger_dir, tmp_path):
    r = k("add", "--file", DATA / "counterfact-train.json", "--limit", "300", "--json")
    assert r.code == 0 and r.json["staged"] >= 290
    r = k("add", "--file", DATA / "zsre-train-1k.json", "--limit", "50", "--json")
    assert r.code == 0 and r.json["staged"] == 50
    (tmp_path / "f.csv").write_text("prompt,target,subject\nThe Louvre is located in,London,Louvre\n")
    assert k("add", "--file", tmp_path / "f.csv", "--json").json["staged"] == 1
    (tmp_path / "f.jsonl").write_text(json.dumps({"prompt": "The Louvre is in", "target": "Oslo", "subject": "Louvre"}) + "\n")
    assert k("add", "--file", tmp_path / "f.jsonl", "--json").json["staged"] == 1
    staged = k("status", "--json").json["staged"]
    assert staged[0]["target_true"] is not None and staged[0]["paraphrases"]


@pytest.mark.parametrize("content, needle", [
    ('[{"prompt": "The Louvre is in", "target": "Oslo", "subject": "Louvre"}', "JSON"),  # truncated
    ('[{"prompt": "The Louvre is in", "target": "Oslo", "subject": "Louvre"}, {"prompt": }]', "JSON"),
    ('[{"prompt": "The Louvre is in", "target": "Oslo", "subject": "Paris"}]', "does not occur"),
    ('[{"prompt": "The Louvre is in", "target": "", "subject": "Louvre"}]', "target"),
])
def test_add_bad_files_change_nothing(k, ledger_dir, tmp_path, content, needle):
    k("add", *EIFFEL)
    before = snapshot(ledger_dir)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    r = k("add", "--file", bad)
    assert r.code == 2 and needle in r.err and "bad.json" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert snapshot(ledger_dir) == before


def test_rm_stages_retraction(k, ledger_dir):
    commit_fact(k, EIFFEL, "one")
    assert k("rm", "eiffel tower").code == 0
    assert k("status", "--json").json["staged"][0]["op"] == "retract"
    k("commit", "-m", "gone")
    assert k("status", "--json").json["facts_in_force"] == 0
    assert k("rm", "Eiffel Tower").code == 2


# ------------------------------------------------------------------ revisions and history
@pytest.fixture
def history(k, ledger_dir):
    """main: c1 (Eiffel→Rome) ← c2 (Louvre→London) ← c3 (Darrieux→English)."""
    return [commit_fact(k, EIFFEL, "first"), commit_fact(k, LOUVRE, "second"), commit_fact(k, DARRIEUX, "third")]


def test_revisions_resolve_like_git(k, history):
    c1, c2, c3 = history
    for rev, want in [("HEAD", c3), ("HEAD~1", c2), ("HEAD^", c2), ("HEAD~2", c1), ("HEAD^^", c1), ("main", c3),
                      (c2[:7], c2), (c2, c2), ("main~2", c1), ("HEAD^0", c3)]:
        assert k("show", rev, "--json").json["id"] == want, rev
    for rev, needle in [("HEAD~5", "past the first commit"), ("nope", "unknown revision"), ("HEAD^2", "no parent number 2")]:
        r = k("show", rev)
        assert r.code == 2 and needle in r.err


def test_log_formats_and_filters(k, history):
    c1, c2, c3 = history
    log = k("log", "--json").json
    assert [c["id"] for c in log["commits"]] == [c3, c2, c1] and log["branch"] == "main"
    assert log["commits"][0]["refs"] == ["main"] and log["commits"][1]["parents"] == [c1]
    one = k("log", "--oneline").out.strip().splitlines()
    assert len(one) == 3 and one[0].startswith(c3[:10]) and "third" in one[0]
    assert [c["id"] for c in k("log", "-n", "2", "--json").json["commits"]] == [c3, c2]
    assert [c["id"] for c in k("log", "--subject", "louvre", "--json").json["commits"]] == [c2]
    assert [c["id"] for c in k("log", "--relation", "{}'s mother tongue is", "--json").json["commits"]] == [c3]
    assert [c["id"] for c in k("log", "HEAD~1", "--json").json["commits"]] == [c2, c1]
    assert "Author: Ada" in k("log").out


def test_diff_added_removed_changed(k, history):
    c1, c2, c3 = history
    d = k("diff", c1, c3, "--json").json
    assert sorted(f["subject"] for f in d["added"]) == ["Danielle Darrieux", "Louvre"] and d["removed"] == []
    k("rm", "Louvre")
    k("add", "The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower")
    k("rm", "Eiffel Tower")
    staged = k("diff", "--json").json  # HEAD against staged
    assert [f["subject"] for f in staged["removed"]] == ["Louvre"]
    assert staged["changed"][0]["target"] == "Berlin" and staged["changed"][0]["before"]["target"] == "Rome"
    k("commit", "-m", "move again")
    d = k("diff", "HEAD~1", "--json").json  # one revision: against HEAD
    assert len(d["changed"]) == 1 and len(d["removed"]) == 1 and d["added"] == []
    assert "1 changed" in k("diff", "HEAD~1", "HEAD", "--stat").out


def test_blame_names_the_commit_in_force(k, history):
    c1, _, _ = history
    b = k("blame", "EIFFEL TOWER.", "--json").json["facts"]
    assert len(b) == 1 and b[0]["commit"] == c1 and b[0]["target"] == "Rome" and b[0]["message"] == "first"
    k("rm", "Eiffel Tower")
    k("add", "The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower")
    c4 = k("commit", "-m", "berlin", "--json").json["id"]
    b = k("blame", "Eiffel Tower", "--relation", "The {} is located in", "--json").json["facts"]
    assert [(x["commit"], x["target"]) for x in b] == [(c4, "Berlin")]
    assert k("blame", "Eiffel Tower", "--rev", "HEAD~1", "--json").json["facts"][0]["commit"] == c1
    assert "No fact" in k("blame", "Nobody").out


# ------------------------------------------------------------------ branches and rearranging
def test_branch_checkout(k, history):
    c1, c2, c3 = history
    assert k("branch", "old", "HEAD~2").code == 0
    assert k("branch", "old").code == 1  # exists
    assert k("branch", "bad..name").code == 2
    rows = k("branch", "--json").json["branches"]
    assert [(r["name"], r["current"]) for r in rows] == [("main", True), ("old", False)]
    assert k("checkout", "old").code == 0
    st = k("status", "--json").json
    assert (st["branch"], st["head"], st["facts_in_force"]) == ("old", c1, 1)
    assert k("branch", "-d", "old").code == 1  # current
    k("checkout", c2[:8])
    st = k("status", "--json").json
    assert st["branch"] is None and st["head"] == c2
    commit_fact(k, ("The Louvre is located in", "Madrid", "--subject", "The Louvre"), "detached work")
    assert k("checkout", "-b", "topic").code == 0
    assert k("status", "--json").json["branch"] == "topic"
    k("checkout", "main")
    assert k("branch", "-d", "old").code == 0
    assert [r["name"] for r in k("branch", "--json").json["branches"]] == ["main", "topic"]


def test_revert_retracts_and_restores(k, history):
    c1, c2, c3 = history
    r = k("revert", c2, "--json")
    assert r.code == 0 and r.json["retracted"] == 1 and r.json["meta"] == {"reverts": c2}
    assert "Louvre" not in {f["subject"] for f in k("blame", "Louvre", "--json").json["facts"]}
    assert k("show", "--json").json["message"] == 'Revert "second"'
    r = k("revert", "HEAD")  # revert the revert: the fact comes back
    assert r.code == 0
    assert k("blame", "Louvre", "--json").json["facts"][0]["commit"] == k("show", "--json").json["id"]
    r = k("revert", "HEAD~1")  # the first revert again: Louvre is in force already
    assert r.code == 1 and "changes nothing" in r.err
    assert k("revert", "HEAD").code == 0
    r = k("revert", c2)  # reverting a change that is already undone does nothing
    assert r.code == 1 and "changes nothing" in r.err


def test_cherry_pick(k, history):
    c1, c2, c3 = history
    k("checkout", "-b", "side", c1)
    r = k("cherry-pick", c3[:8], "--json")
    assert r.code == 0 and r.json["meta"] == {"cherry_picked_from": c3}
    facts = {f["subject"] for f in k("diff", c1, "side", "--json").json["added"]}
    assert facts == {"Danielle Darrieux"}
    assert k("show", "--json").json["author"] == "Ada <ada@example.org>"
    r = k("cherry-pick", c3)
    assert r.code == 1 and "changes nothing" in r.err


def test_merge_fast_forward_merge_commit_and_up_to_date(k, history):
    c1, c2, c3 = history
    k("checkout", "-b", "feat")
    c4 = commit_fact(k, ("Toko Yasuda, the", "piano", "--subject", "Toko Yasuda"), "feat work")
    k("checkout", "main")
    assert k("merge", "feat", "--json").json["result"] == "fast-forward"
    assert k("status", "--json").json["head"] == c4
    assert k("merge", "feat", "--json").json["result"] == "up-to-date"
    k("checkout", "-b", "feat2", c3)
    c5 = commit_fact(k, ("Apple A5 was created by", "Google", "--subject", "Apple A5"), "feat2 work")
    k("checkout", "main")
    r = k("merge", "feat2", "--json")
    assert r.code == 0 and r.json["result"] == "merge" and r.json["added"] == 1
    m = k("show", "--json").json
    assert m["parents"] == [c4, c5] and m["meta"]["merge_base"] == c3
    assert k("show", "HEAD^2", "--json").json["id"] == c5
    assert k("status", "--json").json["facts_in_force"] == 5
    assert {c["id"] for c in k("log", "--json").json["commits"]} >= {c4, c5}


def test_merge_with_contradiction_stops_and_records(k, history, ledger_dir):
    c1, c2, c3 = history
    # both sides change the same fact: Rome → Berlin there, Rome → Lima here
    k("checkout", "-b", "berlin", c1)
    k("rm", "Eiffel Tower")
    commit_fact(k, ("The EIFFEL TOWER is located in", "Berlin", "--subject", "EIFFEL TOWER"), "berlin")
    k("checkout", "main")
    k("rm", "Eiffel Tower")
    c3 = commit_fact(k, ("The Eiffel Tower is located in", "Lima", "--subject", "Eiffel Tower"), "lima")
    before = snapshot(ledger_dir)
    r = k("merge", "berlin", "--json")
    assert r.code == 3 and "merge stopped" in r.err and "kledger resolve" in r.err
    assert r.json["error"]["kind"] == "conflict"
    st = k("status", "--json").json
    assert st["pending"]["kind"] == "merge" and len(st["pending"]["conflicts"]) == 1
    assert st["head"] == c3  # no commit was made
    after = snapshot(ledger_dir)
    assert {t: v for t, v in after.items() if t != "pending"} == {t: v for t, v in before.items() if t != "pending"}
    k("add", *LOUVRE[:1], "Oslo", "--subject", "Louvre")
    assert k("commit", "-m", "x").code == 1  # a merge is in progress
    assert k("checkout", "berlin").code == 1
    assert k("merge", "--abort").code == 0
    assert k("status", "--json").json["pending"] is None
    # the user may record the contradiction as open
    k("reset")
    r = k("merge", "berlin", "--allow-conflicts", "--json")
    assert r.code == 0 and r.json["result"] == "merge"
    assert len(k("show", "--json").json["meta"]["open_conflicts"]) == 1


def test_commit_refuses_contradiction(k, history, ledger_dir):
    k("add", "The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower")
    before = snapshot(ledger_dir)
    r = k("commit", "-m", "contradicts")
    assert r.code == 3 and "Berlin" in r.err and "Rome" in r.err
    assert snapshot(ledger_dir) == before
    assert k("commit", "-m", "recorded", "--allow-conflicts").code == 0


def test_cherry_pick_with_contradiction_stops(k, history):
    c1, _, _ = history
    k("checkout", "-b", "other", c1)
    k("rm", "Eiffel Tower")
    k("add", "The Eiffel Tower is located in", "Oslo", "--subject", "Eiffel Tower")
    c_oslo = k("commit", "-m", "oslo", "--json").json["id"]
    k("checkout", "main")
    k("add", "The Eiffel Tower is located in", "Lima", "--subject", "Eiffel Tower")
    k("rm", "Eiffel Tower")  # retract Rome, keep Lima staged
    k("commit", "-m", "lima", "--allow-conflicts")
    r = k("cherry-pick", c_oslo)
    assert r.code == 3 and "cherry-pick stopped" in r.err
    assert k("cherry-pick", "--abort").code == 0
    assert k("cherry-pick", "--abort").code == 1


# ------------------------------------------------------------------ integrity, export, replay
def test_fsck_detects_tampering(k, history, ledger_dir):
    assert k("fsck", "--json").json["ok"] is True
    import duckdb

    con = duckdb.connect(str(ledger_dir / "ledger.duckdb"))
    con.execute("UPDATE facts SET target = 'Tokyo' WHERE subject = 'Louvre'")
    con.execute("UPDATE commits SET message = 'forged' WHERE message = 'first'")
    con.close()
    r = k("fsck", "--json")
    assert r.code == 1
    problems = k("fsck", "--json").json["problems"]
    assert any("fact" in p and "does not match" in p for p in problems)
    assert any("commit" in p and "does not match" in p for p in problems)


def test_export_and_init_from_round_trip(k, history, tmp_path):
    k("branch", "side", "HEAD~1")
    k("export", tmp_path / "text")
    assert (tmp_path / "text" / "commits.jsonl").read_text().count("\n") == 3
    r = k("init", "copy", "--from", tmp_path / "text", "--json")
    assert r.code == 0 and r.json["commits"] == 3
    a = k("log", "--all", "--json").json["commits"]
    b = k("--ledger", "copy", "log", "--all", "--json").json["commits"]
    assert [c["id"] for c in a] == [c["id"] for c in b]  # content-addressed: identical ids
    assert k("--ledger", "copy", "branch", "--json").json["branches"] == k("branch", "--json").json["branches"]
    assert k("--ledger", "copy", "fsck").code == 0


def test_init_from_bad_text_ledger_creates_nothing(k, tmp_path, history):
    k("export", tmp_path / "text")
    lines = (tmp_path / "text" / "commits.jsonl").read_text().splitlines()
    (tmp_path / "text" / "commits.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    r = k("init", "copy", "--from", tmp_path / "text")
    assert r.code == 2 and "commits.jsonl:2" in r.err
    assert not (tmp_path / "copy" / ".kledger").exists()


def test_example_ledgers_replay(k, tmp_path):
    from conftest import REPO

    examples = sorted(p for p in (REPO / "ledgers").iterdir() if p.is_dir())
    assert examples, "ledgers/ should hold at least one example"
    for ex in examples:
        r = k("init", tmp_path / ex.name, "--from", ex, "--json")
        assert r.code == 0, r.err
        assert k("--ledger", tmp_path / ex.name, "fsck").code == 0
        assert k("--ledger", tmp_path / ex.name, "log", "--all", "--json").json["commits"]


def test_revert_that_reintroduces_a_contradiction_stops(k, ledger_dir):
    commit_fact(k, EIFFEL, "rome")
    k("rm", "Eiffel Tower")
    commit_fact(k, ("The Eiffel Tower is located in", "Berlin", "--subject", "Eiffel Tower"), "berlin")
    k("rm", "Eiffel Tower")
    commit_fact(k, ("The Eiffel Tower is located in", "Lima", "--subject", "Eiffel Tower"), "lima")
    r = k("revert", "HEAD~1")  # would bring Berlin back beside Lima
    assert r.code == 3 and "revert stopped" in r.err
    assert k("status", "--json").json["pending"]["kind"] == "revert"
    assert k("revert", "--abort").code == 0
    assert k("revert", "HEAD~1", "--allow-conflicts").code == 0


def test_identical_commit_on_two_branches_is_one_object(k, ledger_dir, monkeypatch):
    monkeypatch.setenv("KLEDGER_DATE", "2026-01-01T00:00:00+00:00")
    commit_fact(k, LOUVRE, "base")
    k("checkout", "-b", "a")
    a = commit_fact(k, EIFFEL, "same")
    k("checkout", "-b", "b", "main")
    b = commit_fact(k, EIFFEL, "same")
    assert a == b and k("fsck").code == 0


def test_option_misuse_is_refused(k, ledger_dir, tmp_path):
    assert k("add", "--file", DATA / "zsre-train-1k.json", "--subject", "x").code == 2
    assert k("add", *EIFFEL, "--limit", "3").code == 2
    assert k("log", "HEAD", "--all").code == 2
    r = k("commit", "--json")  # missing -m: still a JSON error document
    assert r.code == 2 and r.json["error"]["kind"] == "usage"
    assert k().code == 0  # no arguments: help


def test_init_honours_ledger_option(k, tmp_path):
    assert k("-C", "there", "init").code == 0
    assert (tmp_path / "there" / ".kledger" / "ledger.duckdb").is_file()


def test_init_from_bad_refs(k, tmp_path, ledger_dir):
    commit_fact(k, EIFFEL, "one")
    k("export", tmp_path / "text")
    (tmp_path / "text" / "refs.json").write_text('{"branches": {"main": "0123abcd"}, "head": "ref: main"}')
    r = k("init", "copy", "--from", tmp_path / "text")
    assert r.code == 2 and "not in commits.jsonl" in r.err
    (tmp_path / "text" / "refs.json").write_text("[1]")
    assert k("init", "copy", "--from", tmp_path / "text").code == 2
    assert not (tmp_path / "copy" / ".kledger").exists()


# ------------------------------------------------------------------ the shape of kledger/cli
CLI_DIR = REPO / "kledger" / "cli"
SHARED = {"app", "output", "reads"}  # what command modules may import; main imports the command modules


def _cli_modules() -> list[str]:
    return sorted(p.stem for p in CLI_DIR.glob("*.py") if p.stem != "__init__")


def _cli_imports(name: str) -> set[str]:
    """The kledger.cli modules that kledger/cli/NAME.py imports (at the top or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse((CLI_DIR / f"{name}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kledger.cli."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("kledger.cli.")}
    return found


def test_cli_modules_import_no_circle():
    commands = set(_cli_modules()) - SHARED - {"main", "fast"}  # fast: the entry point's fast path
    assert commands, "no command modules found"
    for name in _cli_modules():
        imported = _cli_imports(name)
        if name not in ("main", "fast"):  # fast: the entry point's fast path reports errors through main
            assert "main" not in imported, f"kledger/cli/{name}.py imports .main (main imports the commands)"
        if name in commands:
            assert imported <= SHARED, f"command module {name}.py imports {sorted(imported - SHARED)}: " \
                                       f"share through app.py or output.py instead"
        elif name in SHARED:
            assert not imported & commands, f"{name}.py imports command module(s) {sorted(imported & commands)}"
    assert "fast" not in _cli_imports("main")  # the fast path hands over to main, never the reverse


def test_each_cli_module_imports_on_its_own():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import kledger.cli.{name}"], env=env, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in _cli_modules()}
    failed = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failed[name] = output.strip().splitlines()[-1:]
    assert not failed, f"these kledger.cli modules fail to import in a fresh process: {failed}"


def test_help_order_names_every_command():
    import typer

    from kledger.cli import main

    main._register()
    registered = list(typer.main.get_command(main.app).commands)
    assert sorted(registered) == sorted(main.HELP_ORDER), "add the new command to main.HELP_ORDER"
    assert registered == list(main.HELP_ORDER)


def test_option_errors_come_before_the_ledger_is_opened(k, tmp_path, monkeypatch):
    """Usage errors are reported as such even outside a ledger or on an existing one (the checks
    live in the library, and run before it opens or creates anything)."""
    r = k("eval", "--format", "csv", "--json")  # no ledger here
    assert r.code == 2 and r.json["error"]["kind"] == "usage" and "--format applies to --data only" in r.err
    r = k("init", "--set", "lam=abc")
    assert r.code == 2 and "bad hyper-parameter value" in r.err and "Traceback" not in r.err
    assert not (tmp_path / ".kledger").exists()
    assert k("init").code == 0
    for args, needle in ((("--set", "nope=1"), "unknown hyper-parameters"), (("--corpus", "/no/such/file"), "does not exist")):
        r = k("init", *args)
        assert r.code == 2 and needle in r.err


def test_device_option_replaces_the_environment_variable(k, ledger_dir, monkeypatch):
    monkeypatch.setenv("KLEDGER_DEVICE", "bogus")
    assert k("--device", "cpu", "log").code == 0
    r = k("log")
    assert r.code == 2 and "unknown device 'bogus'" in r.err


def test_eval_plot_implies_the_history():
    from kledger.ledger import Ledger

    assert Ledger.eval_options(plot="x.png", history=False).history is True


def test_new_commit_lines_name_the_branch_and_fsck_says_what_it_counted(k, ledger_dir):
    """As git: `[main 65aa456b51] Revert ...` for revert, cherry-pick, merge and resolve too."""
    for args in (["add", "The Louvre is located in", "Oslo", "--subject", "Louvre"], ["commit", "-m", "oslo"],
                 ["add", "The Prado is located in", "Lima", "--subject", "Prado"], ["commit", "-m", "lima"]):
        assert k(*args).code == 0
    r = k("revert", "HEAD")
    assert r.code == 0 and r.err.startswith("[main ") and "Revert" in r.err
    assert k("checkout", "-b", "side", "HEAD~2").code == 0
    r = k("cherry-pick", "main~1")
    assert r.code == 0 and r.err.startswith("[side ")
    assert k("checkout", "main").code == 0
    r = k("merge", "side", "--no-ff")
    assert r.code == 0 and r.err.startswith("[main "), r.err
    assert k("add", "The Louvre is located in", "Rome", "--subject", "Louvre").code == 0
    assert k("commit", "-m", "rome", "--allow-conflicts").code == 0
    r = k("resolve", "--keep", "Rome")
    assert r.code == 0 and "[main " in r.err
    assert k("add", "The Colosseum is located in", "Paris", "--subject", "Colosseum").code == 0
    assert k("reset").code == 0
    r = k("fsck")
    st = k("status", "--json").json
    assert r.code == 0 and f"({st['facts_in_force']} in force at HEAD" in r.err
    assert k("fsck", "--json").json["facts_in_force"] == st["facts_in_force"]


def test_status_during_a_stopped_merge_names_what_is_merged(k, ledger_dir):
    for args in (["add", "The Prado is located in", "Oslo", "--subject", "Prado"], ["commit", "-m", "prado"],
                 ["checkout", "-b", "experiment", "HEAD"],
                 ["add", "The Louvre is located in", "Lima", "--subject", "Louvre"], ["commit", "-m", "lima"],
                 ["checkout", "main"], ["add", "The Louvre is located in", "Rome", "--subject", "Louvre"],
                 ["commit", "-m", "rome"]):
        assert k(*args).code == 0, args
    assert k("merge", "experiment").code == 3
    r = k("status")
    assert "A merge of 'experiment' (" in r.out + r.err
    assert k("status", "--json").json["pending"]["theirs_name"] == "experiment"


def test_log_graph_and_show_stat(k, ledger_dir):
    for args in (["add", "The Prado is located in", "Oslo", "--subject", "Prado"], ["commit", "-m", "base"],
                 ["checkout", "-b", "side"], ["add", "The Louvre is located in", "Lima", "--subject", "Louvre"],
                 ["commit", "-m", "on side"], ["checkout", "main"],
                 ["add", "The Colosseum is located in", "Rome", "--subject", "Colosseum"],
                 ["add", "Paris is the capital of", "Italy", "--subject", "Paris"], ["commit", "-m", "on main"],
                 ["merge", "side"]):
        assert k(*args).code == 0, args
    r = k("log", "--graph", "--oneline")
    lines = r.out.splitlines()
    assert r.code == 0 and len(lines) == 6, r.out
    assert lines[0].startswith("* ") and "Merge 'side'" in lines[0]
    assert lines[1] == "|\\" and lines[2].startswith("* | ") and "on main" in lines[2]  # newest first
    assert lines[3].startswith("| * ") and "on side" in lines[3]
    assert lines[4] == "|/" and lines[5].startswith("* ") and "base" in lines[5]
    full = k("log", "--graph").out.splitlines()
    assert full[0].startswith("* commit ") and full[1] == "|\\" and all(x[0] in "|*" for x in full if x)
    r = k("show", "--stat", "HEAD~1")
    assert r.code == 0 and "2 relation(s), 2 fact(s) added, 0 retracted" in r.out
    assert "Colosseum" not in r.out  # counts, not the facts themselves


def test_init_checks_the_model_can_be_found_offline(k, tmp_path):
    r = k("init", "x", "--model", tmp_path / "no-such-model", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "model" and "offline" in r.json["error"]["message"]
    assert not (tmp_path / "x").exists()
    r = k("init", "y", "--model", "someone/not-downloaded", "--json")
    assert r.code == 1 and "Hugging Face cache" in r.json["error"]["message"] and not (tmp_path / "y").exists()
    assert k("init", "z", "--model", "none").code == 0  # nothing to load


def test_help_shows_whole_first_sentences_and_named_metavariables(k, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    r = k("--help")
    assert r.code == 0 and "..." not in r.out.split("Commands:")[1]
    assert "Write the whole history as text (replay it with `kledger init" in " ".join(r.out.split())
    r = k("add", "--help")
    assert r.code == 0 and "--subject SUBJECT" in r.out and "<str>" not in r.out and "<path>" not in r.out
    assert "[PROMPT] [TARGET]" in r.out
