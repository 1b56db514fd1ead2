"""Ledger scale benchmark: a ledger of 100,000 facts in 1,000 commits, then the read commands.

    python bench/ledger_bench.py [--facts 100000] [--commits 1000] [--repeat 5] [--dir DIR]

Facts are synthetic (distinct subjects over a few CounterFact-style templates) so that the size is
exact. Every --conflict-every-th commit (default 50th) records contradictions as open
(`--allow-conflicts`): a second object for an earlier subject (a hard conflict), and a capital and
a "{} is the capital of" fact that disagree through a declared inverse pair (an inverse conflict),
so `conflicts` and `check` do real work: 20 hard and 20 inverse open conflicts at the defaults.
Each read command is timed end to end as a fresh `kledger` process (what a user waits for),
median of --repeat runs, next to the time of a process that only starts Python and imports the CLI;
the ratio column is the command's time over the 1-second target. One run, ratios from that run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATES = ["{} is located in the country of", "The mother tongue of {} is", "{} was created by",
             "{} plays the", "The headquarters of {} is in", "{} is a citizen of"]
OBJECTS = ["France", "Rome", "English", "Google", "piano", "Japan", "Berlin", "Spanish", "Toyota", "guitar"]


def conflicting_facts(c: int, earlier: int) -> list:
    """Three facts that contradict: the hard one with Entity `earlier`'s fact, the last two with
    each other through the declared inverse pair (Country c's capital is City c, but City c is the
    capital of Country c+1)."""
    from kledger.records import Fact

    subject = f"Entity {earlier:06d}"
    other = OBJECTS[(earlier * 7 + 1) % len(OBJECTS)]
    return [Fact.create(TEMPLATES[earlier % len(TEMPLATES)].format(subject), other, subject=subject),
            Fact.create(f"The capital of Country {c} is", f"City {c}", subject=f"Country {c}"),
            Fact.create(f"City {c} is the capital of", f"Country {c + 1}", subject=f"City {c}")]


def build(ledger_dir: Path, n_facts: int, n_commits: int, conflict_every: int = 50) -> float:
    from kledger.ledger import Ledger
    from kledger.records import Fact

    per = n_facts // n_commits
    t0 = time.perf_counter()
    with Ledger.init(ledger_dir, model="none") as lg:  # facts only: no model is loaded
        lg.set_inverse("The capital of {} is", "{} is the capital of")
        for c in range(n_commits):
            facts = []
            open_conflicts = conflict_every > 0 and c > 0 and c % conflict_every == 0
            for j in range(per - 3 if open_conflicts else per):
                i = c * per + j
                subject = f"Entity {i:06d}"
                prompt = TEMPLATES[i % len(TEMPLATES)].format(subject)
                facts.append(Fact.create(prompt, OBJECTS[(i * 7) % len(OBJECTS)], subject=subject))
            if open_conflicts:
                facts += conflicting_facts(c, (c - 1) * per)
            lg.add(facts)
            lg.commit(f"batch {c}", author="bench <bench@kledger.invalid>", allow_conflicts=open_conflicts)
            if c == n_commits // 2:
                lg.create_branch("half")
    return time.perf_counter() - t0


def time_cmd(args: list[str], cwd: Path, repeat: int, expect: int = 0) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != expect:
            raise SystemExit(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--conflict-every", type=int, default=50, help="every N-th commit records open conflicts (0: none)")
    ap.add_argument("--dir", type=Path, default=None, help="keep the ledger here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="time the commands on the ledger already in --dir")
    a = ap.parse_args()
    root = a.dir or Path(tempfile.mkdtemp(prefix="kledger-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    if a.reuse and (root / ".kledger").exists():
        build_s = float("nan")
    else:
        if (root / ".kledger").exists():
            shutil.rmtree(root / ".kledger")
        build_s = build(root, a.facts, a.commits, a.conflict_every)
    size = sum(p.stat().st_size for p in (root / ".kledger").iterdir())
    k = [sys.executable, "-m", "kledger"]
    startup = time_cmd([sys.executable, "-c", "import kledger.cli.main"], root, a.repeat)
    mid = f"HEAD~{a.commits // 2}"
    cmds = {
        "status": ["status"],
        "log (all 1,000 commits)": ["log"],
        "log --oneline -n 20": ["log", "--oneline", "-n", "20"],
        "log --subject": ["log", "--subject", "Entity 000123", "--json"],
        "show HEAD (100 facts)": ["show"],
        f"show {mid}": ["show", mid],
        f"diff {mid} HEAD (50,000 facts)": ["diff", mid, "HEAD", "--stat"],
        "diff --json (50,000 facts)": ["diff", mid, "HEAD", "--json"],
        "blame": ["blame", "Entity 000123"],
        "branch": ["branch"],
        "conflicts (open at HEAD)": ["conflicts"],
        "conflicts --json": ["conflicts", "--json"],
        "check (exit 3)": ["check"],
        "check --json (exit 3)": ["check", "--json"],
        f"check {mid} --json (exit 3)": ["check", mid, "--json"],
    }
    expect = {name: 3 for name in cmds if "exit 3" in name} if a.conflict_every else {}
    if not a.conflict_every:
        cmds = {name.replace(" (exit 3)", ""): args for name, args in cmds.items()}
    print(f"# ledger benchmark: {a.facts:,} facts in {a.commits:,} commits")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"build (library, add + commit per batch): {build_s:.1f} s ({build_s / a.commits * 1000:.0f} ms per commit)")
    print(f"ledger size on disk: {size / 1e6:.1f} MB ({size / a.facts:.0f} bytes per fact)")
    found = subprocess.run(k + ["conflicts", "--json"], cwd=root, capture_output=True, text=True)
    kinds = [c["kind"] for c in json.loads(found.stdout)["conflicts"]]
    print(f"open conflicts at HEAD: {len(kinds)} ({kinds.count('hard')} hard, {kinds.count('inverse')} inverse)")
    print(f"python start + import kledger.cli: {startup:.3f} s")
    print(f"{'command':38s} {'median s':>9s} {'vs 1 s target':>14s}")
    for name, args in cmds.items():
        t = time_cmd(k + args, root, a.repeat, expect.get(name, 0))
        print(f"{name:38s} {t:9.3f} {t / 1.0:13.2f}x")
    if a.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
