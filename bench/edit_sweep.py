"""A short hyper-parameter sweep on CounterFact records: edited layers, λ and the value learning
rate. One batched commit of all records per setting (the value optimisation is shared by the
settings that differ only in λ). Prints one JSON line per setting.

    python bench/edit_sweep.py [--records 20] [--c0-tokens 50000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edit_eval import DATA, counterfact, metrics, requests  # noqa: E402

from kledger.edit.engine import optimise_values, prepare, spread  # noqa: E402
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
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--c0-tokens", type=int, default=50000)
    ap.add_argument("--layers", default="3-7,4-8")
    ap.add_argument("--lams", default="1500,3000,5000,15000")
    ap.add_argument("--lrs", default="0.5,1.0")
    ap.add_argument("--bos", default="auto", help="auto | always | never (C0, keys and values)")
    ap.add_argument("--model-cache", default=None)
    a = ap.parse_args()
    lm = load_model(env=Settings.from_env(), cache_dir=a.model_cache)
    base = defaults_for(lm.model_type, lm.n_layers).with_(bos=a.bos)
    layer_sets = [tuple(range(int(x.split("-")[0]), int(x.split("-")[1]) + 1)) for x in a.layers.split(",")]
    all_layers = sorted({la for s in layer_sets for la in s})
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in all_layers}
    c0, _ = compute_c0(lm, all_layers, (DATA / "wikitext-2-test.raw").read_text(), n_tokens=a.c0_tokens,
                       bos=a.bos)
    recs = counterfact(a.records)
    print(json.dumps({"before": metrics(lm, recs, a.bos), "records": len(recs), "c0_tokens": a.c0_tokens,
                      "bos": a.bos}), flush=True)
    for layers in layer_sets:
        for lr in (float(x) for x in a.lrs.split(",")):
            hp = base.with_(layers=layers, lr=lr)
            restore(lm, W0)
            toks = prepare(lm, requests(recs), hp)
            t = time.time()
            z, info = optimise_values(lm, toks, hp)
            t_values = time.time() - t
            for lam in (float(x) for x in a.lams.split(",")):
                restore(lm, W0)
                t = time.time()
                spread(lm, toks, z, hp.with_(lam=lam), c0, W0, {})
                row = {"layers": f"{layers[0]}-{layers[-1]}", "lr": lr, "lam": lam,
                       "value_prob": round(sum(info["target_prob"]) / len(recs), 3),
                       "mean_steps": round(sum(info["steps"]) / len(recs), 1),
                       "values_s": round(t_values, 1), "spread_s": round(time.time() - t, 1)}
                print(json.dumps(row | metrics(lm, recs, a.bos)), flush=True)
    restore(lm, W0)


if __name__ == "__main__":
    main()
