"""Is the default corpus (text sampled from the model, no download) a good stand-in for
WikiText-2 when measuring C0? Prints the relative Frobenius difference of C0 per layer and the
CounterFact scores of one batched commit with each C0.

    python bench/edit_corpus.py [--records 10] [--sampled-tokens 20000] [--wiki-tokens 100000]
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
from kledger.edit.solve import rel_fro  # noqa: E402
from kledger.edit.spec import get_weight, set_weight  # noqa: E402
from kledger.edit.stats import compute_c0, default_corpus  # noqa: E402
from kledger.edit.weights import corpus_cache_root, load_model  # noqa: E402
from kledger.settings import Settings  # noqa: E402


def restore(lm, weights) -> None:
    """Write canonical weights {layer: W [d_out, d_in]} back into the model."""
    for la, W in weights.items():
        set_weight(lm.model, lm.spec, la, W)


def say(stage: str, done: int, total: int) -> None:
    print(f"{time.strftime('%H:%M:%S')} {stage} {done}/{total}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10)
    ap.add_argument("--sampled-tokens", type=int, default=20000)
    ap.add_argument("--wiki-tokens", type=int, default=100000)
    ap.add_argument("--model-cache", default=None)
    ap.add_argument("--out", default="bench/out/edit_corpus.json")
    a = ap.parse_args()
    lm = load_model(env=Settings.from_env(), cache_dir=a.model_cache)
    hp = defaults_for(lm.model_type, lm.n_layers)
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    wiki = (DATA / "wikitext-2-test.raw").read_text()
    t = time.time()
    # cached after the first run
    sampled = default_corpus(lm, a.sampled_tokens, seed=0, cache_dir=corpus_cache_root(Settings.from_env()), progress=say)
    t_sample = time.time() - t
    c0s, times = {}, {}
    for name, text, n in [("wiki", wiki, a.wiki_tokens), ("wiki-small", wiki, a.sampled_tokens),
                          ("sampled", sampled, a.sampled_tokens)]:
        t = time.time()
        c0s[name], _ = compute_c0(lm, hp.layers, text, n_tokens=n, progress=say)
        times[name] = time.time() - t
    diff = {name: {la: rel_fro(c0s[name][la], c0s["wiki"][la]) for la in hp.layers} for name in c0s}
    recs = counterfact(a.records)
    res = {"before": metrics(lm, recs)}
    toks = prepare(lm, requests(recs), hp)
    t = time.time()
    z, info = optimise_values(lm, toks, hp, progress=say)  # the values do not depend on C0
    t_values = time.time() - t
    for name, c0 in c0s.items():
        restore(lm, W0)
        spread(lm, toks, z, hp, c0, W0, {})
        res[name] = metrics(lm, recs)
    restore(lm, W0)
    report = {"hparams": hp.to_dict(), "records": len(recs), "sample_s": round(t_sample, 1),
              "c0_s": {k: round(v, 1) for k, v in times.items()}, "c0_rel_fro_vs_wiki": diff,
              "scores": res, "values_s": round(t_values, 1),
              "mean_target_prob": sum(info["target_prob"]) / len(recs), "steps": info["steps"], "sampled_text_head": sampled[:300]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
