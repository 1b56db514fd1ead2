"""Where specificity is lost after many sequential edits: the neighbourhood scores of a sweep run's
checkpoint (bench/sweep.py) against the base model's on the same records, split by how many of the
edited records share the record's new object, and by the record's position (edit age).

A record's neighbourhood prompt names another subject that shares the record's true object, and
counts as kept when the true object still beats the new one there. If edits toward one object piled
up into a bias for that object, the records whose new object is edited in often would lose most.

    OMP_NUM_THREADS=2 python bench/specificity_split.py --run train-v2-1000 [--n 1000]

With `--movement`, how the neighbourhood prompts' scores move instead: for the first --records
records, at each checkpoint of --checkpoints (a checkpoint of N edits covers the records below N),
the mean change from the base model of the log-probability of the true object, of the record's new
object, and of a control object (the new object of a record from positions 5000-5499 that no
edited record targets, drawn with a fixed seed), and the specificity; then the records edited by
the first checkpoint, split by how many later edited records (up to the last checkpoint) share
their true object. Whether a record's neighbourhood is lost to its own edit or to the edits after it.

    OMP_NUM_THREADS=2 python bench/specificity_split.py --run train-v2-1000 --movement --records 300 --checkpoints 100,300,1000
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
    ap.add_argument("--movement", action="store_true", help="how the scores move by checkpoint (see above)")
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--checkpoints", default="100,300,1000")
    a = ap.parse_args()
    if a.movement:
        return movement(a.run, a.records, [int(c) for c in a.checkpoints.split(",")])
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


def movement(run: str, n_rec: int, ckpts: list[int]) -> None:
    import random
    import statistics as st

    from kledger.edit.evaluate import neighborhood_object

    res = json.loads((OUT / run / "result.json").read_text())
    lm, hp = load()
    edited = records(max(ckpts), res["start"])
    facts = edited[:n_rec]
    targeted = {f.target for f in edited}
    pool = [f.target for f in records(500, 5000) if f.target not in targeted]
    rng = random.Random(0)
    meta = []  # (record, prompt, true, new, control)
    for i, f in enumerate(facts):
        keep = neighborhood_object(f)
        ctrl = rng.choice([o for o in pool if o not in (keep, f.target)])
        meta += [(i, p, keep, f.target, ctrl) for p in f.neighborhood]
    scorer = Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, hp.bos), spec=lm.spec)
    pairs = list(dict.fromkeys(x for _, p, k, t, c in meta for x in ((p, k), (p, t), (p, c))))

    def scores() -> list[tuple[float, float, float]]:
        got = scorer.score(pairs)
        return [(got[(p, k)].mean_logprob, got[(p, t)].mean_logprob, got[(p, c)].mean_logprob) for _, p, k, t, c in meta]

    base, at = scores(), {}
    for ck in ckpts:
        for la, W in torch.load(OUT / run / f"w{ck}.pt").items():
            set_weight(lm.model, lm.spec, la, W)
        at[ck] = scores()

    def summary(label: str, ck: int, js: list[int]) -> dict:
        R = at[ck]
        return {"group": label, "after_edits": ck, "prompts": len(js),
                "specificity_base": round(100 * st.mean(base[j][0] > base[j][1] for j in js), 1),
                "specificity": round(100 * st.mean(R[j][0] > R[j][1] for j in js), 1),
                **{f"change_logp_{name}": round(st.mean(R[j][x] - base[j][x] for j in js), 3)
                   for x, name in enumerate(("true", "new", "control"))}}

    rows = []
    for ck in ckpts:
        for hi in sorted({c for c in ckpts if c <= ck} | {n_rec}):
            if hi <= min(ck, n_rec):
                rows.append(summary(f"records 1-{hi}", ck, [j for j, m in enumerate(meta) if m[0] < hi]))
    first, last = ckpts[0], max(ckpts)
    later = Counter(neighborhood_object(f) for f in edited[first:last])
    for lo, hi, label in ((0, 0, "0"), (1, 4, "1-4"), (5, 19, "5-19"), (20, 10**9, "20+")):
        js = [j for j, m in enumerate(meta) if m[0] < first and lo <= later[m[2]] <= hi]
        for ck in (first, last):
            if js:
                rows.append(summary(f"records 1-{first} whose true object {label} later edited records share", ck, js))
    print(json.dumps({"run": run, "start": res["start"], "records": n_rec, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
