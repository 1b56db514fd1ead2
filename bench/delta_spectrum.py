"""How big the accumulated change of each edited layer grows with the history, and how its energy
is spread over directions: for a sweep run's saved weights (bench/sweep.py, `w{N}.pt` after N
edits), per edited layer, ‖ΔW‖_F / ‖W0‖_F, the largest singular values of ΔW = W − W0 beside W0's
two largest, the share of ‖ΔW‖_F² in its 10 largest directions (a flat spectrum: many directions
of similar size, as a sum of unrelated edits gives; a peaked one: a few shared directions), and
the growth exponent of ‖ΔW‖_F between checkpoints (0.5: growing like the square root of the
edits, as a sum of uncorrelated changes does; 1: linearly).

    OMP_NUM_THREADS=1 python bench/delta_spectrum.py --run train-v2-1000 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def spectrum(W0, W, top: int = 3) -> dict:
    import torch

    D = W.double() - W0
    s = torch.linalg.svdvals(D)
    energy = s.pow(2)
    return {"rel_fro": round(float(D.norm() / W0.norm()), 4),
            "top_singular": [round(x, 2) for x in s[:top].tolist()],
            "top10_energy_share": round(float(energy[:10].sum() / energy.sum()), 4),
            "fro": float(D.norm())}


def main() -> None:
    import torch
    from sweep import OUT, load

    from kledger.edit.spec import get_weight

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run folder name under bench/out/sweep")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    src = OUT / a.run
    res = json.loads((src / "result.json").read_text())
    lm, _ = load(res.get("defaults_version", 1))
    layers = res["hparams"]["layers"]
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in layers}
    points = sorted(int(p.stem[1:]) for p in src.glob("w*.pt") if p.stem[1:].isdigit())
    if not points:
        raise SystemExit(f"no saved weights (w<N>.pt) in {src}")
    out: dict = {"run": a.run, "setting": res.get("setting"), "layers": layers,
                 "W0_top_singular": {la: [round(x, 2) for x in torch.linalg.svdvals(W0[la])[:2].tolist()]
                                     for la in layers},
                 "checkpoints": {}}
    prev = None
    for n in points:
        W = torch.load(src / f"w{n}.pt", weights_only=False)
        row = {la: spectrum(W0[la], W[la]) for la in layers}
        if prev is not None:
            m, old = prev
            for la in layers:
                row[la]["growth_exponent"] = round(math.log(row[la]["fro"] / old[la]["fro"]) / math.log(n / m), 3)
        prev = (n, row)
        out["checkpoints"][n] = row
        print(f"after {n} edits: " + "; ".join(
            f"layer {la} ‖ΔW‖/‖W0‖ {row[la]['rel_fro']}, top σ {row[la]['top_singular']}, top-10 share "
            f"{row[la]['top10_energy_share']}" + (f", growth {row[la]['growth_exponent']}"
                                                  if "growth_exponent" in row[la] else "")
            for la in layers), file=sys.stderr, flush=True)
    for row in out["checkpoints"].values():
        for v in row.values():
            v.pop("fro")
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
