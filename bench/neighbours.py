"""Which neighbourhood prompts a long sequential run flips, and why: per record of a bench/sweep.py
run, specificity (the share of its neighbourhood prompts on which the true object beats the new one)
on the base model and at a checkpoint, grouped by how many records of the run so far share the
record's relation and new object ("popularity": edits that pushed the same object for the same
relation), and by the base model's margin.

If the loss concentrates on records whose new object many other edits also pushed, what erodes
specificity is the edits together (a relation drifting towards its popular objects); if it is even
across popularity, it is each edit's own reach to nearby subjects.

    OMP_NUM_THREADS=1 python bench/neighbours.py --run bench/out/sweep/holdout-v2-nohistory --at 300 [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def per_record(lm, facts, weights: dict | None) -> list[dict]:
    from kledger.edit.evaluate import Scorer, evaluate_model
    from kledger.edit.hooks import boundary_token
    from kledger.edit.spec import get_weight, set_weight

    saved = {la: get_weight(lm.model, lm.spec, la).clone() for la in (weights or {})}
    for la, W in (weights or {}).items():
        set_weight(lm.model, lm.spec, la, W)
    try:
        scorer = Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, "auto"), spec=lm.spec)
        return evaluate_model(scorer, facts, gen_tokens=0)["per_record"]
    finally:
        for la, W in saved.items():
            set_weight(lm.model, lm.spec, la, W)


def table(rows: list[tuple[str, list[tuple[float, float]]]]) -> list[str]:
    out = ["| group | records | base specificity | edited | change |", "| --- | --- | --- | --- | --- |"]
    for name, pairs in rows:
        if not pairs:
            continue
        b = 100 * sum(p[0] for p in pairs) / len(pairs)
        e = 100 * sum(p[1] for p in pairs) / len(pairs)
        out.append(f"| {name} | {len(pairs)} | {b:.1f} | {e:.1f} | {e - b:+.1f} |")
    return out


def main() -> None:
    import torch
    from sweep import load, records

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--at", type=int, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    run = Path(a.run)
    res = json.loads((run / "result.json").read_text()) if (run / "result.json").exists() else \
        torch.load(run / "state.pt", weights_only=False)["result"]
    facts = records(a.at, res["start"])
    lm, _ = load(res["defaults_version"])
    base = per_record(lm, facts, None)
    edited = per_record(lm, facts, torch.load(run / f"w{a.at}.pt"))
    pop = Counter((f.relation, f.target) for f in facts)
    pairs = [(b["specificity"], e["specificity"], pop[(f.relation, f.target)], b.get("p_true_neighborhood"))
             for f, b, e in zip(facts, base, edited) if b.get("specificity") is not None]
    by_pop = [(label, [(b, e) for b, e, p, _ in pairs if lo <= p <= hi])
              for label, lo, hi in (("new object pushed by this edit only", 1, 1),
                                    ("by 2-4 edits", 2, 4), ("by 5-9 edits", 5, 9), ("by 10 or more", 10, 10**9))]
    lines = [f"# {run.name} at {a.at} edits: per-record specificity by popularity of the new object",
             *table(by_pop)]
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"run": run.name, "at": a.at, "records": [
            {"case": f.extra.get("case_id"), "relation": f.relation, "target": f.target, "popularity": p,
             "base": b, "edited": e} for f, (b, e, p, _) in zip(facts, pairs)]}, indent=1))


if __name__ == "__main__":
    main()
