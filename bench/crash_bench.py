"""Crash, tamper and bad-input trials of the ledger, with the figures docs/reliability.md quotes.

  python bench/crash_bench.py                  # 10 kill trials (about a minute)
  python bench/crash_bench.py --trials 100     # the figure in docs/reliability.md

1. Kill trials. A facts-only ledger with a base commit stages 2,000 facts; `kledger commit` runs
   in a subprocess and is killed (SIGKILL) after a random delay up to the time an uninterrupted
   commit takes. Afterwards the ledger must open, pass fsck, and hold either the whole commit
   (and nothing staged) or none of it (and all 2,000 facts still staged).
2. Bad inputs. Each case runs one `kledger` command on a copy of a small ledger: it must exit
   non-zero with a one-line error and no traceback, and leave the ledger exactly as it was.
3. Tampers. Each case edits a copy of a facts-only ledger's database as an attacker or a broken
   disk would; `kledger fsck` must report it (exit non-zero).
4. Reads during a commit. On a tiny random Llama (tests/conftest_edit.py, no download), a
   `kledger commit` measures one fact with value optimisation slowed down (300 steps); meanwhile
   `kledger status` runs again and again: each must answer, and its time is recorded (the
   target: within 1 s).

Prints one line per section and a JSON summary (`--out FILE` writes it). Ratios and counts are
from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "KLEDGER_AUTHOR": "Bench <bench@example.org>", "KLEDGER_MODEL": "none", "KLEDGER_LOCK_WAIT": "2",
       "KLEDGER_DATE": "2026-01-01T00:00:00+00:00"}


def kledger(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kledger", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


def facts_file(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"prompt": f"Entity {i} is located in", "target": f"City {i % 97}",
                                 "subject": f"Entity {i}"}) + "\n")
    return path


def status(cwd: Path) -> dict | None:
    r = kledger(["status", "--json"], cwd)
    return json.loads(r.stdout) if r.returncode == 0 else None


def snapshot(ledger: Path) -> dict:
    import duckdb

    con = duckdb.connect(str(ledger / ".kledger" / "ledger.duckdb"), read_only=True)
    try:
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"').fetchall()))
                for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


def new_ledger(root: Path) -> Path:
    """A new facts-only ledger in ROOT/proj."""
    proj = root / "proj"
    proj.mkdir()
    assert kledger(["init"], proj).returncode == 0
    return proj


# ------------------------------------------------------------------------------ 1. kill trials
def make_staged_ledger(root: Path, n: int) -> Path:
    proj = new_ledger(root)
    assert kledger(["add", "--file", str(facts_file(root / "base.jsonl", 10, 10**6))], proj).returncode == 0
    assert kledger(["commit", "-m", "base"], proj).returncode == 0
    assert kledger(["add", "--file", str(facts_file(root / "staged.jsonl", n))], proj).returncode == 0
    return proj


def kill_trials(trials: int, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        template = make_staged_ledger(Path(tmp), n)
        timing = Path(tmp) / "timing"
        shutil.copytree(template, timing)
        t = time.perf_counter()
        assert kledger(["commit", "-m", "timed"], timing).returncode == 0
        full = time.perf_counter() - t
        out = {"trials": trials, "facts": n, "uninterrupted_commit_s": round(full, 2), "landed": 0, "not_landed": 0,
               "corrupt": 0, "commits_lost": 0, "staged_lost": 0}
        for i in range(trials):
            proj = Path(tmp) / f"t{i}"
            shutil.copytree(template, proj)
            proc = subprocess.Popen([sys.executable, "-m", "kledger", "commit", "-m", "killed"], cwd=proj, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0, full))
            done_before_kill = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            st = status(proj)
            ok = st is not None and kledger(["fsck"], proj).returncode == 0
            if not ok:
                out["corrupt"] += 1
            elif st["facts_in_force"] == 10 + n and not st["staged"]:
                out["landed"] += 1
            elif st["facts_in_force"] == 10 and len(st["staged"]) == n:
                out["not_landed"] += 1
                out["commits_lost"] += int(done_before_kill)  # it had reported success, yet is missing
            else:
                out["staged_lost"] += 1
            shutil.rmtree(proj)
    return out


# ------------------------------------------------------------------------------ 2. bad inputs
def bad_input_cases(root: Path) -> list[tuple[str, list[str]]]:
    files = root / "bad"
    files.mkdir()

    def write(name: str, text: str | bytes) -> str:
        p = files / name
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        return str(p)

    deep = "[" * 100_000 + "]" * 100_000
    return [
        ("empty prompt", ["add", "", "Rome", "--subject", "x"]),
        ("subject not in prompt", ["add", "The tower is in", "Rome", "--subject", "bridge"]),
        ("unknown revision", ["show", "nope"]),
        ("revision past the root", ["show", "HEAD~999"]),
        ("huge revision step", ["show", "HEAD~" + "9" * 5000]),
        ("bad branch name", ["branch", "-bad"]),
        ("branch name with newline", ["branch", "bad\n"]),
        ("5,000-character branch name", ["branch", "b" * 5000]),
        ("missing file", ["add", "--file", str(files / "nope.json")]),
        ("not UTF-8", ["add", "--file", write("latin1.jsonl", b'{"prompt": "Caf\xe9 is in", "target": "x", "subject": "Caf"}\n')]),
        ("deep nesting", ["add", "--file", write("deep.json", deep)]),
        ("4,300-digit integer", ["add", "--file", write("bigint.jsonl", '{"prompt": "' + "1" * 5000 + '"}\n')]),
        ("truncated JSON", ["add", "--file", write("cut.json", '[{"prompt": "The tower is in", "tar')]),
        ("wrong field types", ["add", "--file", write("types.jsonl", '{"prompt": 3, "target": [], "subject": {}}\n')]),
        ("CSV without columns", ["add", "--file", write("bad.csv", "a,b\n1,2\n")]),
        ("unknown format", ["add", "--file", write("x.jsonl", "{}\n"), "--format", "nope"]),
        ("text ledger that is not one", ["init", str(root / "new1"), "--from", str(files)]),
        ("empty commit message", ["commit", "-m", " "]),
        ("nothing staged", ["commit", "-m", "x"]),
        ("resolve without a conflict", ["resolve", "--keep", "Rome"]),
        ("unknown solver mode", ["apply", "--mode", "magic"]),
        ("unknown device", ["--device", "tpu", "status"]),
        ("export into the ledger", ["export", ".kledger/out"]),
        ("export onto /dev/null", ["export", "/dev/null"]),
        ("bad soft threshold", ["config", "soft-threshold", "2"]),
        ("init --set bad value", ["init", str(root / "new2"), "--set", "lam=abc"]),
        ("init --set unknown name", ["init", str(root / "new3"), "--set", "nope=1"]),
        ("eval --format without --data", ["eval", "--format", "csv"]),
    ]


def bad_inputs() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proj = new_ledger(root)
        kledger(["add", "The Eiffel Tower is located in", "Rome", "--subject", "Eiffel Tower"], proj)
        kledger(["commit", "-m", "one"], proj)
        cases = bad_input_cases(root)
        refused, failures = 0, []
        for name, args in cases:
            before = snapshot(proj)
            r = kledger(args, proj)
            lines = r.stderr.strip().splitlines()
            clean = r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr and snapshot(proj) == before
            refused += clean
            if not clean:
                failures.append({"case": name, "exit": r.returncode, "stderr": r.stderr.strip()[-300:]})
    return {"tried": len(cases), "refused_cleanly": refused, "failures": failures}


# ------------------------------------------------------------------------------ 3. tampers
TAMPERS = [
    ("fact content", "UPDATE facts SET target = 'Paris' WHERE rowid = 1"),
    ("fact matching key", "UPDATE facts SET subject_key = 'someone else' WHERE rowid = 1"),
    ("commit message", "UPDATE commits SET message = 'rewritten' WHERE seq = 1"),
    ("commit order", "UPDATE commits SET seq = 100 WHERE seq = 1"),
    ("commit parent removed", "UPDATE commits SET parents = [] WHERE seq = 2"),
    ("op retargeted", "UPDATE commit_ops SET fact_id = 'ffffffff' WHERE rowid = 1"),
    ("op deleted", "DELETE FROM commit_ops WHERE rowid = 1"),
    ("fact deleted", "DELETE FROM facts WHERE rowid = 1"),
    ("branch to a missing commit", "UPDATE refs SET commit_id = 'abcdef' WHERE name = 'main'"),
    ("branch rewound to an older commit", "UPDATE refs SET commit_id = (SELECT id FROM commits WHERE seq = 1) WHERE name = 'main'"),
    ("HEAD to a missing commit", "UPDATE meta SET value = 'abcdef0123' WHERE key = 'HEAD'"),
    ("HEAD names a bad branch", "UPDATE meta SET value = 'ref: no such' WHERE key = 'HEAD'"),
    ("staged fact missing", "INSERT INTO staged VALUES (0, 'add', 'ffffffffffff')"),
    ("constraints hash removed", "UPDATE commits SET constraints = 'x' WHERE seq = 1"),
]


def tampers() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proj = new_ledger(root)
        for i in range(2):
            kledger(["add", "--file", str(facts_file(root / f"f{i}.jsonl", 5, 10 * i))], proj)
            kledger(["commit", "-m", f"c{i}"], proj)
        assert kledger(["fsck"], proj).returncode == 0
        import duckdb

        detected, missed = 0, []
        for name, sql in TAMPERS:
            copy = root / "copy"
            shutil.copytree(proj, copy)
            con = duckdb.connect(str(copy / ".kledger" / "ledger.duckdb"))
            con.execute(sql)
            con.close()
            r = kledger(["fsck"], copy)
            if r.returncode != 0 and "Traceback" not in r.stderr:
                detected += 1
            else:
                missed.append(name)
            shutil.rmtree(copy)
    return {"tried": len(TAMPERS), "detected": detected, "missed": missed}


# ------------------------------------------------------------------------------ 4. reads during a commit
def reads_during_commit() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest_edit import FACTS, save_tiny_model_dir

    from kledger.ledger import Ledger
    from kledger.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = save_tiny_model_dir(root / "model")
        slow = {"c0_tokens": 600, "c0_seq_len": 32, "steps": 300, "early_stop_prob": 1.0, "n_prefixes": 1}
        Ledger.init(root / "p", model=str(model_dir), settings={"hparams": slow, "corpus": str(model_dir / "corpus.txt")},
                    env=Settings.from_env(ENV)).close()
        proj = root / "p"
        prompt, subject, target = FACTS[0]
        kledger(["add", prompt, target, "--subject", subject], proj)
        commit = subprocess.Popen([sys.executable, "-m", "kledger", "commit", "-m", "slow"], cwd=proj,
                                  env={**ENV, "KLEDGER_LOCK_WAIT": "60", "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times, failed = [], 0
        started = time.perf_counter()
        while commit.poll() is None:
            t = time.perf_counter()
            r = kledger(["status", "--json"], proj)
            if commit.poll() is None:
                times.append(time.perf_counter() - t)
                failed += r.returncode != 0
        commit.wait()
        total = time.perf_counter() - started
    times.sort()
    return {"commit_s": round(total, 1), "commit_ok": commit.returncode == 0, "reads": len(times), "failed": failed,
            "median_s": round(times[len(times) // 2], 3) if times else None,
            "max_s": round(times[-1], 3) if times else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="kill trials (docs/reliability.md: 100)")
    ap.add_argument("--facts", type=int, default=2000, help="facts in the commit that is killed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the JSON summary here")
    a = ap.parse_args()
    res = {"kill": kill_trials(a.trials, a.facts, a.seed), "bad_inputs": bad_inputs(), "tampers": tampers(),
           "reads_during_commit": reads_during_commit()}
    k, b, t, rd = res["kill"], res["bad_inputs"], res["tampers"], res["reads_during_commit"]
    print(f"kill trials: {k['trials']} (commit of {k['facts']} facts, {k['uninterrupted_commit_s']} s uninterrupted): "
          f"{k['landed']} landed whole, {k['not_landed']} not landed; corrupt {k['corrupt']}, "
          f"commits lost {k['commits_lost']}, staged facts lost {k['staged_lost']}")
    print(f"bad inputs: {b['refused_cleanly']}/{b['tried']} refused with one line, ledger unchanged")
    print(f"tampers: {t['detected']}/{t['tried']} detected by fsck")
    print(f"reads during a {rd['commit_s']} s commit (ok: {rd['commit_ok']}): {rd['reads']} status runs, "
          f"{rd['failed']} failed; median {rd['median_s']} s, max {rd['max_s']} s (target: within 1 s)")
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
