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
    hp = hp.with_(**{k: v for k, v in res["hparams"].items() if k in ("lam", "layers", "bos", "c0_seq_len", "seed")})
    lam = a.lam or hp.lam
    name = a.name or f"{a.run}-lam{lam:g}-{a.corpus.replace(':', '')}"
    c0 = corpus_c0(lm, hp, a.corpus)
    dst = OUT / name
    dst.mkdir(parents=True, exist_ok=True)
    W = {la: solve_history(get_weight(lm.model, lm.spec, la).double(), [b[la] for b in batches], c0[la], lam,
                           "accumulated").float() for la in hp.layers}
    torch.save(W, dst / f"w{a.at}.pt")
    res.update(setting=f"{res['setting']} re-solved: λ {lam:g}, C0 {a.corpus}", n=a.at, checkpoints=[a.at],
               resolved_from=a.run, seconds_per_fact=res.get("seconds_per_fact"), mean_steps=res.get("mean_steps"))
    res.pop("batches", None)
    (dst / "result.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
