"""How long a new user waits for C0's default corpus, and whether the faster sampler changes C0:
the default corpus (SAMPLED_TOKENS tokens sampled from the default model) drawn by corpus sampler 1
(transformers' generate, the first release) and sampler 2 (a cached loop that ranks only the
boundary of each nucleus, kledger's default), each timed, then C0 measured from each text. C0's
relative Frobenius difference between the two samplers is printed beside the difference between
two seeds of sampler 2: a sampler that changed C0 beyond what another seed does would show there.

    python bench/c0_bench.py [--tokens 20000] [--threads 2] [--json FILE] [--skip-old]

Nothing is cached: every corpus is sampled afresh. Ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from kledger.edit.hparams import defaults_for
    from kledger.edit.stats import SAMPLED_TOKENS, compute_c0, sample_corpus
    from kledger.edit.weights import load_model
    from kledger.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=SAMPLED_TOKENS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--skip-old", action="store_true", help="do not time sampler 1 (it is the slow one)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_model(env=Settings.from_env())
    hp = defaults_for(lm.model_type, lm.n_layers)
    out: dict = {"tokens": a.tokens, "threads": torch.get_num_threads(), "layers": list(hp.layers), "runs": {}}
    c0s = {}
    runs = [("sampler2-seed0", 2, 0), ("sampler2-seed1", 2, 1)] + ([] if a.skip_old else [("sampler1-seed0", 1, 0)])
    for name, sampler, seed in runs:
        t = time.perf_counter()
        text = sample_corpus(lm, a.tokens, seed=seed, sampler=sampler)
        t_sample = time.perf_counter() - t
        t = time.perf_counter()
        c0s[name], n = compute_c0(lm, hp.layers, text, n_tokens=a.tokens, seq_len=hp.c0_seq_len, bos=hp.bos)
        t_c0 = time.perf_counter() - t
        out["runs"][name] = {"sample_s": round(t_sample, 1), "c0_s": round(t_c0, 1), "c0_tokens": n,
                             "tokens_per_s": round(a.tokens / t_sample, 1)}
        print(f"{name}: sampled {a.tokens} tokens in {t_sample:.1f} s ({a.tokens / t_sample:.0f}/s), "
              f"C0 on {n} tokens in {t_c0:.1f} s", flush=True)

    def rel(x: str, y: str) -> list[float]:
        return [round(float(torch.linalg.norm(c0s[x][la] - c0s[y][la]) / torch.linalg.norm(c0s[y][la])), 3)
                for la in hp.layers]

    out["c0_rel_diff"] = {"seed0_vs_seed1 (sampler 2)": rel("sampler2-seed0", "sampler2-seed1")}
    if not a.skip_old:
        out["c0_rel_diff"]["sampler2_vs_sampler1 (seed 0)"] = rel("sampler2-seed0", "sampler1-seed0")
        r = out["runs"]
        out["speedup_sampling"] = round(r["sampler1-seed0"]["sample_s"] / r["sampler2-seed0"]["sample_s"], 2)
        print(f"sampler 2 is {out['speedup_sampling']}x faster than sampler 1")
    for k, v in out["c0_rel_diff"].items():
        print(f"C0 relative Frobenius difference per layer {hp.layers}, {k}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
