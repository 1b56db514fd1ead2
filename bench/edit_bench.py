"""Commit cost per fact: one batched commit of N facts against N one-fact commits made one after
another (each against the weights left by the previous). Prints both and their ratio, and the
CounterFact scores of each way (they solve the same constraints' kind, not the same pairs).

    python bench/edit_bench.py [--facts 8] [--c0-tokens 20000] [--device auto|cpu|cuda]

On a GPU (`--device cuda`, or auto where there is one) the same comparison measures what batching
buys where one fact's step is latency-bound; on a CPU every token costs the same, batched or not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edit_eval import DATA, counterfact, metrics, requests  # noqa: E402

from kledger.edit.engine import compute_constraints  # noqa: E402
from kledger.edit.hparams import defaults_for  # noqa: E402
from kledger.edit.spec import get_weight, set_weight  # noqa: E402
from kledger.edit.stats import compute_c0  # noqa: E402
from kledger.edit.weights import load_model  # noqa: E402
from kledger.settings import Settings  # noqa: E402


def restore(lm, weights) -> None:
    """Write canonical weights {layer: W [d_out, d_in]} back into the model."""
    for la, W in weights.items():
        set_weight(lm.model, lm.spec, la, W)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=8)
    ap.add_argument("--c0-tokens", type=int, default=20000)
    ap.add_argument("--model-cache", default=None)
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    a = ap.parse_args()
    lm = load_model(env=Settings.from_env(), cache_dir=a.model_cache, device=a.device)
    hp = defaults_for(lm.model_type, lm.n_layers)
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    c0, _ = compute_c0(lm, hp.layers, (DATA / "wikitext-2-test.raw").read_text(), n_tokens=a.c0_tokens)
    recs = counterfact(a.facts)
    reqs = requests(recs)

    t = time.time()
    diag: dict = {}
    compute_constraints(lm, reqs, hp, c0, W0, {}, diagnostics=diag)
    t_batch = time.time() - t
    m_batch = metrics(lm, recs)

    restore(lm, W0)
    stored: list[dict] = []
    steps = []
    t = time.time()
    for r in reqs:
        d: dict = {}
        prior = {la: [c[la] for c in stored] for la in hp.layers}
        stored.append(compute_constraints(lm, [r], hp, c0, W0, prior, diagnostics=d))
        steps += d["steps"]
    t_single = time.time() - t
    m_single = metrics(lm, recs)
    restore(lm, W0)
    out = {"device": str(lm.device), "threads": torch.get_num_threads(), "facts": len(reqs),
           "batched_s_per_fact": round(t_batch / len(reqs), 2),
           "one_at_a_time_s_per_fact": round(t_single / len(reqs), 2),
           "ratio_one_at_a_time_over_batched": round(t_single / t_batch, 2),
           "steps_batched": diag["steps"], "steps_single": steps,
           "scores_batched": m_batch, "scores_one_at_a_time": m_single}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
