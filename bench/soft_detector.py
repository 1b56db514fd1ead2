"""Precision and recall of kledger's contradiction detector on labelled CounterFact pairs.

Every pair below is two facts on one relation with different objects, run through the detector a
ledger runs (`kledger.conflicts`: matching form for hard conflicts, first-edited-layer keys and the
default soft threshold for soft ones, `same_entity` to tell a soft contradiction from a key
collision), with the engine's own keys (`kledger.edit.engine.first_keys`, default model and
hyper-parameters). Labels:

- contradiction, same subject written another way (the record's prompt with its subject varied):
  `article` ("the " added or removed), `typo` (a letter of the longest word dropped), `hyphen`
  (spaces between words as hyphens), `lower` (lower-cased: text matching already equates it);
- contradiction through a declared inverse relation (synthetic: "X's capital is Y" declared the
  inverse of "Y is the capital of"; a fact on each side naming different partners);
- not a contradiction: two different subjects of the same relation template (different records),
  every such pair among the records. Those whose keys pass the threshold are key collisions: the
  detector must call them collisions (reported, not refused), not conflicts.

Prints, per label, how many pairs the detector calls a conflict (hard, soft or inverse), a
collision, or nothing; precision and recall of "conflict" for "contradiction"; and the collisions
found, with their cosines.

    OMP_NUM_THREADS=1 python bench/soft_detector.py [--records 1000] [--start 0] [--key-readings 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kledger.conflicts import COLLISION, SOFT_THRESHOLD, find_conflicts, key_cosine, soft_edges  # noqa: E402
from kledger.edit.engine import EditRequest, first_keys, prepare  # noqa: E402
from kledger.edit.hparams import defaults_for  # noqa: E402
from kledger.edit.weights import load_model  # noqa: E402
from kledger.records import Fact, normalize, relation_key  # noqa: E402
from kledger.settings import Settings  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def variants(subject: str, rng: random.Random) -> list[tuple[str, str]]:
    out = [("article", subject[4:] if subject.lower().startswith("the ") else "the " + subject)]
    words = subject.split()
    longest = max(range(len(words)), key=lambda i: len(words[i]))
    w = words[longest]
    if len(w) >= 4:
        j = rng.randrange(1, len(w) - 1)
        out.append(("typo", " ".join(words[:longest] + [w[:j] + w[j + 1:]] + words[longest + 1:])))
    if len(words) > 1:
        out.append(("hyphen", "-".join(words)))
    out.append(("lower", subject.lower()))
    return [(k, v) for k, v in out if v != subject]


def verdict(a: Fact, b: Fact, keys: dict, threshold: float, inverse: dict | None = None) -> str:
    """What the detector makes of the pair: "conflict" (hard, soft or inverse), "collision" or "none"."""
    facts = {a.id: a, b.id: b}
    edges = soft_edges(facts, keys, threshold)
    if find_conflicts(facts, inverse=inverse, extra_edges=[e for e in edges if e[2] != COLLISION]):
        return "conflict"
    return "collision" if edges else "none"


def all_keys(lm, hp, facts: list[Fact], batch: int = 64) -> dict:
    out = {}
    for i in range(0, len(facts), batch):
        chunk = facts[i:i + batch]
        toks = prepare(lm, [EditRequest(f.prompt, f.subject, f.target) for f in chunk], hp)
        K = first_keys(lm, toks, hp.layers[0], hp)
        out.update({f.id: K[j].numpy() for j, f in enumerate(chunk)})
    return out


def inverse_pairs(n: int, rng: random.Random) -> tuple[list[tuple[Fact, Fact]], dict]:
    """Synthetic contradictions through a declared inverse: (X's capital is Y) against
    (Z is the capital of X) for Z ≠ Y."""
    places = ["Norway", "Chile", "Kenya", "Peru", "Japan", "Canada", "Egypt", "Poland", "Ghana", "Nepal"]
    cities = ["Oslo", "Lima", "Nairobi", "Tokyo", "Ottawa", "Cairo", "Warsaw", "Accra", "Kathmandu", "Santiago"]
    fwd, inv = "The capital of {} is", "{} is the capital of"
    pairs = []
    for _ in range(n):
        x, y, z = rng.choice(places), *rng.sample(cities, 2)
        pairs.append((Fact.create(fwd.format(x), y, subject=x), Fact.create(inv.format(z), x, subject=z)))
    r1, r2 = relation_key(fwd.format("{}")), relation_key(inv.format("{}"))
    return pairs, {r1: r2, r2: r1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=SOFT_THRESHOLD)
    ap.add_argument("--key-readings", type=int, default=1,
                    help="2: the keys of a ledger made with key_readings=2 (the mean of the bare and prefixed readings)")
    a = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    lm = load_model(env=Settings.from_env())
    hp = defaults_for(lm.model_type, lm.n_layers).with_(key_readings=a.key_readings)
    rng = random.Random(a.seed)
    recs = json.loads((DATA / "counterfact-train.json").read_text())
    recs = [r for r in recs if r["subject"] in r["prompt"]][a.start:a.start + a.records]
    base = [Fact.create(r["prompt"], r["target_new"], subject=r["subject"]) for r in recs]
    pos: list[tuple[str, Fact, Fact]] = []
    for r, f in zip(recs, base):
        for kind, v in variants(r["subject"], rng):
            other = Fact.create(r["prompt"].replace(r["subject"], v, 1), r["ground_truth"], subject=v)
            pos.append((kind, f, other))
    keys = all_keys(lm, hp, base + [p[2] for p in pos])
    counts: dict[str, Counter] = defaultdict(Counter)
    for kind, f, g in pos:
        counts[f"contradiction: {kind}"][verdict(f, g, keys, a.threshold)] += 1
    inv, rules = inverse_pairs(200, rng)
    for f, g in inv:
        counts["contradiction: inverse relation"][verdict(f, g, {}, a.threshold, rules)] += 1
    by_rel: dict[str, list[Fact]] = defaultdict(list)
    for f in base:
        by_rel[f.key[1]].append(f)
    collisions = []
    for group in by_rel.values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                f, g = group[i], group[j]
                if normalize(f.subject) == normalize(g.subject) or f.object_key == g.object_key:
                    continue
                v = verdict(f, g, keys, a.threshold)
                counts["different subjects"][v] += 1
                if v != "none":
                    collisions.append({"subjects": [f.subject, g.subject], "verdict": v,
                                       "cosine": round(key_cosine(keys[f.id], keys[g.id]), 4)})
    tp = sum(c["conflict"] for k, c in counts.items() if k.startswith("contradiction"))
    fn = sum(c["none"] + c["collision"] for k, c in counts.items() if k.startswith("contradiction"))
    fp = counts["different subjects"]["conflict"]
    out = {"model": "smollm2-135m", "layer": hp.layers[0], "threshold": a.threshold, "key_readings": a.key_readings,
           "data": f"counterfact-train.json records {a.start}..{a.start + len(recs) - 1} (subject in prompt)",
           "pairs": {k: dict(v) | {"total": sum(v.values())} for k, v in sorted(counts.items())},
           "precision": round(tp / max(1, tp + fp), 4), "recall": round(tp / max(1, tp + fn), 4),
           "recall_by_label": {k: round(v["conflict"] / max(1, sum(v.values())), 4)
                               for k, v in sorted(counts.items()) if k.startswith("contradiction")},
           "collisions": sorted(collisions, key=lambda c: -c["cosine"])[:20],
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
