"""A commit of 32 facts on the default model measured in this process and across Ray workers:
the ratio, and where the time goes (starting the workers and loading their models, the commit).

    python bench/scale_bench.py --dir /tmp/kac [--facts 32] [--workers 0,1,2]

`--dir`: a ledger root built by bench/apply_cache_bench.py (the default model and its C0; built
there when absent). For each worker count a copy of its ledger commits CounterFact train records
from 600 (`--facts`, after those the sweeps used) on `main`: 0 measures in this process with all
the machine's threads; N > 0 on a local Ray cluster of N workers, each with cores / N threads
(kledger.edit.scale), the driver keeping the keys, the spreading and the solves. The workers are
started and their models loaded before the commit is timed, and that start is reported apart.
The constraints of every run are compared with the in-process run's (relative difference of the
values). Prints a report and writes bench/out/scale_bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def run(root: Path, work: Path, workers: int, facts: list) -> tuple[dict, dict]:
    import ray

    from kledger.edit import scale
    from kledger.ledger import Ledger
    from kledger.settings import Settings

    dst = work / f"w{workers}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / ".kledger", dst / ".kledger")
    env = Settings.from_env().with_(workers=workers, author="bench")
    lg = Ledger.open(dst / ".kledger", write=True, env=env)
    try:
        lg.checkout("main")
        lg.add(facts)
        out: dict = {"workers": workers}
        t = time.perf_counter()
        _ = lg.editor().lm  # the driver's model, loaded in every case
        out["driver_model_load_s"] = round(time.perf_counter() - t, 2)
        if workers:
            t = time.perf_counter()
            p = scale.pool(env, lg.model)
            ray.get([a.ready.remote() for _, a in p.live()])
            out["workers_start_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        cid = lg.commit(f"{len(facts)} facts, {workers} workers", author="bench")
        out["commit_s"] = round(time.perf_counter() - t, 2)
        out["per_fact_s"] = round(out["commit_s"] / len(facts), 3)
        rows = {(c.fact_id, c.layer): c.value for c in lg.store.constraints([cid])}
    finally:
        lg.close()
        for p in scale._POOLS.values():
            p.close()
        scale._POOLS.clear()
    return out, rows


def main() -> None:
    import numpy as np
    import sweep

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ksb"))
    ap.add_argument("--facts", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2")
    a = ap.parse_args()
    root = a.dir.resolve()
    if not (root / ".kledger" / "ledger.duckdb").exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "apply_cache_bench.py"), "--dir", str(root), "--runs", "1"],
                       check=True)
    facts = sweep.records(a.facts, 600)
    a.work.mkdir(parents=True, exist_ok=True)
    report, base = {"facts": a.facts, "runs": []}, None
    for w in (int(x) for x in a.workers.split(",")):
        out, rows = run(root, a.work.resolve(), w, facts)
        if base is None:
            base = rows
        else:
            num = sum(float(np.linalg.norm(rows[k] - base[k]) ** 2) for k in base)
            den = sum(float(np.linalg.norm(base[k]) ** 2) for k in base)
            out["values_rel_diff_vs_first"] = (num / den) ** 0.5
        report["runs"].append(out)
        print(json.dumps(out), flush=True)
    first = report["runs"][0]["commit_s"]
    for r in report["runs"]:
        r["speedup_vs_first"] = round(first / r["commit_s"], 2)
    print(json.dumps(report, indent=1))
    (REPO / "bench" / "out").mkdir(exist_ok=True)
    (REPO / "bench" / "out" / "scale_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
