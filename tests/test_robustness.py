"""What real processes do to a ledger: a second writer, a kill mid-commit, a newer schema, and
read commands that must not import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import duckdb
import pytest
from conftest import snapshot, subprocess_kledger

EIFFEL = ["add", "The Eiffel Tower is located in", "Rome", "--subject", "Eiffel Tower"]


@pytest.fixture
def proj(tmp_path, env):
    assert subprocess_kledger(["init"], tmp_path).returncode == 0
    return tmp_path


def test_second_writer_is_refused_cleanly(proj):
    subprocess_kledger(EIFFEL, proj)
    before = snapshot(proj / ".kledger")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(proj / '.kledger' / 'ledger.duckdb')!r})
            print('locked', flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["commit", "-m", "while locked"], ["status"]):
            r = subprocess_kledger(args, proj)
            assert r.returncode == 1, r.stderr
            assert "in use by another process" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(proj / ".kledger") == before
    assert subprocess_kledger(["commit", "-m", "after"], proj).returncode == 0


def test_kill_mid_commit_leaves_no_half_commit(proj):
    r = subprocess_kledger(["add", "--file", str(proj.parent / "none.json")], proj)
    assert r.returncode == 2
    subprocess_kledger(EIFFEL, proj)
    subprocess_kledger(["add", "The Louvre is located in", "London", "--subject", "Louvre"], proj)
    before = snapshot(proj / ".kledger")
    r = subprocess_kledger(["commit", "-m", "dies"], proj, {"KLEDGER_FAULT": "commit"})
    assert r.returncode == 137
    # the ledger opens, is consistent, and holds none of the commit; the staged facts are still staged
    assert snapshot(proj / ".kledger") == before
    st = json.loads(subprocess_kledger(["status", "--json"], proj).stdout)
    assert st["head"] is None and len(st["staged"]) == 2
    assert subprocess_kledger(["fsck"], proj).returncode == 0
    assert subprocess_kledger(["commit", "-m", "lives"], proj).returncode == 0
    assert json.loads(subprocess_kledger(["status", "--json"], proj).stdout)["facts_in_force"] == 2


def test_ctrl_c_mid_commit_exits_non_zero_and_loses_nothing(proj):
    """A real SIGINT while `commit` runs (held inside the commit's transaction, after its first
    write): "error: aborted", exit 1 (docs/exit-codes.md), nothing of the commit, staged facts kept."""
    import signal

    subprocess_kledger(EIFFEL, proj)
    before = snapshot(proj / ".kledger")
    code = textwrap.dedent("""
        import sys, time
        from kledger.store import Store
        put = Store.put_commit
        def slow(self, commit):
            cid = put(self, commit)
            print('inside', file=sys.stderr, flush=True)
            time.sleep(30)
            return cid
        Store.put_commit = slow
        from kledger.cli import run
        sys.argv = ['kledger', 'commit', '-m', 'interrupted']
        run()
    """)
    env = {**os.environ, "KLEDGER_AUTHOR": "Ada <ada@example.org>", "KLEDGER_MODEL": "none"}
    p = subprocess.Popen([sys.executable, "-c", code], cwd=proj, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr.readline().strip() == "inside"
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=30)[1]
    finally:
        p.kill()
    assert p.returncode == 1 and "error: aborted" in rest, (p.returncode, rest)
    assert snapshot(proj / ".kledger") == before


def test_newer_schema_is_refused(proj):
    con = duckdb.connect(str(proj / ".kledger" / "ledger.duckdb"))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    for args in (["status"], EIFFEL):
        r = subprocess_kledger(args, proj)
        assert r.returncode == 1 and "schema version 99" in r.stderr and "upgrade kledger" in r.stderr


def test_not_a_ledger_file(tmp_path, env):
    (tmp_path / ".kledger").mkdir()
    (tmp_path / ".kledger" / "ledger.duckdb").write_bytes(b"this is not a database")
    r = subprocess_kledger(["status"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "ledger" in r.stderr


def test_read_commands_do_not_import_torch(proj):
    subprocess_kledger(EIFFEL, proj)
    subprocess_kledger(["commit", "-m", "one"], proj)
    code = textwrap.dedent("""
        import sys
        from kledger.cli.main import run
        cmds = [["status"], ["log"], ["log", "--oneline"], ["show"], ["diff", "HEAD", "HEAD"],
                ["blame", "Eiffel Tower"], ["branch"], ["fsck"], ["log", "--json"],
                ["conflicts"], ["conflicts", "--json"], ["check"], ["check", "--staged", "--json"], ["relation"],
                ["report", "--html", "report.html"]]
        for c in cmds:
            try:
                run(c)
            except SystemExit as e:
                assert e.code in (0, None), (c, e.code)
        heavy = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
        print("HEAVY", heavy, file=sys.stderr)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=proj, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr


def test_reads_answer_while_a_commit_measures(tmp_path, env):
    """A commit on a model ledger holds only the shared lock while it measures (Store.upgrade
    takes the write lock for the write alone), so log and status answer meanwhile."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conftest_edit import FACTS, save_tiny_model_dir

    from kledger.ledger import Ledger

    model_dir = save_tiny_model_dir(tmp_path / "model")
    slow = {"c0_tokens": 600, "c0_seq_len": 32, "steps": 300, "early_stop_prob": 1.0, "n_prefixes": 1}
    Ledger.init(tmp_path / "p", model=str(model_dir), settings={"hparams": slow, "corpus": str(model_dir / "corpus.txt")}).close()
    proj = tmp_path / "p"
    prompt, subject, target = FACTS[0]
    assert subprocess_kledger(["add", prompt, target, "--subject", subject], proj).returncode == 0
    commit = subprocess.Popen([sys.executable, "-m", "kledger", "commit", "-m", "slow"], cwd=proj,
                              env={**os.environ, "KLEDGER_AUTHOR": "t", "KLEDGER_LOCK_WAIT": "30", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads_during = 0
    try:
        while commit.poll() is None:
            r = subprocess_kledger(["status", "--json"], proj, {"KLEDGER_LOCK_WAIT": "0.5"})
            if commit.poll() is None:  # answered while the commit was still running
                assert r.returncode == 0, r.stderr
                st = json.loads(r.stdout)
                assert (len(st["staged"]), st["facts_in_force"]) in ((1, 0), (0, 1))  # before, or just after, the write
                reads_during += len(st["staged"])  # reads while it measured
    finally:
        out, err = commit.communicate(timeout=300)
    assert commit.returncode == 0, err
    assert reads_during >= 1
    assert json.loads(subprocess_kledger(["status", "--json"], proj).stdout)["facts_in_force"] == 1
