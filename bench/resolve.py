"""What a sweep run's stored constraints give when solved again with another λ or another C0: a
cheap screen before a full sequential run. It reads a run's state (bench/sweep.py: per commit and
edited layer, the keys K and target outputs V its facts were measured with), solves the
accumulated least squares of the first --at edits with the λ and C0 asked for, and writes the
weights as a new run folder that `bench/sweep.py score` and `table` read like any other.

    OMP_NUM_THREADS=1 python bench/resolve.py --run holdout-v2 --at 1000 --lam 750 --corpus wikitext:100000
    python bench/sweep.py score --only holdout-v2-lam750-wikitext100000 && python bench/sweep.py table --only ...

--corpus: `sampled` (the default corpus a ledger measures C0 on), `sampled:N:K[:SEED]` (N tokens
drawn by corpus sampler K, with the run's seed or SEED), or `wikitext:N` (the first N tokens of ../shared/data/wikitext-2-test.raw).
The targets were measured against the weights of the run's own λ and C0, so this answers "what
would the solve give these same targets", not what a sequential run with the new setting gives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def corpus_c0(lm, hp, spec: str) -> dict:
    from sweep import DATA, c0_for

    from kledger.edit.stats import compute_c0, default_corpus
    from kledger.edit.weights import corpus_cache_root
    from kledger.settings import Settings

    kind, *rest = spec.split(":")
    if kind == "sampled" and not rest:
        return c0_for(lm, hp)
    n = int(rest[0]) if rest else 100_000
    if kind == "sampled":
        sampler = int(rest[1]) if len(rest) > 1 else 2
        seed = int(rest[2]) if len(rest) > 2 else hp.seed
        text = default_corpus(lm, n, seed=seed, sampler=sampler, cache_dir=corpus_cache_root(Settings.from_env()))
    elif kind == "wikitext":
        text = (DATA / "wikitext-2-test.raw").read_text(encoding="utf-8")
    else:
        raise SystemExit(f"unknown corpus {spec!r}: use sampled, sampled:N:K[:SEED] or wikitext:N")
    c0, used = compute_c0(lm, hp.layers, text, n_tokens=n, seq_len=hp.c0_seq_len, bos=hp.bos)
    print(f"C0 from {spec}: {used} tokens", file=sys.stderr, flush=True)
    return c0


def entity_moment(lm, hp, spec: str) -> dict:
    """E per layer: the mean of k kᵀ over the keys at the last token of capitalised names (one or
    more capitalised words, a lone capitalised word after a sentence start left out) in a text.
    `spec` is `wikitext:N` (the first N tokens of the WikiText-2 test file) or `sampled` (the
    default corpus). Names are where subjects live; C0's mean over every token weights them
    little."""
    import re

    import torch
    from sweep import DATA, OUT

    from kledger.edit.hooks import boundary_token, capture_down_inputs, pad_batch, pad_id_of, run_until
    from kledger.edit.stats import SAMPLED_TOKENS, default_corpus
    from kledger.edit.weights import corpus_cache_root
    from kledger.settings import Settings

    cached = OUT.parent / f"entity-{spec.replace(':', '')}-{'-'.join(map(str, hp.layers))}.pt"
    if cached.exists():
        return torch.load(cached)
    kind, *rest = spec.split(":")
    n = int(rest[0]) if rest else 100_000
    if kind == "wikitext":
        text = (DATA / "wikitext-2-test.raw").read_text(encoding="utf-8")
    else:
        text = default_corpus(lm, SAMPLED_TOKENS, seed=hp.seed, sampler=hp.c0_sampler,
                              cache_dir=corpus_cache_root(Settings.from_env()))
    tok, bos = lm.tokenizer, boundary_token(lm.tokenizer, hp.bos)
    name = re.compile(r"[A-Z][a-zA-Z]+(?:[ -][A-Z][a-zA-Z]+)*")
    seqs, marks, used = [], [], 0
    for para in (p for p in text.split("\n") if len(p.strip()) > 20):
        enc = tok(para, add_special_tokens=False, return_offsets_mapping=True)
        ends = set()
        for m in name.finditer(para):
            before = para[:m.start()].rstrip()
            if " " not in m.group() and "-" not in m.group() and (not before or before[-1] in ".!?:=\"'"):
                continue
            ends.add(m.end())
        for lo in range(0, len(enc.input_ids), hp.c0_seq_len):
            ids = enc.input_ids[lo:lo + hp.c0_seq_len]
            offs = enc.offset_mapping[lo:lo + hp.c0_seq_len]
            pos = [i + (bos is not None) for i, (_, e) in enumerate(offs) if e in ends]
            if pos:
                seqs.append(([bos] if bos is not None else []) + list(ids))
                marks.append(pos)
            used += len(ids)
        if used >= n:
            break
    d_in = lm.model.config.intermediate_size
    sums = {la: torch.zeros(d_in, d_in, dtype=torch.float64) for la in hp.layers}
    count = 0
    for b in range(0, len(seqs), 16):
        padded = pad_batch(seqs[b:b + 16], pad_id_of(tok))
        with torch.no_grad(), capture_down_inputs(lm.model, lm.spec, hp.layers, stop_after=max(hp.layers)) as got:
            run_until(lm.model, padded.input_ids, padded.attention_mask)
        for la in hp.layers:
            x = torch.cat([got[la][j, marks[b + j]] for j in range(len(marks[b:b + 16]))]).double()
            sums[la] += x.T @ x
        count += sum(len(m) for m in marks[b:b + 16])
    print(f"E from {spec}: {count} name tokens in {used} tokens", file=sys.stderr, flush=True)
    E = {la: s / count for la, s in sums.items()}
    torch.save(E, cached)
    return E


def with_names(lm, hp, c0: dict, spec: str, mu: float, lam: float) -> dict:
    """C0 such that the solve's λ C0 becomes λ C0 + μ E (E: `entity_moment` of `spec`)."""
    E = entity_moment(lm, hp, spec)
    return {la: c0[la] + (mu / lam) * E[la] for la in c0}


def with_mean_key(c0: dict, batches: list, mu: float, lam: float) -> dict:
    """C0 such that the solve's λ C0 becomes λ C0 + μ m mᵀ, m the mean of the solved facts' keys
    at each layer: the solve is asked to leave the direction every edit's key shares alone (a
    change that moves every subject alike), and to write each edit through what sets its key
    apart."""
    import torch

    out = {}
    for la in c0:
        K = torch.cat([b[la][0].double().reshape(-1, b[la][0].shape[-1]) for b in batches])
        m = K.mean(0)
        out[la] = c0[la].double() + (mu / lam) * torch.outer(m, m)
    return out


def with_ridge(c0: dict, rho: float) -> dict:
    """C0 such that the solve's λ C0 becomes λ (C0 + ρ c̄ I), c̄ the mean of C0's diagonal (its mean
    eigenvalue) at each layer: a penalty on the change's size in every direction alike (the
    Frobenius norm of ΔW, as ENCORE's norm constraint: Gupta et al., "Lifelong Sequential
    Knowledge Editing without Model Degradation", 2025), where C0 alone leaves the directions
    ordinary text seldom uses almost free to change."""
    import torch

    out = {}
    for la, c in c0.items():
        c = c.double()
        out[la] = c + rho * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    return out


def measured_keys(lm, toks: list, layer: int, bare_weight: float):
    """Every fact's key at `layer` with the model's current weights ([N, d_in]), 100 facts a pass."""
    import torch

    from kledger.edit.engine import measure
    from kledger.edit.hparams import HParams

    hp = HParams(bare_key_weight=bare_weight)
    return torch.cat([measure(lm, toks[i:i + 100], layer, layer, hp)[0] for i in range(0, len(toks), 100)])


def refreshed(lm, hp, res: dict, batches: list, c0: dict, lam: float) -> dict:
    """The same solve with every fact's keys measured again where the facts now stand, bottom up
    (layer l's keys with layers below it already re-solved), and the stored values kept: whether
    the keys' drift under later edits is what erodes the early edits. One pass is a fixed point
    (a layer's keys depend only on the layers below it)."""
    import torch
    from sweep import records

    from kledger.edit.engine import EditRequest, prepare
    from kledger.edit.solve import solve_history
    from kledger.edit.spec import get_weight, set_weight

    n = sum(b[hp.layers[0]][0].shape[0] for b in batches)
    toks = prepare(lm, [EditRequest(f.prompt, f.subject, f.target) for f in records(n, res["start"])], hp)
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}  # the base model's
    W = {}
    try:
        for la in hp.layers:
            K = measured_keys(lm, toks, la, hp.bare_key_weight)
            V = torch.cat([b[la][1] for b in batches])
            W[la] = solve_history(W0[la], [(K, V)], c0[la], lam, "accumulated").float()
            set_weight(lm.model, lm.spec, la, W[la])
    finally:
        for la in hp.layers:
            set_weight(lm.model, lm.spec, la, W0[la])
    return W


def main() -> None:
    import torch
    from sweep import OUT, load

    from kledger.edit.solve import solve_history
    from kledger.edit.spec import get_weight

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run folder name under bench/out/sweep")
    ap.add_argument("--at", type=int, required=True, help="solve the first AT edits of the run")
    ap.add_argument("--lam", type=float, default=None, help="λ (default: the run's own)")
    ap.add_argument("--corpus", default="sampled")
    ap.add_argument("--name", default=None)
    ap.add_argument("--entity", default=None, help="add μ × E (entity_moment) to λ C0: wikitext:N or sampled")
    ap.add_argument("--mu", type=float, default=0.0, help="the weight μ of E (per-token mean, like λ)")
    ap.add_argument("--refresh-keys", action="store_true", help="measure every fact's keys again (see refreshed)")
    ap.add_argument("--mean-key", type=float, default=0.0, help="add μ m mᵀ, m the mean key (see with_mean_key)")
    ap.add_argument("--ridge", type=float, default=0.0, help="add ρ × C0's mean eigenvalue × I to C0 (see with_ridge)")
    a = ap.parse_args()
    src = OUT / a.run
    saved = torch.load(src / "state.pt", weights_only=False)
    res = dict(saved["result"])
    if (src / "result.json").exists():  # a finished run: its cost per fact too
        res = json.loads((src / "result.json").read_text())
    if a.at % res["batch"] or a.at > len(saved["stored"]) * res["batch"]:
        raise SystemExit(f"--at must be a multiple of {res['batch']} up to {len(saved['stored']) * res['batch']}")
    batches = saved["stored"][:a.at // res["batch"]]
    lm, hp = load(res.get("defaults_version", 1))
    hp = hp.with_(**{k: (tuple(v) if k == "layers" else v) for k, v in res["hparams"].items()})
    lam = a.lam or hp.lam
    name = a.name or f"{a.run}-lam{lam:g}-{a.corpus.replace(':', '')}"
    c0 = corpus_c0(lm, hp, a.corpus)
    if a.entity and a.mu:
        c0 = with_names(lm, hp, c0, a.entity, a.mu, lam)
        name = a.name or f"{name}-E{a.entity.replace(':', '')}-mu{a.mu:g}"
    if a.mean_key:
        c0 = with_mean_key(c0, batches, a.mean_key, lam)
        name = a.name or f"{name}-meankey{a.mean_key:g}"
    if a.ridge:
        c0 = with_ridge(c0, a.ridge)
        name = a.name or f"{name}-ridge{a.ridge:g}"
    if a.refresh_keys:
        name = a.name or f"{name}-refresh"
    dst = OUT / name
    dst.mkdir(parents=True, exist_ok=True)
    if a.refresh_keys:
        W = refreshed(lm, hp, res, batches, c0, lam)
    else:
        W = {la: solve_history(get_weight(lm.model, lm.spec, la).double(), [b[la] for b in batches], c0[la], lam,
                               "accumulated").float() for la in hp.layers}
    torch.save(W, dst / f"w{a.at}.pt")
    extra = f", + {a.mu:g} E({a.entity})" if a.entity and a.mu else ""
    extra += ", keys measured again" if a.refresh_keys else ""
    extra += f", + {a.mean_key:g} m mT (the mean key)" if a.mean_key else ""
    extra += f", + {a.ridge:g} × mean eigenvalue × I (a ridge)" if a.ridge else ""
    res.update(setting=f"{res['setting']} re-solved: λ {lam:g}, C0 {a.corpus}{extra}", n=a.at, checkpoints=[a.at],
               resolved_from=a.run, seconds_per_fact=res.get("seconds_per_fact"), mean_steps=res.get("mean_steps"))
    res.pop("batches", None)
    (dst / "result.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
