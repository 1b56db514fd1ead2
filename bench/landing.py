"""Which edits do not take, and where the subject sits in their prompt.

Per record of a bench/sweep.py run at a checkpoint: whether the new object beats the true one on
the prompt (efficacy, as `kledger eval` scores it, `<|endoftext|>` in front) and its probability,
grouped by whether the prompt starts with the subject (so its last token sits a few tokens after
the boundary token) or has words before it; the records that never took (probability of the new
object below 0.05 at the checkpoint) are listed. Then, per edited layer, how far the facts' keys
have moved from the stored ones under the later edits (key drift: the mean of ‖k now − k stored‖ /
‖k stored‖), for the facts below 0.05 and the rest.

With --single K, the first K records are also edited one at a time on the base model (the run's
hyper-parameters), and for each the share of the optimised change at the last edited layer that
the written weights realise on the bare prompt (the residual at the subject's last token) and the
probability of the new object after writing are printed, grouped the same way.

    OMP_NUM_THREADS=1 python bench/landing.py --run train-v2-1000 --at 1000 [--single 40] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

GROUPS = (("starts with the subject", True), ("words before the subject", False))


def single(lm, hp, facts, c0) -> list[dict]:
    from neighbours import per_record

    from kledger.edit.engine import EditRequest, measure, optimise_values, prepare, spread
    from kledger.edit.spec import get_weight, set_weight

    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    L, out = hp.layers[-1], []
    for f in facts:
        for la in hp.layers:
            set_weight(lm.model, lm.spec, la, W0[la])
        toks = prepare(lm, [EditRequest(f.prompt, f.subject, f.target)], hp)
        _, h0 = measure(lm, toks, L, L)
        z, _ = optimise_values(lm, toks, hp)
        spread(lm, toks, z, hp, c0, W0, {})
        _, zc = measure(lm, toks, L, L)
        d = (z - h0).flatten()
        share = float(d @ (zc - h0).flatten() / (d @ d))
        out.append({"subject_first": f.prompt.startswith(f.subject), "realised": round(share, 3),
                    "p_new": round(per_record(lm, [f], None)[0]["p_new_prompt"], 4)})
    for la in hp.layers:
        set_weight(lm.model, lm.spec, la, W0[la])
    return out


def drift(lm, hp, facts, run_dir: Path, at: int, weights: dict, gone: set[int]) -> dict:
    """Per edited layer, the mean relative difference between each fact's key measured with the
    checkpoint's weights and the key stored when it was committed, for the facts whose new object
    fell below 0.05 and for the rest."""
    import torch
    from resolve import measured_keys

    from kledger.edit.engine import EditRequest, prepare
    from kledger.edit.spec import get_weight, set_weight

    saved = torch.load(run_dir / "state.pt", weights_only=False)["stored"]
    toks = prepare(lm, [EditRequest(f.prompt, f.subject, f.target) for f in facts], hp)
    base = {la: get_weight(lm.model, lm.spec, la).clone() for la in weights}
    for la, W in weights.items():
        set_weight(lm.model, lm.spec, la, W)
    out = {}
    try:
        for la in hp.layers:
            stored = torch.cat([c[la][0] for c in saved])[:at]
            now = measured_keys(lm, toks, la, hp.bare_key_weight)
            rel = (now - stored).norm(dim=1) / stored.norm(dim=1)
            mask = torch.tensor([i in gone for i in range(at)])
            out[la] = {"gone": round(float(rel[mask].mean()), 3) if mask.any() else None,
                       "rest": round(float(rel[~mask].mean()), 3)}
    finally:
        for la, W in base.items():
            set_weight(lm.model, lm.spec, la, W)
    return out


def main() -> None:
    import torch
    from neighbours import per_record
    from sweep import OUT, c0_for, load, records

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run folder under bench/out/sweep")
    ap.add_argument("--at", type=int, required=True)
    ap.add_argument("--single", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = json.loads((OUT / a.run / "result.json").read_text())
    lm, hp = load(res.get("defaults_version", 1))
    hp = hp.with_(**{k: (tuple(v) if k == "layers" else v) for k, v in res["hparams"].items()})
    facts = records(a.at, res["start"])
    weights = torch.load(OUT / a.run / f"w{a.at}.pt")
    per = per_record(lm, facts, weights)
    report: dict = {"run": a.run, "at": a.at, "groups": {}, "never": []}
    print(f"# {a.run} at {a.at} edits\n\n| prompt | records | efficacy | mean P(new) | P(new) < 0.05 |\n| --- | --- | --- | --- | --- |")
    for name, first in GROUPS:
        rows = [m for f, m in zip(facts, per) if f.prompt.startswith(f.subject) == first]
        if not rows:
            continue
        g = {"records": len(rows), "efficacy": round(100 * sum(m["efficacy"] for m in rows) / len(rows), 1),
             "p_new": round(sum(m["p_new_prompt"] for m in rows) / len(rows), 3),
             "never": sum(m["p_new_prompt"] < 0.05 for m in rows)}
        report["groups"][name] = g
        print(f"| {name} | {g['records']} | {g['efficacy']} | {g['p_new']} | {g['never']} |")
    gone = [i for i, m in enumerate(per) if m["p_new_prompt"] < 0.05]
    report["never"] = [{"position": i, "prompt": facts[i].prompt, "target": facts[i].target,
                        "p_new": round(per[i]["p_new_prompt"], 4)} for i in gone]
    report["key_drift"] = drift(lm, hp, facts, OUT / a.run, a.at, weights, set(gone))
    print("\n| layer | key drift, facts below 0.05 | key drift, the rest |\n| --- | --- | --- |")
    for la, d in report["key_drift"].items():
        print(f"| {la} | {d['gone']} | {d['rest']} |")
    if a.single:
        got = single(lm, hp, facts[:a.single], c0_for(lm, hp))
        report["single"] = got
        print("\n| one edit on the base model | records | realised share at the last edited layer | P(new) after writing |")
        print("| --- | --- | --- | --- |")
        for name, first in GROUPS:
            rows = [r for r in got if r["subject_first"] == first]
            if rows:
                print(f"| {name} | {len(rows)} | {sum(r['realised'] for r in rows) / len(rows):.2f} "
                      f"| {sum(r['p_new'] for r in rows) / len(rows):.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
