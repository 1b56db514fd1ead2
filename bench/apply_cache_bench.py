"""A cached `kledger apply` as a fresh process: what a user waits for when the weights of a
revision were solved before.

    OMP_NUM_THREADS=1 python bench/apply_cache_bench.py --dir /tmp/kac

Builds (once; `--dir` is reused when it already holds a ledger) a ledger with one real commit on
the default model with `kledger init --from ledgers/eiffel` (C0 on the default, model-sampled
corpus, then one value optimisation: about a minute on 2 cores) and, on a branch `synthetic`,
`--synthetic` (default 1,000) more facts whose constraints are synthetic, of the real shapes and
with the real fingerprint (bench/apply_bench.py's SyntheticMeasure; a cached apply reads and
hashes every constraint in force, so its cost grows with the facts). For each of the two
revisions it runs `kledger apply` and `kledger apply --delta` once to fill the apply cache, then
times each as a fresh `python -m kledger` process, `--runs` times (median reported). One extra
run of each records whether torch was imported. Prints a report and writes
bench/out/apply_cache_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: print('KLEDGER_BENCH_TORCH=%d' % ('torch' in sys.modules), file=sys.stderr))\n"
         "from kledger.cli.main import run\n"
         "run(sys.argv[1:])\n")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "KLEDGER_AUTHOR": "bench <bench@example.org>", "PYTHONPATH": str(REPO)}


def kledger(args: list[str], cwd: Path, probe: bool = False) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, "-m", "kledger", *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"kledger {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return dt, res


def add_synthetic(root: Path, n: int) -> None:
    """Branch `synthetic` off main with n synthetic facts in commits of 100 (once)."""
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from apply_bench import BATCH, synthetic_facts, synthetic_measure

    from kledger.ledger import Ledger

    lg = Ledger.open(root / ".kledger", write=True)
    try:
        if "synthetic" in lg.store.refs():
            return
        t = time.perf_counter()
        lg.checkout("synthetic", create=True)
        with synthetic_measure(lg.editor()):
            for b in range(0, n, BATCH):
                lg.add(synthetic_facts(b, min(BATCH, n - b)))
                lg.commit(f"synthetic facts {b}-{min(b + BATCH, n) - 1}", author="bench")
        lg.checkout("main")
        print(f"added {n} synthetic facts in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    finally:
        lg.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="ledger root (built here if absent)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--synthetic", type=int, default=1000, help="synthetic facts on branch `synthetic` (0: none)")
    a = ap.parse_args()
    root = a.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    built = None
    if not (root / ".kledger" / "ledger.duckdb").exists():
        built, _ = kledger(["init", "--from", str(REPO / "ledgers" / "eiffel")], root)
        print(f"built the ledger in {built:.1f} s", file=sys.stderr)
    revs = {"1 fact": "main"}
    if a.synthetic:
        revs[f"{a.synthetic + 1} facts"] = "synthetic"
        add_synthetic(root, a.synthetic)
    delta = root / "edit.safetensors"
    cases = {}
    for label, rev in revs.items():
        cases[f"apply, {label}"] = ["apply", rev, "--json"]
        cases[f"apply --delta, {label}"] = ["apply", rev, "--delta", str(delta), "--json"]
    for args in cases.values():  # fill the cache (and whatever the cached path remembers)
        kledger(args, root)
    report = {"built_s": built, "runs": a.runs, "python": sys.version.split()[0], "cases": {}}
    for name, args in cases.items():
        times, cached = [], []
        for _ in range(a.runs):
            dt, res = kledger(args, root)
            times.append(dt)
            cached.append(json.loads(res.stdout)["cached"])
        _, res = kledger(args, root, probe=True)
        torch_loaded = "KLEDGER_BENCH_TORCH=1" in res.stderr
        report["cases"][name] = {"command": "kledger " + " ".join(args), "times_s": [round(t, 3) for t in times],
                                 "median_s": round(statistics.median(times), 3), "cached": cached,
                                 "imports_torch": torch_loaded}
        print(f"{name:>30}: median {statistics.median(times):.2f} s of {a.runs} "
              f"({', '.join(f'{t:.2f}' for t in times)}), cached={all(cached)}, imports torch={torch_loaded}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "apply_cache_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
