"""Where the value optimisation's time goes, and what running only the layers above the edited one
and computing their linear layers in bfloat16 save: one batch of CounterFact facts optimised for a
fixed number of steps (no early stop, so the ways do the same steps), every decoder layer every
step; only the layers above the one δ is added to, fed as one padded batch (kledger's default
before 2026-12-07's grouping); the same fed in groups of about one length (the default); and that
with value_dtype=bfloat16. The time is split into the forward of the layers at and below it, the
forward of the layers above, the LM head, the backward passes with Adam's steps, and the rest
(bookkeeping).

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
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook  # noqa: E402

from kledger.edit.engine import EditRequest, optimise_values, prepare  # noqa: E402
from kledger.edit.spec import get_module  # noqa: E402
from kledger.edit.values import _LowPrecisionLinear  # noqa: E402


def timed(lm, toks, hp, reuse_below: bool, by_length: bool = True) -> dict:
    """Seconds of one optimisation, split by where the forward time went (hooks on the layers) and
    the time of the backward passes with Adam's steps (`values._descend`)."""
    from kledger.edit import values

    spent: dict = {"below": 0.0, "above": 0.0, "head": 0.0}
    backward = [0.0]
    descend = values._descend

    def timed_descend(*args, **kwargs):
        t0 = time.perf_counter()
        descend(*args, **kwargs)
        backward[0] += time.perf_counter() - t0
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
    head = get_module(lm.model, lm.spec.lm_head)
    watch(head, "head")
    # the head's low-precision stand-in (value_dtype bfloat16) is another module: found by its shape
    is_head = lambda m: isinstance(m, _LowPrecisionLinear) and m.w.shape == head.weight.shape  # noqa: E731
    handles.extend([register_module_forward_pre_hook(lambda m, a: setattr(m, "_t0", time.perf_counter())
                                                     if is_head(m) else None),
                    register_module_forward_hook(lambda m, a, o: spent.__setitem__(
                        "head", spent["head"] + time.perf_counter() - m._t0) if is_head(m) else None)])
    try:
        values._descend = timed_descend
        t = time.perf_counter()
        z, diag = optimise_values(lm, toks, hp, reuse_below=reuse_below, by_length=by_length)
        total = time.perf_counter() - t
    finally:
        values._descend = descend
        for h in handles:
            h.remove()
    return {"seconds": round(total, 2), **{f"forward_{k}_s": round(v, 2) for k, v in spent.items()},
            "backward_and_adam_s": round(backward[0], 2),
            "rest_s": round(total - sum(spent.values()) - backward[0], 2),
            "mean_target_prob": round(sum(diag["target_prob"]) / len(toks), 4),
            "mean_delta_ratio": round(sum(diag["delta_norm_ratio"]) / len(toks), 4), "z": z}


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
    ways = {"every_layer_every_step": timed(lm, toks, hp, reuse_below=False, by_length=False),
            "only_layers_above_one_padded_batch": timed(lm, toks, hp, reuse_below=True, by_length=False),
            "only_layers_above_by_length": timed(lm, toks, hp, reuse_below=True),
            "bfloat16_above_by_length": timed(lm, toks, hp.with_(value_dtype="bfloat16"), reuse_below=True)}
    z = {k: w.pop("z") for k, w in ways.items()}
    ref, default = z["every_layer_every_step"], z["only_layers_above_by_length"]
    first = ways["every_layer_every_step"]["seconds"]
    print(json.dumps({"facts": a.facts, "steps": a.steps, "layers": list(hp.layers), "threads": torch.get_num_threads(),
                      **ways, "speedup": {k: round(first / w["seconds"], 2) for k, w in ways.items()},
                      "values_rel_diff": {k: float((v - ref).norm() / ref.norm()) for k, v in z.items()},
                      "bfloat16_values_rel_diff": float((z["bfloat16_above_by_length"] - default).norm()
                                                        / default.norm())}, indent=1))

if __name__ == "__main__":
    main()
