"""Commit cost per fact as a user pays it: one `kledger commit` of N staged facts against N
one-fact `kledger commit` processes made one after another, each a fresh process (Python start,
imports, model load, apply(parent), the edit, the write). Two ledgers on the default model in a
temporary directory; C0 and the model cache are made before the clock starts (by committing one
other fact first, in both ledgers), `kledger add` is not timed. Prints JSON.

    OMP_NUM_THREADS=1 python bench/commit_cli_bench.py [--facts 32] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_eval import counterfact  # noqa: E402


def kl(root: Path, *args: str) -> float:
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "kledger", *args], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "KLEDGER_AUTHOR": "bench <bench@example.org>"})
    if r.returncode != 0:
        raise SystemExit(f"kledger {' '.join(args)} failed: {r.stderr.strip()}")
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=32)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    top = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="kledger-commit-bench-"))
    recs = counterfact(a.facts)
    warm = counterfact(1, start=a.facts + 100)
    out: dict = {"facts": len(recs), "threads": os.environ.get("OMP_NUM_THREADS")}
    for way in ("batched", "one_at_a_time"):
        root = top / way
        root.mkdir(parents=True, exist_ok=True)
        kl(root, "init")
        w = warm[0]  # one other fact, committed before the clock: model cache, default corpus, C0
        kl(root, "add", w["prompt"], w["target_new"], "--subject", w["subject"])
        kl(root, "commit", "-m", "warm-up")
        total = 0.0
        if way == "batched":
            for r in recs:
                kl(root, "add", r["prompt"], r["target_new"], "--subject", r["subject"])
            total = kl(root, "commit", "-m", f"{len(recs)} facts")
        else:
            for i, r in enumerate(recs):
                kl(root, "add", r["prompt"], r["target_new"], "--subject", r["subject"])
                total += kl(root, "commit", "-m", f"fact {i}")
        out[f"{way}_s_per_fact"] = round(total / len(recs), 2)
        print(f"{way}: {total:.1f} s for {len(recs)} facts", file=sys.stderr, flush=True)
    out["ratio_one_at_a_time_over_batched"] = round(out["one_at_a_time_s_per_fact"] / out["batched_s_per_fact"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
