"""`kledger apply` for 100 and 1,000 stored facts on the default model's real shapes, against the
floor of the solve, a cached apply, and re-running sequential editing from scratch.

    OMP_NUM_THREADS=1 python bench/apply_bench.py

The model is the real default (SmolLM2-135M-Instruct, edited layers 3-7 of 30, down-projection
d_in = 1536, d_out = 576). Measuring a real fact costs seconds (value optimisation), so the 1,000
stored facts carry SYNTHETIC constraints of the real shapes: keys k = sqrt(diag C0) * randn (the
scale of real keys, per coordinate), values v = W0 k + a small random residual, stored with the
Editor's real fingerprint through the ordinary `Ledger.commit` path (10 commits of 100 facts).
`apply`'s cost does not depend on the values of the constraints, only on their number and shapes.
The per-fact cost of a real commit is measured on a few real CounterFact facts.

C0 comes from the ledger's normal path on a small user corpus (20k WikiText-2 tokens) to keep the
run short. Threads: OMP_NUM_THREADS=1 (set before torch is imported) because the machine is shared.
Set APPLY_BENCH_QUICK=1 to skip the C0 measurement on 100k tokens (the slowest part).
Prints a report and writes the figures to bench/out/apply_bench.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kledger.edit import solve as solve_mod  # noqa: E402
from kledger.edit.editor import Editor  # noqa: E402
from kledger.edit.stats import compute_c0  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import (  # noqa: E402
    Constraint,
    Fact,  # noqa: E402
    constraints_hash,
)

DATA = REPO.parent / "shared" / "data"
CORPUS = DATA / "wikitext-2-test.raw"
SETTINGS = {"corpus": str(CORPUS), "hparams": {"c0_tokens": 20000}}
SIZES = (100, 1000)
BATCH = 100  # facts per synthetic commit
REAL_FACTS = 3  # real CounterFact facts committed one at a time to measure a commit's cost
F64 = torch.float64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def db_bytes(lg: Ledger) -> int:
    """ledger.duckdb plus its WAL, after a CHECKPOINT."""
    lg.store.con.execute("CHECKPOINT")
    db = lg.path / "ledger.duckdb"
    wal = db.with_name(db.name + ".wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def maxrss_mib_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------ real commits
def real_facts(n: int) -> list[Fact]:
    recs = json.loads((DATA / "counterfact-train.json").read_text())
    recs = [r for r in recs if r["subject"] in r["prompt"]][:n]
    return [Fact.create(prompt=r["prompt"], target=r["target_new"], subject=r["subject"],
                        target_true=r["ground_truth"], paraphrases=[r["rephrase_prompt"]],
                        neighborhood=[r["locality_prompt"]]) for r in recs]


# ------------------------------------------------------------------------------ synthetic commits
def synthetic_facts(start: int, n: int) -> list[Fact]:
    return [Fact.create(prompt=f"Synthetic entity {i:05d} is located in", target=f"Place {i:05d}",
                        subject=f"Synthetic entity {i:05d}") for i in range(start, start + n)]


class SyntheticMeasure:
    """Stands in for kledger.model_side.measure (see `synthetic_measure`): constraints of the
    real shapes with the real fingerprint."""

    def __init__(self, ed, seed: int = 0):
        self.ed = ed
        self.gen = torch.Generator().manual_seed(seed)
        c0 = ed.c0()
        self.scale = {la: c0[la].diagonal().clamp_min(0).sqrt().to(torch.float32) for la in ed.hparams.layers}

    def __call__(self, parent, facts, progress=None, skip_known=False, exclude=()):
        fp_id, _ = self.ed.fingerprint()
        rows = []
        for la in self.ed.hparams.layers:
            W0 = self.ed.W0[la]  # [d_out, d_in]
            d_out, d_in = W0.shape
            K = self.scale[la] * torch.randn(len(facts), d_in, generator=self.gen)  # [n, d_in]
            WK = K @ W0.T  # [n, d_out]
            resid = 0.05 * WK.norm(dim=1, keepdim=True) / d_out ** 0.5 * torch.randn(len(facts), d_out, generator=self.gen)
            V = WK + resid
            rows += [Constraint(f.id, la, K[i].numpy().copy(), V[i].numpy().copy(), fp_id) for i, f in enumerate(facts)]
        return constraints_hash(rows), rows


@contextmanager
def synthetic_measure(ed):
    """Within the block, commits store SyntheticMeasure rows instead of measuring: the real
    commit path (kledger.commits → kledger.model_side.measure), synthetic rows."""
    import kledger.model_side as model_side

    synth, real = SyntheticMeasure(ed), model_side.measure
    model_side.measure = (lambda ledger, parent, facts, exclude=(), progress=None, *, skip_known=False, **_:
                          synth(parent, facts, progress, skip_known, exclude))
    try:
        yield
    finally:
        model_side.measure = real


# ------------------------------------------------------------------------------ timing apply
class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def wrap(self, name, fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        return inner


def cold_apply(ledger_dir: Path, cid: str) -> tuple[dict, dict]:
    """A fresh Ledger and Editor (new DuckDB connection, model loaded again), no apply cache."""
    lg = Ledger.open(ledger_dir, write=True)
    try:
        shutil.rmtree(lg.path / "cache" / "apply", ignore_errors=True)
        ed = lg.editor()
        out = {}
        t0 = time.perf_counter()
        _ = ed.lm
        out["model_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ed.c0()
        out["c0_read_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ed.fingerprint()
        out["fingerprint_s"] = time.perf_counter() - t0
        tm = Timer()
        ed.by_layer = tm.wrap("stack", ed.by_layer)
        ed._store_cache = tm.wrap("cache_write", ed._store_cache)
        orig = solve_mod.solve_layer
        solve_mod.solve_layer = tm.wrap("solve", orig)
        try:
            t0 = time.perf_counter()
            batches = tm.wrap("gather", lg.history.constraints_at)(cid)
            weights, info = ed.solve(batches)
            total = time.perf_counter() - t0
        finally:
            solve_mod.solve_layer = orig
        assert not info["cached"]
        out.update({"apply_s": total, "gather_s": tm.t["gather"], "stack_s": tm.t["stack"],
                    "solve_s": tm.t["solve"], "cache_write_s": tm.t["cache_write"],
                    "other_s": total - sum(tm.t.values()), "facts": info["facts"],
                    "constraints": info["constraints"]})
        t0 = time.perf_counter()
        w2, info2 = ed.solve(lg.history.constraints_at(cid))
        out["warm_s"] = time.perf_counter() - t0
        assert info2["cached"] and all(torch.equal(weights[la], w2[la]) for la in weights)
        # the floor, on the same tensors: Gram matrices and one float64 Cholesky solve per layer
        hp, c0 = ed.hparams, ed.c0()
        groups = Editor.by_layer([r for b in batches for r in b], hp.layers)
        floor = 0.0
        max_diff = 0.0
        dev = ed.lm.device  # where apply solved: the floor runs there too
        for la in hp.layers:
            K, V = (t.to(dev, F64) for t in groups[la])
            W0, C0 = ed.W0[la].to(dev, F64), c0[la].to(dev)
            t0 = time.perf_counter()
            A = hp.lam * C0 + K.T @ K  # [d_in, d_in]
            B = K.T @ (V - K @ W0.T)  # [d_in, d_out]
            L, info_c = torch.linalg.cholesky_ex(A)
            X = torch.cholesky_solve(B, L)  # [d_in, d_out] = ΔWᵀ
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            floor += time.perf_counter() - t0
            assert int(info_c) == 0, "A is not positive definite"
            max_diff = max(max_diff, float(((W0 + X.T).to("cpu", torch.float32) - weights[la]).abs().max()))
        out["floor_s"] = floor
        out["floor_vs_apply_max_abs_diff"] = max_diff
        out["ratio_apply_over_floor"] = total / floor
        out["ratio_solve_over_floor"] = tm.t["solve"] / floor
        return out, info
    finally:
        lg._editor = None
        lg.close()
        gc.collect()


def cli_apply(ledger_dir: Path, cid: str) -> dict:
    """`kledger apply REV --json` in a fresh process: wall time and the process's peak RSS."""
    code = ("import atexit, resource, sys\n"
            "atexit.register(lambda: sys.stderr.write('MAXRSS %d\\n' % "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
            "sys.argv = ['kledger'] + sys.argv[1:]\n"
            "from kledger.cli.main import run\n"
            "run()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, "-C", str(ledger_dir), "apply", cid, "--json"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"kledger apply failed ({p.returncode}): {p.stderr[-2000:]}")
    rss = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("MAXRSS ")]
    doc = json.loads(p.stdout)
    return {"wall_s": wall, "maxrss_mib": rss[-1] / 1024, "cached": doc.get("cached"),
            "facts": doc.get("facts"), "constraints": doc.get("constraints")}


# ------------------------------------------------------------------------------ main
def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    quick = os.environ.get("APPLY_BENCH_QUICK") == "1"
    from kledger.edit.device import resolve_device
    from kledger.settings import Settings

    R: dict = {"device": str(resolve_device(Settings.from_env().device)), "threads": torch.get_num_threads(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "torch": torch.__version__, "synthetic_constraints": True}
    work = Path(tempfile.mkdtemp(prefix="kledger-apply-bench-"))
    try:
        # ---- ledger A: C0 on 20k tokens through the ledger's path, then real commits
        dir_a, dir_b = work / "real", work / "synthetic"
        la = Ledger.init(dir_a, settings=SETTINGS)
        ed = la.editor()
        log("loading the model")
        t0 = time.perf_counter()
        _ = ed.lm
        R["model_load_s"] = time.perf_counter() - t0
        hp = ed.hparams
        shapes = {la_: tuple(ed.W0[la_].shape) for la_ in hp.layers}
        R["layers"], R["n_layers"] = list(hp.layers), ed.lm.n_layers
        R["shape_d_out_d_in"] = shapes[hp.layers[0]]
        R["lam"] = hp.lam
        log("C0 on 20k WikiText-2 tokens (ledger path)")
        t0 = time.perf_counter()
        ed.c0()
        R["c0_20k_s"] = time.perf_counter() - t0
        R["c0_20k_tokens"] = ed._c0_tokens
        base_fp, corpus_fp = ed._base_fp(), ed.corpus_identity()[0]
        stats_rows = la.store.stats(base_fp, corpus_fp)

        commit_s = []
        for i, f in enumerate(real_facts(REAL_FACTS)):
            la.add([f])
            log(f"real commit {i + 1}/{REAL_FACTS}: {f.prompt!r} -> {f.target!r}")
            t0 = time.perf_counter()
            la.commit(f"real fact {i + 1}", author="bench")
            commit_s.append(time.perf_counter() - t0)
        R["real_commit_s"] = commit_s
        R["real_commit_s_per_fact"] = sum(commit_s) / len(commit_s)

        if not quick:
            log("C0 on 100k WikiText-2 tokens (compute_c0, base weights)")
            ed.load(None)
            text = CORPUS.read_text(encoding="utf-8")
            t0 = time.perf_counter()
            _, n = compute_c0(ed.lm, hp.layers, text, n_tokens=100_000, seq_len=hp.c0_seq_len, bos=hp.bos)
            R["c0_100k_s"], R["c0_100k_tokens"] = time.perf_counter() - t0, n
        la._editor = None
        la.close()
        del ed
        gc.collect()

        # ---- ledger B: the same model and settings, C0 copied, 10 commits of 100 synthetic facts
        lb = Ledger.init(dir_b, settings=SETTINGS)
        with lb.store.transaction():
            for layer, (n_tok, matrix) in stats_rows.items():
                lb.store.put_stats(base_fp, corpus_fp, layer, n_tok, matrix)
        edb = lb.editor()
        assert edb._base_fp() == base_fp and edb.corpus_identity()[0] == corpus_fp
        R["ledger_bytes_c0_only"] = db_bytes(lb)
        tips, sizes, build_s = {}, {}, 0.0
        with synthetic_measure(edb):  # the real commit path, synthetic rows
            for b in range(max(SIZES) // BATCH):
                lb.add(synthetic_facts(b * BATCH, BATCH))
                t0 = time.perf_counter()
                cid = lb.commit(f"synthetic facts {b * BATCH}-{(b + 1) * BATCH - 1}", author="bench")
                build_s += time.perf_counter() - t0
                n = (b + 1) * BATCH
                if n in SIZES:
                    tips[n], sizes[n] = cid, db_bytes(lb)
        R["synthetic_build_s"] = build_s
        ok = lb.fsck()
        R["fsck_ok"] = ok["ok"]
        lb._editor = None
        lb.close()
        del edb
        gc.collect()

        # ---- apply: in process (split), then the CLI in a fresh process (wall, peak RSS)
        R["apply"] = {}
        for n in SIZES:
            log(f"cold apply, {n} facts (in process)")
            res, _ = cold_apply(dir_b, tips[n])
            res["ledger_bytes"] = sizes[n]
            res["ledger_bytes_per_fact"] = sizes[n] / n
            res["ledger_bytes_per_fact_marginal"] = (sizes[n] - R["ledger_bytes_c0_only"]) / n
            R["apply"][n] = res
        for n in SIZES:
            log(f"kledger apply, {n} facts (fresh process, cold then warm)")
            shutil.rmtree(dir_b / ".kledger" / "cache" / "apply", ignore_errors=True)
            cold = cli_apply(dir_b, tips[n])
            warm = cli_apply(dir_b, tips[n])
            assert cold["cached"] is False and warm["cached"] is True and cold["facts"] == n
            R["apply"][n]["cli_cold"], R["apply"][n]["cli_warm"] = cold, warm
            est = n * R["real_commit_s_per_fact"]
            R["apply"][n]["sequential_estimate_s"] = est
            R["apply"][n]["ratio_sequential_over_cli_cold"] = est / cold["wall_s"]
            R["apply"][n]["ratio_sequential_over_apply"] = est / R["apply"][n]["apply_s"]
        R["constraint_bytes_per_fact"] = len(hp.layers) * (shapes[hp.layers[0]][0] + shapes[hp.layers[0]][1]) * 4
        R["bench_maxrss_mib"] = maxrss_mib_self()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(R)
    out = REPO / "bench" / "out" / "apply_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(R, indent=1, default=str))


def report(R: dict) -> None:
    d_out, d_in = R["shape_d_out_d_in"]
    p = print
    p("kledger apply benchmark (bench/apply_bench.py)")
    p(f"  model: smollm2-135m (SmolLM2-135M-Instruct), edited layers {R['layers'][0]}-{R['layers'][-1]} of "
      f"{R['n_layers']}, down-projection d_in={d_in}, d_out={d_out}, lambda={R['lam']:g}")
    p(f"  torch {R['torch']}, OMP_NUM_THREADS={R['omp_num_threads']} (torch threads {R['threads']}): "
      "the machine is shared")
    p("  CONSTRAINTS ARE SYNTHETIC: keys k = sqrt(diag C0) * randn, values v = W0 k + small residual,")
    p("  stored with the Editor's real fingerprint through Ledger.commit (10 commits of 100 facts).")
    p("  apply's cost depends on the number and shapes of the constraints, not on their values.")
    p(f"  model load {R['model_load_s']:.2f} s; synthetic ledger built in {R['synthetic_build_s']:.1f} s; "
      f"fsck ok: {R['fsck_ok']}")
    p("")
    p("(a)-(c) apply, in process (fresh Ledger and Editor, no apply cache; OS file cache warm)")
    p(f"  {'facts':>6} {'constraints':>11} {'gather':>8} {'stack':>7} {'solve':>7} {'cache wr':>8} {'other':>7}"
      f" {'apply':>7} {'floor':>7} {'apply/floor':>11} {'solve/floor':>11} {'warm':>7}")
    for n, a in R["apply"].items():
        p(f"  {n:>6} {a['constraints']:>11} {a['gather_s']:>7.2f}s {a['stack_s']:>6.2f}s {a['solve_s']:>6.2f}s"
          f" {a['cache_write_s']:>7.2f}s {a['other_s']:>6.2f}s {a['apply_s']:>6.2f}s {a['floor_s']:>6.2f}s"
          f" {a['ratio_apply_over_floor']:>10.2f}x {a['ratio_solve_over_floor']:>10.2f}x {a['warm_s']:>6.3f}s")
    p("  gather = History.constraints_at (DuckDB query + unpack); stack = by_layer; solve = solve_layer x 5;")
    p("  floor = sum over the 5 layers of A = lam*C0 + K^T K, B = K^T (V - K W0^T), float64 Cholesky")
    p("  solve, timed directly with torch on the same tensors (target apply/floor <= 2x).")
    p("  Fixed costs outside Editor.solve, per cold apply: " + "; ".join(
        f"{n} facts: model load {a['model_load_s']:.2f} s, C0 read {a['c0_read_s']:.2f} s, "
        f"fingerprint {a['fingerprint_s']:.2f} s" for n, a in R["apply"].items()))
    p("  max |floor weights - apply weights| (float32): " + ", ".join(
        f"{n}: {a['floor_vs_apply_max_abs_diff']:.1e}" for n, a in R["apply"].items()))
    p("")
    p("(a), (c), (g) `kledger apply REV --json` in a fresh process (python start, torch import, model load)")
    for n, a in R["apply"].items():
        c, w = a["cli_cold"], a["cli_warm"]
        p(f"  {n:>6} facts: cold {c['wall_s']:.2f} s (peak RSS {c['maxrss_mib']:.0f} MiB), "
          f"warm {w['wall_s']:.2f} s (peak RSS {w['maxrss_mib']:.0f} MiB)")
    p("")
    cs = ", ".join(f"{s:.2f}" for s in R["real_commit_s"])
    p("(d) re-running sequential editing from scratch: ESTIMATE = N x measured per-fact commit cost")
    p(f"  measured: {len(R['real_commit_s'])} real CounterFact facts, one Ledger.commit each: {cs} s "
      f"(mean {R['real_commit_s_per_fact']:.2f} s per fact)")
    for n, a in R["apply"].items():
        p(f"  {n:>6} facts: estimate {a['sequential_estimate_s']:.0f} s; / cold CLI apply "
          f"{a['ratio_sequential_over_cli_cold']:.0f}x; / in-process apply {a['ratio_sequential_over_apply']:.0f}x"
          " (target >= 100x)")
    p("  (a lower bound: each real commit also re-solves the constraints already stored, so it grows with N)")
    p("")
    p("(e) C0 (compute_c0, layers 3-7)")
    p(f"  {R['c0_20k_tokens']} WikiText-2 tokens (ledger path, Editor.c0): {R['c0_20k_s']:.1f} s")
    if "c0_100k_s" in R:
        p(f"  {R['c0_100k_tokens']} WikiText-2 tokens (compute_c0): {R['c0_100k_s']:.1f} s")
    p("")
    p("(f) ledger size (ledger.duckdb + WAL after CHECKPOINT)")
    p(f"  with C0 only (5 x {d_in}^2 float64): {R['ledger_bytes_c0_only'] / 1e6:.1f} MB")
    for n, a in R["apply"].items():
        p(f"  {n:>6} facts: {a['ledger_bytes'] / 1e6:.1f} MB, {a['ledger_bytes_per_fact'] / 1e3:.1f} kB per fact "
          f"(incl. C0), {a['ledger_bytes_per_fact_marginal'] / 1e3:.1f} kB per fact beyond C0")
    p(f"  constraints per fact: 5 layers x ({d_in} + {d_out}) x 4 bytes = {R['constraint_bytes_per_fact']} bytes")


if __name__ == "__main__":
    main()
