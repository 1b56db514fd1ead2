"""Where specificity is lost after many sequential edits: the neighbourhood scores of a sweep run's
checkpoint (bench/sweep.py) against the base model's on the same records, split by how many of the
edited records share the record's new object, and by the record's position (edit age).

A record's neighbourhood prompt names another subject that shares the record's true object, and
counts as kept when the true object still beats the new one there. If edits toward one object piled
up into a bias for that object, the records whose new object is edited in often would lose most.

    OMP_NUM_THREADS=2 python bench/specificity_split.py --run train-v2-1000 [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

import kledger  # noqa: F401  (before sweep, which puts the repository first on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import OUT, load, records  # noqa: E402

from kledger.edit.evaluate import Scorer, evaluate_model  # noqa: E402
from kledger.edit.hooks import boundary_token  # noqa: E402
from kledger.edit.spec import set_weight  # noqa: E402

BANDS = ((1, 1), (2, 4), (5, 9), (10, 10**9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a folder of bench/out/sweep with a w{N}.pt checkpoint")
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    res = json.loads((OUT / a.run / "result.json").read_text())
    lm, hp = load()
    facts = records(a.n, res["start"])
    scorer = Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, hp.bos), spec=lm.spec)
    base = evaluate_model(scorer, facts, gen_tokens=0)["per_record"]
    for la, W in torch.load(OUT / a.run / f"w{a.n}.pt").items():
        set_weight(lm.model, lm.spec, la, W)
    edited = evaluate_model(scorer, facts, gen_tokens=0)["per_record"]
    shared = Counter(f.target for f in facts)

    def row(label: str, idx: list[int]) -> dict:
        b = sum(base[i]["specificity"] for i in idx) / len(idx)
        e = sum(edited[i]["specificity"] for i in idx) / len(idx)
        return {"group": label, "records": len(idx), "base": round(100 * b, 1), "edited": round(100 * e, 1),
                "change": round(100 * (e - b), 1)}

    rows = [row(f"new object shared by {lo}" + (f"-{hi}" if hi != lo and hi < 10**9 else "+" if hi >= 10**9 else "")
                + " edited records", [i for i, f in enumerate(facts) if lo <= shared[f.target] <= hi]) for lo, hi in BANDS]
    q = a.n // 4
    rows += [row(f"edits {i * q + 1}-{(i + 1) * q}", list(range(i * q, (i + 1) * q))) for i in range(4)]
    rows.append(row("all", list(range(a.n))))
    print(json.dumps({"run": a.run, "n": a.n, "start": res["start"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
