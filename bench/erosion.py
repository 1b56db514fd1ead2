"""Where early edits erode: how well the accumulated solve still fits each commit's constraints, by
the age of the commit, after a long sequential run of bench/sweep.py.

    OMP_NUM_THREADS=1 python bench/erosion.py [--run bench/out/sweep/holdout-v2] [--at 1000] [--lams 1500,500,150]

It reads the constraints a sweep run stored (state.pt: per commit and edited layer, the keys K and
the target outputs V its facts were measured with), solves the accumulated least squares of the
first --at edits at each λ, and prints, per group of 100 facts in the order they were committed,
the share of each fact's intended change that the solved weight misses at the edited layers:
‖W k − v‖ / ‖W0 k − v‖, averaged over facts and layers (0: the constraint holds exactly; 1: nothing
of the edit is left). The targets were measured against the weights of the run's own λ, so another
λ here answers "what would the solve give these same targets", not a re-run of the edits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def missing_share(W, W0, K, V):
    """Per fact: ‖W k − v‖ / ‖W0 k − v‖ (rows of K, V)."""
    import torch

    K, V = K.double(), V.double()
    return (torch.linalg.norm(K @ W.T - V, dim=1) / torch.linalg.norm(K @ W0.T - V, dim=1).clamp_min(1e-12))


def main() -> None:
    import torch
    from sweep import c0_for, load

    from kledger.edit.solve import solve_history
    from kledger.edit.spec import get_weight

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(HERE / "out" / "sweep" / "holdout-v2"))
    ap.add_argument("--at", type=int, default=1000, help="use the first AT edits of the run")
    ap.add_argument("--lams", default=None, help="λ values to solve with (default: the run's own)")
    ap.add_argument("--group", type=int, default=100, help="facts per age group")
    a = ap.parse_args()
    saved = torch.load(Path(a.run) / "state.pt", weights_only=False)
    res = saved["result"]
    batches = saved["stored"][:a.at // res["batch"]]
    lm, hp = load(res["defaults_version"])
    hp = hp.with_(**{k: v for k, v in res["hparams"].items() if k in ("lam", "layers")})
    c0 = c0_for(lm, hp)
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    lams = [float(x) for x in a.lams.split(",")] if a.lams else [hp.lam]
    n = sum(len(b[hp.layers[0]][0]) for b in batches)
    print(f"# {a.run}: first {n} edits in {len(batches)} commits, layers {list(hp.layers)}, run's λ {hp.lam:g}")
    print("# mean share of each fact's intended change missing at the edited layers, by commit order")
    groups = [(s, min(s + a.group, n)) for s in range(0, n, a.group)]
    print(f"{'λ':>8s} " + " ".join(f"{f'{s + 1}-{e}':>9s}" for s, e in groups) + f" {'all':>7s}")
    for lam in lams:
        per_fact = 0
        for la in hp.layers:
            W = solve_history(W0[la], [b[la] for b in batches], c0[la], lam, "accumulated")
            K = torch.cat([b[la][0] for b in batches])
            V = torch.cat([b[la][1] for b in batches])
            per_fact = per_fact + missing_share(W, W0[la], K, V) / len(hp.layers)
        cells = " ".join(f"{per_fact[s:e].mean().item():9.3f}" for s, e in groups)
        print(f"{lam:8g} {cells} {per_fact.mean().item():7.3f}", flush=True)


if __name__ == "__main__":
    main()
