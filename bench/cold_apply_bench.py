"""A cold `kledger apply` as a fresh process, against the solve floor: what a user waits for the
first time a revision is applied (no apply cache), with and without `--out`.

    OMP_NUM_THREADS=1 python bench/cold_apply_bench.py --dir /tmp/kac [--code DIR] [--runs 3]

`--dir`: a ledger root built by bench/apply_cache_bench.py (the default model, `main` with one
real fact and branch `synthetic` with 1,000 more facts whose constraints are synthetic; built here
the same way when absent). `--code`: the kledger checkout whose code runs the commands (default:
this one), to time an older commit on the same ledger. Each run deletes the ledger's apply cache
first, then times `kledger apply REV --json` and `kledger apply REV --out DIR --json` as fresh
processes (median of `--runs`). The floor is timed in this process on the same tensors: per edited
layer the Gram matrices λC0 + KᵀK and Kᵀ(V − K W0ᵀ) and one float64 Cholesky solve (as in
bench/apply_bench.py); for a small revision, also the Woodbury solve's arithmetic that `apply`
now runs instead (kledger.edit.prior). Prints the ratios and writes bench/out/cold_apply_bench.json.
The kept inverse of λC0 (`.kledger/cache/prior/`) is not deleted: like C0, it is made once per
ledger (when C0 is stored, or by the first apply of code that keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: print('KLEDGER_BENCH_MODULES=%d,%d' % ('torch' in sys.modules, "
         "'transformers' in sys.modules), file=sys.stderr))\n"
         "from kledger.cli.main import run\n"
         "run(sys.argv[1:])\n")


def run_cold(code: Path, root: Path, args: list[str]) -> tuple[float, dict, str]:
    shutil.rmtree(root / ".kledger" / "cache" / "apply", ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(code), "NO_COLOR": "1"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=root, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"kledger {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    mods = [ln.split("=")[1] for ln in p.stderr.splitlines() if ln.startswith("KLEDGER_BENCH_MODULES=")]
    return dt, json.loads(p.stdout), mods[-1] if mods else "?"


def floor(root: Path, rev: str) -> tuple[float, float | None]:
    """Seconds of the bare arithmetic of the accumulated solve at `rev`, in this process: the
    direct solve (the floor the speed issue set), and the Woodbury solve on the kept inverse of
    λC0 that `apply` now uses for small revisions (kledger.edit.prior; None when `rev` is not
    small)."""
    sys.path.insert(0, str(REPO))
    import torch

    from kledger.edit.editor import Editor, flatten
    from kledger.ledger import Ledger

    torch.set_num_threads(1)
    lg = Ledger.open(root / ".kledger")
    try:
        ed = lg.editor()
        hp, c0 = ed.hparams, ed.c0()
        groups = Editor.by_layer(flatten(lg.history.constraints_at(lg.history.resolve(rev))), hp.layers)
        small = woodbury_floor(ed, groups)
        total = 0.0
        for la in hp.layers:
            K, V = (t.to(torch.float64) for t in groups[la])
            W0, C0 = ed.W0[la].to(torch.float64), c0[la].to(torch.float64)
            t0 = time.perf_counter()
            A = hp.lam * C0 + K.T @ K
            B = K.T @ (V - K @ W0.T)
            L, _ = torch.linalg.cholesky_ex(A)
            torch.cholesky_solve(B, L)
            total += time.perf_counter() - t0
        return total, small
    finally:
        lg.close()


def woodbury_floor(ed, groups: dict) -> float | None:
    """Seconds of `prior.woodbury` over the edited layers, M at hand (None: not a small revision)."""
    from kledger.edit import prior

    hp = ed.hparams
    if not all(prior.small(K.shape[0], K.shape[1]) for K, _ in groups.values()):
        return None
    M = {la: prior.invert(ed.c0()[la].double().numpy(), hp.lam) for la in groups}
    t0 = time.perf_counter()
    for la, (K, V) in groups.items():
        prior.woodbury(ed.W0[la].numpy(), K.numpy(), V.numpy(), M[la])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--code", type=Path, default=REPO)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    root, code = a.dir.resolve(), a.code.resolve()
    if not (root / ".kledger" / "ledger.duckdb").exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "apply_cache_bench.py"), "--dir", str(root), "--runs", "1"],
                       check=True)
    out_dir = root / "edited-model"
    report: dict = {"code": str(code), "runs": a.runs, "cases": {}}
    for rev in ("main", "synthetic"):
        fl, small = floor(root, rev)
        report["cases"][f"{rev} floor"] = {"seconds": round(fl, 3),
                                           "woodbury_seconds": None if small is None else round(small, 4)}
        if small is not None:
            print(f"{rev}: the direct solve's arithmetic {fl:.3f} s; the Woodbury solve's {small * 1000:.1f} ms", flush=True)
        for extra in ([], ["--out", str(out_dir)]):
            args = ["apply", rev, *extra, "--json"]
            runs = [run_cold(code, root, args) for _ in range(a.runs)]
            times = [r[0] for r in runs]
            assert not any(r[1]["cached"] for r in runs), "a cold run answered from the cache"
            med = statistics.median(times)
            name = "kledger " + " ".join(a if a != str(out_dir) else "DIR" for a in args)
            report["cases"][name] = {"times_s": [round(t, 3) for t in times], "median_s": round(med, 3),
                                     "facts": runs[0][1]["facts"], "over_floor": round(med / fl, 2),
                                     "imports_torch_transformers": runs[-1][2]}
            print(f"{name:>50}: {med:6.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}), "
                  f"{runs[0][1]['facts']} facts, {med / fl:5.2f}x the floor ({fl:.2f} s), "
                  f"torch,transformers imported: {runs[-1][2]}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    (REPO / "bench" / "out").mkdir(exist_ok=True)
    (REPO / "bench" / "out" / "cold_apply_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
