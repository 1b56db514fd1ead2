"""Value optimisation cost per fact as a commit pays it: CounterFact train records optimised in
batches (early stopping on, the default step budget), timed, with the steps taken and the target
probability reached, so a faster way can be checked to reach the same values.

    OMP_NUM_THREADS=1 python bench/value_speed.py [--batches 10,32] [--n 64] [--start 400]
        [--set value_dtype=bfloat16] [--code DIR] [--json OUT]

`--code DIR` times another checkout of kledger instead of this one (e.g. `git worktree add
/tmp/k-9403bb5 9403bb5`, the code the speed issue measured): the records, the model and the
hyper-parameters that shape the optimisation (steps, lr, contexts, stop rule) are the same.
Run the ways one after another on the same machine and compare the printed seconds per fact.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="10,32", help="batch sizes, comma-separated")
    ap.add_argument("--n", type=int, default=64, help="records (train, from --start)")
    ap.add_argument("--start", type=int, default=400)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="hyper-parameter override key=value")
    ap.add_argument("--code", default=None, help="another kledger checkout to time instead of this one")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(a.code).resolve() if a.code else ROOT))
    sys.path.insert(1, str(ROOT / "bench"))
    import torch

    import kledger
    from kledger.edit.engine import EditRequest, optimise_values, prepare
    from kledger.edit.hparams import defaults_for
    from kledger.edit.weights import load_model

    # records only (the training file, the held-out rule); after kledger, as it puts ROOT first on the path
    sweep = importlib.import_module("sweep")
    lm = load_model()
    hp = defaults_for(lm.model_type, lm.n_layers)
    for kv in a.sets:
        key, _, value = kv.partition("=")
        hp = hp.with_(**{key: type(getattr(hp, key))(value)})
    facts = sweep.records(a.n, a.start)
    reqs = [EditRequest(f.prompt, f.subject, f.target) for f in facts]
    out = {"code": str(Path(kledger.__file__).parents[1]), "threads": torch.get_num_threads(), "n": a.n,
           "start": a.start, "steps": hp.steps, "lr": hp.lr, "early_stop_prob": hp.early_stop_prob,
           "n_prefixes": hp.n_prefixes, "value_dtype": getattr(hp, "value_dtype", "float32"),
           "step_norm": getattr(hp, "step_norm", 0.0), "sets": a.sets, "runs": {}}
    optimise_values(lm, prepare(lm, reqs[:2], hp.with_(steps=1)), hp.with_(steps=1))  # warm-up
    for B in (int(x) for x in a.batches.split(",")):
        secs, steps, probs, ratios, n = 0.0, [], [], [], 0
        for i in range(0, a.n - B + 1, B):
            toks = prepare(lm, reqs[i:i + B], hp)
            t = time.perf_counter()
            _, diag = optimise_values(lm, toks, hp)
            secs += time.perf_counter() - t
            steps += diag["steps"]
            probs += diag["target_prob"]
            ratios += diag.get("delta_norm_ratio", [])  # older checkouts may not report it
            n += B
        out["runs"][str(B)] = {"facts": n, "seconds_per_fact": round(secs / n, 3),
                               "mean_steps": round(sum(steps) / n, 2), "mean_target_prob": round(sum(probs) / n, 4),
                               "share_stopped": round(sum(p >= hp.early_stop_prob for p in probs) / n, 3),
                               "mean_delta_ratio": round(sum(ratios) / n, 3) if ratios else None,  # ‖δ‖ / ‖h‖
                               "share_at_clamp": round(sum(r >= hp.clamp - 1e-3 for r in ratios) / n, 3) if ratios else None}
        print(f"batch {B}: {out['runs'][str(B)]}", file=sys.stderr, flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
