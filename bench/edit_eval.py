"""Shared helpers for the edit-engine benchmarks: CounterFact records and simple metrics.

Metrics (CounterFact, EasyEdit layout, whole-continuation log-probabilities, boundary token in
front as in the engine):
  efficacy       P(new object | prompt) > P(true object | prompt)
  generalization the same on the rephrased prompt
  specificity    P(true object | neighbourhood prompt) > P(new object | neighbourhood prompt)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kledger.edit.engine import EditRequest
from kledger.edit.hooks import boundary_token, encode, pad_batch, pad_id_of

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def counterfact(n: int, start: int = 0) -> list[dict]:
    """The first n records (from `start`) of counterfact-train.json whose subject is in the prompt."""
    recs = json.loads((DATA / "counterfact-train.json").read_text())
    recs = [r for r in recs if r["subject"] in r["prompt"]]
    return recs[start:start + n]


def requests(recs: list[dict]) -> list[EditRequest]:
    return [EditRequest(r["prompt"], r["subject"], r["target_new"]) for r in recs]


@torch.no_grad()
def logprobs(lm: Any, pairs: list[tuple[str, str]], bos: str = "auto") -> list[float]:
    """Sum of log-probabilities of each continuation (given a leading space) after its prompt."""
    tok = lm.tokenizer
    bos = boundary_token(tok, bos)
    seqs, spans = [], []
    for prompt, cont in pairs:
        p = encode(tok, prompt.rstrip(), bos)
        full = encode(tok, prompt.rstrip() + " " + cont.strip(), bos)
        c = full[len(p):] if full[:len(p)] == p else encode(tok, " " + cont.strip())
        seqs.append(p + c)
        spans.append((len(p), len(c)))
    out = []
    for i in range(0, len(seqs), 32):
        b = pad_batch(seqs[i:i + 32], pad_id_of(tok))
        dev = lm.device
        lp = torch.log_softmax(lm.model(input_ids=b.input_ids.to(dev),
                                        attention_mask=b.attention_mask.to(dev)).logits.float(), -1).cpu()
        for j, (s, n) in enumerate(spans[i:i + 32]):
            ids = b.input_ids[j, s:s + n]
            out.append(float(lp[j, s - 1:s - 1 + n].gather(1, ids[:, None]).sum()))
    return out


def metrics(lm: Any, recs: list[dict], bos: str = "auto") -> dict[str, float]:
    """Efficacy, generalization and specificity (percent) over the records."""
    pairs = []
    for r in recs:
        new, true = r["target_new"], r["ground_truth"]
        pairs += [(r["prompt"], new), (r["prompt"], true), (r["rephrase_prompt"], new),
                  (r["rephrase_prompt"], true), (r["locality_prompt"], new),
                  (r["locality_prompt"], r["locality_ground_truth"])]
    lp = logprobs(lm, pairs, bos)
    eff = gen = spec = 0
    for i in range(len(recs)):
        a = lp[6 * i:6 * i + 6]
        eff += a[0] > a[1]
        gen += a[2] > a[3]
        spec += a[5] > a[4]
    n = max(1, len(recs))
    return {"efficacy": 100 * eff / n, "generalization": 100 * gen / n, "specificity": 100 * spec / n}
