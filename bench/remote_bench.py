"""Remotes on a 1,000-fact model ledger: what a push, a clone, an incremental fetch and a push/pull
round trip move and cost, against copying the DuckDB file.

    OMP_NUM_THREADS=1 python bench/remote_bench.py --dir /tmp/kac [--work /tmp/krb] [--apply] [--kind dir|s3]

`--dir`: a ledger root built by bench/apply_cache_bench.py (the default model; `main` with one real
fact, `synthetic` with 1,000 more facts whose constraints are synthetic, of the real shapes and
fingerprint; built there when absent). `--work` (emptied first) holds the remote and the clone.
One new commit of one synthetic fact is made on the origin for the incremental fetch, and one on the
clone for the round trip (both on branch `synthetic`, which therefore grows by two per run).
`--apply`: also apply `synthetic` on both sides and compare the deltas (loads the model on the
clone once). `--kind s3`: the remote is a bucket on a local S3-compatible server (moto's standalone
server, started here; the `remote` and `test` extras) instead of a directory. Prints a report and
writes bench/out/remote_bench[-s3].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def kledger(args: list, cwd: Path) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KLEDGER_AUTHOR": "bench <bench@example.org>",
           "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "kledger", *map(str, args), "--json"], cwd=cwd, env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"kledger {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt, json.loads(p.stdout)


def one_synthetic_commit(root: Path, n: int) -> None:
    """A commit of one synthetic fact on branch `synthetic` (the real commit path, synthetic rows)."""
    from apply_bench import synthetic_facts, synthetic_measure

    from kledger.ledger import Ledger

    lg = Ledger.open(root / ".kledger", write=True)
    try:
        lg.checkout("synthetic")
        with synthetic_measure(lg.editor()):
            lg.add(synthetic_facts(n, 1))
            lg.commit(f"one more synthetic fact ({n})", author="bench")
    finally:
        lg.close()


def s3_remote() -> str:
    """A bucket on a local moto S3 server (kept running until the process ends); its credentials
    and endpoint go into the environment the kledger processes inherit."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("kledger-bench")
    return "s3://kledger-bench/ledger"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/krb"))
    ap.add_argument("--apply", action="store_true")
    ap.add_argument("--kind", choices=("dir", "s3"), default="dir")
    a = ap.parse_args()
    origin = a.dir.resolve()
    if not (origin / ".kledger" / "ledger.duckdb").exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "apply_cache_bench.py"), "--dir", str(origin), "--runs", "1"],
                       check=True)
    work = a.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    remote, clone = work / "remote", work / "clone"
    R: dict = {"kind": a.kind}
    if a.kind == "s3":
        remote = s3_remote()
    subprocess.run([sys.executable, "-m", "kledger", "-C", origin, "remote", "remove", "bench"], capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    kledger(["-C", origin, "remote", "add", "bench", remote], work)
    t1, p1 = kledger(["-C", origin, "push", "bench", "main"], work)
    t2, p2 = kledger(["-C", origin, "push", "bench", "synthetic"], work)
    R["push_all"] = {"seconds": round(t1 + t2, 2), "bytes": p1["bytes"] + p2["bytes"], "commits": p1["commits"] + p2["commits"]}
    db = origin / ".kledger" / "ledger.duckdb"
    t = time.perf_counter()
    shutil.copyfile(db, work / "copy.duckdb")
    R["copy_duckdb"] = {"seconds": round(time.perf_counter() - t, 2), "bytes": db.stat().st_size}
    tc, c = kledger(["clone", remote, clone], work)
    R["clone"] = {"seconds": round(tc, 2), "bytes": c["bytes"], "commits": c["commits"],
                  "clone_db_bytes": (clone / ".kledger" / "ledger.duckdb").stat().st_size}
    kledger(["-C", clone, "checkout", "synthetic"], work)
    n0 = 2 * int(time.time())  # fact numbers no run used before
    one_synthetic_commit(origin, n0)
    tp, p = kledger(["-C", origin, "push", "bench", "synthetic"], work)
    tf, f = kledger(["-C", clone, "fetch"], work)
    R["incremental"] = {"push_seconds": round(tp, 2), "fetch_seconds": round(tf, 2), "pushed_bytes": p["bytes"],
                        "fetched_bytes": f["bytes"], "commits": f["commits"]}
    kledger(["-C", clone, "pull"], work)
    one_synthetic_commit(clone, n0 + 1)
    tp, p = kledger(["-C", clone, "push"], work)
    tl, pl = kledger(["-C", origin, "pull", "bench", "synthetic"], work)
    R["round_trip"] = {"push_seconds": round(tp, 2), "pull_seconds": round(tl, 2), "bytes": p["bytes"],
                       "merge": pl["merge"]["result"]}
    if a.apply:
        _, da = kledger(["-C", origin, "apply", "synthetic", "--delta", work / "origin.safetensors"], work)
        _, dc = kledger(["-C", clone, "apply", "synthetic", "--delta", work / "clone.safetensors"], work)
        R["apply"] = {"facts": da["facts"], "identical_delta": (work / "origin.safetensors").read_bytes()
                      == (work / "clone.safetensors").read_bytes()}
    kledger(["-C", origin, "remote", "remove", "bench"], work)
    kledger(["-C", origin, "checkout", "main"], work)
    print(json.dumps(R, indent=1))
    (REPO / "bench" / "out").mkdir(exist_ok=True)
    name = "remote_bench" + ("-s3" if a.kind == "s3" else "")
    (REPO / "bench" / "out" / f"{name}.json").write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
