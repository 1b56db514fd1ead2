"""Where the value optimisation's time goes, and what running only the layers above the edited one
saves: one batch of CounterFact facts optimised for a fixed number of steps (no early stop, so the
two ways do the same steps), every decoder layer every step against only the layers above the one
δ is added to (kledger's default), with the time split into the forward of the layers at and
below it, the forward of the layers above, the LM head, and the rest (backward, Adam, bookkeeping).

    OMP_NUM_THREADS=1 python bench/values_bench.py [--facts 10] [--steps 6] [--start 400]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from kledger.edit.engine import EditRequest, optimise_values, prepare  # noqa: E402
from kledger.edit.spec import get_module  # noqa: E402


def timed(lm, toks, hp, reuse_below: bool) -> dict:
    """Seconds of one optimisation, split by where the forward time went (hooks on the layers)."""
    spent: dict = {"below": 0.0, "above": 0.0, "head": 0.0}
    L = hp.layers[-1]
    stack = get_module(lm.model, lm.spec.layers)
    handles = []

    def watch(mod, part):
        def pre(_m, _a):
            mod._t0 = time.perf_counter()

        def post(_m, _a, _o):
            spent[part] += time.perf_counter() - mod._t0
        handles.extend([mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)])

    for i, layer in enumerate(stack):
        watch(layer, "below" if i <= L else "above")
    watch(get_module(lm.model, lm.spec.lm_head), "head")
    try:
        t = time.perf_counter()
        z, _ = optimise_values(lm, toks, hp, reuse_below=reuse_below)
        total = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    return {"seconds": round(total, 2), **{f"forward_{k}_s": round(v, 2) for k, v in spent.items()},
            "rest_s": round(total - sum(spent.values()), 2), "z": z}


def main() -> None:
    import sweep

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--start", type=int, default=400)
    a = ap.parse_args()
    lm, hp = sweep.load(version=2)
    hp = hp.with_(steps=a.steps, early_stop_prob=1.01)  # every fact runs every step
    facts = sweep.records(a.facts, a.start)
    toks = prepare(lm, [EditRequest(f.prompt, f.subject, f.target) for f in facts], hp)
    every = timed(lm, toks, hp, reuse_below=False)
    above = timed(lm, toks, hp, reuse_below=True)
    z_every, z_above = every.pop("z"), above.pop("z")
    print(json.dumps({"facts": a.facts, "steps": a.steps, "layers": list(hp.layers), "threads": torch.get_num_threads(),
                      "every_layer_every_step": every, "only_layers_above": above,
                      "speedup": round(every["seconds"] / above["seconds"], 2),
                      "values_rel_diff": float((z_every - z_above).norm() / z_every.norm())}, indent=1))


if __name__ == "__main__":
    main()
