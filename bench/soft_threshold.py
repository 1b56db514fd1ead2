"""Choose the soft-conflict threshold: cosine of first-edited-layer keys, measured on CounterFact.

A soft conflict is two facts on the same relation whose subjects do not match as text but whose
keys at the first edited layer are near-identical (the model reads them as one subject), with
different targets. This script measures, with the engine's own keys (prefix-averaged, at the
subject's last token, `kledger.edit.engine.measure`):

- positives: a CounterFact subject against a spelling variant of it in the same prompt (a leading
  "the " added or removed, the subject lower-cased, one letter of its longest word dropped, a
  double space): what the user means as the same subject;
- negatives: two different subjects with the same relation template (different records).

It prints the distribution of both and, for candidate thresholds, the share of negatives above
(false soft conflicts) and of positives above (caught variants), and the threshold chosen: the
smallest value with no negative pair above it, rounded up to 0.005.

    OMP_NUM_THREADS=1 python bench/soft_threshold.py [--records 400] [--start 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kledger.edit.engine import EditRequest, measure, prepare  # noqa: E402
from kledger.edit.hparams import defaults_for  # noqa: E402
from kledger.edit.weights import load_model  # noqa: E402
from kledger.records import normalize, template_of  # noqa: E402
from kledger.settings import Settings  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def variants(subject: str, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, variant) spellings of `subject` that `normalize` does not already equate, except
    'lower' (which it does: kept to show the keys of a matched spelling)."""
    out = []
    if subject.lower().startswith("the "):
        out.append(("article", subject[4:]))
    else:
        out.append(("article", "the " + subject))
    words = subject.split()
    longest = max(range(len(words)), key=lambda i: len(words[i]))
    w = words[longest]
    if len(w) >= 4:
        j = rng.randrange(1, len(w) - 1)
        typo = " ".join(words[:longest] + [w[:j] + w[j + 1:]] + words[longest + 1:])
        if normalize(typo) != normalize(subject):
            out.append(("typo", typo))
    out.append(("lower", subject.lower()))
    return [(k, v) for k, v in out if v != subject]


def keys(lm, hp, reqs: list[EditRequest], layer: int, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(reqs), batch):
        toks = prepare(lm, reqs[i:i + batch], hp)
        K, _ = measure(lm, toks, layer, layer)
        out.append(K)
    return torch.cat(out)


def cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    t0 = time.time()
    lm = load_model(a.model, env=Settings.from_env())
    hp = defaults_for(lm.model_type, lm.n_layers)
    layer = hp.layers[0]
    recs = json.loads((DATA / "counterfact-train.json").read_text())
    recs = [r for r in recs if r["subject"] in r["prompt"]][a.start:a.start + a.records]
    rng = random.Random(a.seed)

    # positives: the same prompt with the subject spelled another way
    orig, var, kinds = [], [], []
    for r in recs:
        for kind, v in variants(r["subject"], rng):
            orig.append(EditRequest(r["prompt"], r["subject"], r["target_new"]))
            var.append(EditRequest(r["prompt"].replace(r["subject"], v, 1), v, r["target_new"]))
            kinds.append(kind)
    base = keys(lm, hp, [EditRequest(r["prompt"], r["subject"], r["target_new"]) for r in recs], layer)
    K_o = keys(lm, hp, orig, layer)
    K_v = keys(lm, hp, var, layer)
    pos = cos_rows(K_o, K_v)

    # negatives: every pair of different subjects sharing a relation template
    by_tmpl: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        by_tmpl[template_of(r["prompt"], r["subject"])].append(i)
    neg = []
    for ids in by_tmpl.values():
        for x in range(len(ids)):
            for y in range(x + 1, len(ids)):
                i, j = ids[x], ids[y]
                if normalize(recs[i]["subject"]) != normalize(recs[j]["subject"]):
                    neg.append(float(cos_rows(base[i:i + 1], base[j:j + 1])))
    neg_t = torch.tensor(neg, dtype=torch.float64)
    if neg_t.numel() == 0:
        sys.exit("no negative pairs: give more --records")
    chosen = math.ceil(float(neg_t.max()) / 0.005) * 0.005

    def share(x: torch.Tensor, t: float) -> float:
        return round(100 * float((x > t).double().mean()), 2) if x.numel() else float("nan")

    by_kind = {k: pos[[i for i, kk in enumerate(kinds) if kk == k]] for k in sorted(set(kinds))}
    table = []
    for t in (0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, chosen):
        table.append({"threshold": round(t, 3), "negatives_above_pct": share(neg_t, t),
                      **{f"{k}_above_pct": share(v, t) for k, v in by_kind.items()}})
    q = torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64)
    out = {"model": a.model or "smollm2-135m", "layer": layer,
           "data": "counterfact-train.json", "records": f"{a.start}..{a.start + len(recs) - 1} (subject in prompt)",
           "negative_pairs": len(neg), "positive_pairs": {k: int(v.numel()) for k, v in by_kind.items()},
           "negatives": {"median": round(float(neg_t.quantile(q[0])), 4), "p99": round(float(neg_t.quantile(q[1])), 4),
                         "p99.9": round(float(neg_t.quantile(q[2])), 4), "max": round(float(neg_t.max()), 4)},
           "positives": {k: {"min": round(float(v.min()), 4), "median": round(float(v.median()), 4)}
                         for k, v in by_kind.items()},
           "table": table, "chosen_threshold": round(chosen, 3), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
