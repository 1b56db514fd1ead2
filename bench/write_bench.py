"""Writes proportional to the change: the write commands on a small and a large ledger.

    python bench/write_bench.py [--sizes 1000,100000] [--repeat 5] [--dir DIR] [--reuse]

For each size it builds (or, with --reuse, opens) a facts-only ledger (`--model none`: no model is
loaded) like bench/ledger_bench.py's: synthetic facts in commits of 100, a branch at the middle,
and the same number of open contradictions at every size (9 commits with 2 each), so that `check`
reports the same at both sizes and only the ledger around them grows. Then
it times each command through the library, in process (so the ~0.3 s of a fresh process's
start-up does not hide how the work itself grows), median of --repeat runs, each on a change of one
fact:

  add          stage one new fact (then unstaged again, untimed)
  commit       commit one staged fact
  revert       revert that one-fact commit
  cherry-pick  cherry-pick a one-fact commit from a side branch (made untimed)
  blame        the history of one subject
  status       branch, HEAD, the count of facts in force, what is staged
  check        the contradictions open at HEAD (exit 3 on the command line)
  fsck         re-derive every hash (grows with the ledger by nature; its target is absolute)

and prints each command's time at every size and the ratio of the largest to the smallest (the
target: ≤ 1.5×; fsck ≤ 1.5 s at 100,000 facts). One run, ratios from that run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ledger_bench import build  # noqa: E402

CONFLICT_COMMITS = 9  # commits with open contradictions in every ledger, whatever its size (18 open conflicts)


def build_side(lg, name: str, n: int) -> list[str]:
    """A branch `name` off HEAD with `n` commits of one new fact each, for cherry-pick to take
    (untimed); the ids of those commits."""
    from kledger.records import Fact

    main = lg.current_branch()
    lg.checkout(name, create=True)
    made = []
    for i in range(n):
        s = f"{name} {i:04d}"
        lg.add([Fact.create(f"{s} plays the", "piano", subject=s)])
        made.append(lg.commit(f"{name} {i}", author="bench <bench@kledger.invalid>"))
    lg.checkout(main)
    return made


def timed(fn, repeat: int, before=None) -> float:
    times = []
    for i in range(repeat):
        if before:
            before(i)
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(ledger_dir: Path, repeat: int, tag: str) -> dict[str, float]:
    from kledger.ledger import Ledger
    from kledger.records import Fact

    author = "bench <bench@kledger.invalid>"

    def fact(i: int, what: str) -> Fact:
        s = f"Write {tag} {what} {i:04d}"
        return Fact.create(f"{s} is located in the country of", "Japan", subject=s)

    out: dict[str, float] = {}
    with Ledger.open(ledger_dir, write=True) as lg:
        side = build_side(lg, f"side-{tag}", repeat)
        out["add"] = timed(lambda i: lg.add([fact(i, "add")]), repeat, before=lambda i: lg.reset())
        lg.reset()

        def commit_one(i):
            lg.commit(f"one fact {i}", author=author)

        out["commit"] = timed(commit_one, repeat, before=lambda i: lg.add([fact(i, "commit")]))
        reverted = []

        def revert_one(i):
            reverted.append(lg.revert("HEAD", author=author))

        out["revert"] = timed(revert_one, repeat,
                              before=lambda i: (lg.add([fact(i, "revert")]), lg.commit(f"to revert {i}", author=author)))
        out["cherry-pick"] = timed(lambda i: lg.cherry_pick(side[i], author=author), repeat)
        out["blame"] = timed(lambda i: lg.blame("Entity 000123"), repeat)
        out["status"] = timed(lambda i: lg.status(), repeat)
        out["check"] = timed(lambda i: lg.check(), repeat)
        out["fsck"] = timed(lambda i: lg.fsck(), max(1, repeat // 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000", help="facts per ledger, comma-separated")
    ap.add_argument("--per-commit", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("bench/out/write"), help="the ledgers live here")
    ap.add_argument("--reuse", action="store_true", help="time on the ledgers already built in --dir")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    print("# write benchmark: one-fact changes on facts-only ledgers (library, in process)")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    results: dict[int, dict[str, float]] = {}
    for n in sizes:
        d = a.dir / f"facts-{n}"
        if not (a.reuse and (d / ".kledger").exists()):
            if (d / ".kledger").exists():
                import shutil
                shutil.rmtree(d / ".kledger")
            d.mkdir(parents=True, exist_ok=True)
            commits = max(1, n // a.per_commit)
            s = build(d, n, commits, conflict_every=max(1, commits // CONFLICT_COMMITS))
            print(f"build {n:,} facts in {commits:,} commits: {s:.1f} s ({s / commits * 1000:.0f} ms per commit)")
        results[n] = measure(d, a.repeat, tag=f"{time.time_ns()}")
    lo, hi = sizes[0], sizes[-1]
    head = "".join(f"{f'{n:,} facts':>16s}" for n in sizes)
    print(f"{'command (median s)':20s}{head}{f'ratio {hi // 1000}k/{lo // 1000}k':>16s}")
    for name in results[lo]:
        row = "".join(f"{results[n][name]:16.4f}" for n in sizes)
        print(f"{name:20s}{row}{results[hi][name] / results[lo][name]:15.2f}x")


if __name__ == "__main__":
    main()
