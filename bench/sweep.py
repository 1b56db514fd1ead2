"""Edit hyper-parameters chosen the way the ledger is used: many commits in sequence.

For each setting, N CounterFact train records are edited in sequential batches of B exactly as
`kledger commit` does (each batch measured against the accumulated solve of every earlier batch,
kept in memory here instead of a ledger), with the default model and the default C0 (the
model-sampled corpus). The edited layers' weights are saved at checkpoints; `score` then scores
each checkpoint with the scorer behind `kledger eval` (teacher-forced efficacy / generalization /
specificity and generation success) on the records edited so far, and `table` prints the results.

Records: the records of counterfact-train.json whose subject occurs in the prompt and that have a
neighbourhood prompt, in file order. The sweep uses positions [0, N); positions from
HOLDOUT_START on are kept aside for the final check of the chosen defaults (`--start 7000`) and are
never used in the sweep.

Every step is resumable: a setting's stored constraints are saved after every batch, and a
restarted run re-solves them and goes on from there; finished settings and scored checkpoints are
skipped.

    OMP_NUM_THREADS=1 python bench/sweep.py edit --setting "lam=1500" [--n 300] [--batch 10]
    OMP_NUM_THREADS=1 python bench/sweep.py score [--settings-dir bench/out/sweep]
    python bench/sweep.py table [--settings-dir bench/out/sweep]

A setting is a name for a set of hyper-parameter overrides, "key=value;key=value" (layers as
"4-8"), of the first version of the defaults (kledger.edit.hparams, version 1), which this sweep
was made to replace; "defaults" is those defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
HOLDOUT_START = 7000  # records at or after this position are never used by the sweep
OUT = ROOT / "bench" / "out" / "sweep"
SWEEP_BASE_VERSION = 1  # settings are overrides of the first defaults (kledger.edit.hparams)


def parse_setting(text: str) -> dict[str, Any]:
    """"lam=1500;layers=4-8" → {"lam": 1500.0, "layers": (4, ..., 8)}; "defaults" → {}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if part == "defaults":
            continue
        key, _, value = part.partition("=")
        if key == "layers":
            lo, _, hi = value.partition("-")
            out[key] = tuple(range(int(lo), int(hi or lo) + 1))
        elif key in ("steps", "n_prefixes", "prefix_len", "seed", "c0_tokens", "spread_passes", "key_readings"):
            out[key] = int(value)
        elif key in ("mode", "bos", "value_dtype"):
            out[key] = value
        else:
            out[key] = float(value)
    return out


def setting_name(text: str) -> str:
    return "defaults" if not parse_setting(text) else text.replace(";", ",").replace("=", "")


def records(n: int, start: int = 0) -> list:
    from kledger.formats import read_facts

    facts = [f for f in read_facts(DATA / "counterfact-train.json") if f.subject in f.prompt and f.neighborhood]
    if start < HOLDOUT_START and start + n > HOLDOUT_START:
        raise SystemExit(f"records {start}..{start + n} would reach the held-out slice at {HOLDOUT_START}")
    got = facts[start:start + n]
    if len(got) < n:
        raise SystemExit(f"only {len(got)} usable records from {start}")
    return got


def load(version: int = SWEEP_BASE_VERSION) -> tuple[Any, Any]:
    from kledger.edit.hparams import defaults_for
    from kledger.edit.weights import load_model
    from kledger.settings import Settings

    lm = load_model(env=Settings.from_env())
    return lm, defaults_for(lm.model_type, lm.n_layers, version=version)


def c0_for(lm: Any, hp: Any) -> dict:
    """C0 as a ledger on the default model measures it: the model-sampled default corpus."""
    from kledger.edit.stats import SAMPLED_TOKENS, compute_c0, default_corpus
    from kledger.edit.weights import corpus_cache_root
    from kledger.settings import Settings

    text = default_corpus(lm, SAMPLED_TOKENS, seed=hp.seed, sampler=hp.c0_sampler, cache_dir=corpus_cache_root(Settings.from_env()))
    c0, _ = compute_c0(lm, hp.layers, text, n_tokens=hp.c0_tokens, seq_len=hp.c0_seq_len, bos=hp.bos)
    return c0


def edit(a: argparse.Namespace) -> None:
    import torch

    from kledger.edit.engine import EditRequest, compute_constraints
    from kledger.edit.solve import solve_history
    from kledger.edit.spec import get_weight, set_weight

    torch.manual_seed(0)
    lm, base = load(a.defaults_version)
    hp = base.with_(**parse_setting(a.setting), **({"key_readings": 2} if a.two_keys else {}))
    name = a.name or setting_name(a.setting)
    d = Path(a.settings_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    state_path, result_path = d / "state.pt", d / "result.json"
    checkpoints = sorted({int(x) for x in a.checkpoints.split(",") if int(x) <= a.n} | {a.n})
    facts = records(a.n, a.start)
    reqs = [EditRequest(f.prompt, f.subject, f.target) for f in facts]
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    c0 = c0_for(lm, hp)
    if a.entity and a.mu:  # λ C0 + μ E: names' keys weighted beside the corpus's (bench/resolve.py)
        from resolve import with_names

        c0 = with_names(lm, hp, c0, a.entity, a.mu, hp.lam)
    stored: list[dict] = []
    label = a.setting + (f" + {a.mu:g} E({a.entity})" if a.entity and a.mu else "")
    result: dict[str, Any] = {"setting": label, "defaults_version": a.defaults_version,
                              "hparams": hp.to_dict(), "n": a.n, "batch": a.batch,
                              "start": a.start, "threads": torch.get_num_threads(), "batches": [],
                              **({"entity": a.entity, "mu": a.mu} if a.entity and a.mu else {}),
                              **({"two_keys": True} if a.two_keys else {})}
    if state_path.exists():  # resume: the accumulated solve of the stored batches is the state
        saved = torch.load(state_path, weights_only=False)
        stored, result = saved["stored"], saved["result"]
        result["n"] = a.n  # a run resumed to go further than it was first asked
        for la in hp.layers:
            set_weight(lm.model, lm.spec, la, solve_history(W0[la], [c[la] for c in stored], c0[la], hp.lam, hp.mode))
        print(f"{name}: resumed at {len(stored) * a.batch} edits", file=sys.stderr, flush=True)
    for i in range(len(stored) * a.batch, a.n, a.batch):
        prior = {la: [c[la] for c in stored] for la in hp.layers}
        diag: dict = {}
        t = time.perf_counter()
        stored.append(compute_constraints(lm, reqs[i:i + a.batch], hp, c0, W0, prior, diagnostics=diag))
        done = min(i + a.batch, a.n)
        result["batches"].append({"edits": done, "seconds": round(time.perf_counter() - t, 2),
                                  "steps": diag["steps"], "value_prob": [round(p, 4) for p in diag["target_prob"]]})
        if done in checkpoints:
            torch.save({la: get_weight(lm.model, lm.spec, la).float().clone() for la in hp.layers}, d / f"w{done}.pt")
        torch.save({"stored": stored, "result": result}, state_path.with_suffix(".tmp"))
        os.replace(state_path.with_suffix(".tmp"), state_path)
        print(f"{name}: {done}/{a.n} edits, {result['batches'][-1]['seconds']} s", file=sys.stderr, flush=True)
    secs = sum(b["seconds"] for b in result["batches"])
    steps = [s for b in result["batches"] for s in b["steps"]]
    result.update(seconds_per_fact=round(secs / a.n, 2), mean_steps=round(sum(steps) / len(steps), 2),
                  checkpoints=checkpoints)
    result_path.write_text(json.dumps(result, indent=1))


def score(a: argparse.Namespace) -> None:
    import torch

    from kledger.edit.evaluate import Scorer, evaluate_model
    from kledger.edit.hooks import boundary_token
    from kledger.edit.spec import get_weight, set_weight

    lm, hp = load()
    W0 = {la: get_weight(lm.model, lm.spec, la).clone() for la in range(lm.n_layers)}
    scorer = Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, hp.bos), spec=lm.spec)
    for d in sorted(Path(a.settings_dir).iterdir()):
        if a.only and d.name not in {a.only, *a.only.split(",")}:
            continue
        res_path = d / "result.json"
        if res_path.exists():
            res = json.loads(res_path.read_text())
        elif (d / "state.pt").exists():  # still running: its checkpoints so far
            res = torch.load(d / "state.pt", weights_only=False)["result"]
        else:
            continue
        scores = json.loads((d / "scores.json").read_text()) if (d / "scores.json").exists() else {}
        facts = records(res["n"], res["start"])
        for n in sorted(int(w.stem[1:]) for w in d.glob("w*.pt")):
            for key, weights in ((f"base{n}", {}), (str(n), torch.load(d / f"w{n}.pt"))):
                if key in scores or (key.startswith("base") and not a.base):
                    continue
                if key.startswith("base") and (done := _base_scores(Path(a.settings_dir), res["start"], key)):
                    scores[key] = done  # the same records on the same base model
                    (d / "scores.json").write_text(json.dumps(scores, indent=1))
                    continue
                for la, W in W0.items():
                    set_weight(lm.model, lm.spec, la, weights.get(la, W))
                r = evaluate_model(scorer, facts[:n], gen_tokens=0)
                scores[key] = r["metrics"]["counterfact"]
                (d / "scores.json").write_text(json.dumps(scores, indent=1))
                print(f"{d.name} {key}: {scores[key]}", file=sys.stderr, flush=True)
        for la, W in W0.items():
            set_weight(lm.model, lm.spec, la, W)


def _base_scores(root: Path, start: int, key: str) -> dict | None:
    """The base model's scores on the same records, if another setting has them."""
    for d in root.iterdir():
        sc, res = d / "scores.json", d / "result.json"
        if sc.exists() and res.exists() and json.loads(res.read_text())["start"] == start:
            got = json.loads(sc.read_text()).get(key)
            if got:
                return got
    return None


METRICS = ("efficacy", "generalization", "specificity", "p_new_prompt", "gen_rewrite", "gen_paraphrase",
           "gen_neighborhood")


def table(a: argparse.Namespace) -> None:
    rows = []
    for d in sorted(Path(a.settings_dir).iterdir()):
        if not (d / "result.json").exists() or not (d / "scores.json").exists():
            continue
        if a.only and d.name not in {a.only, *a.only.split(",")}:
            continue
        res, sc = json.loads((d / "result.json").read_text()), json.loads((d / "scores.json").read_text())
        for n in res["checkpoints"]:
            if str(n) not in sc:
                continue
            m = sc[str(n)]
            cells = [f"{100 * m[k]:.1f}" if k in m and m[k] is not None and k not in ("p_new_prompt",)
                     else (f"{m[k]:.2f}" if m.get(k) is not None else "") for k in METRICS]
            base = sc.get(f"base{n}")
            rows.append(f"| {res['setting']} | {n} | " + " | ".join(cells)
                        + f" | {'' if not base else round(100 * base['specificity'], 1)} | {res['seconds_per_fact']} "
                          f"| {res['mean_steps']} |")
    print("| setting | edits | " + " | ".join(METRICS) + " | base specificity | s per fact | mean steps |")
    print("|" + " --- |" * (len(METRICS) + 5))
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("edit")
    e.add_argument("--setting", default="defaults")
    e.add_argument("--name", default=None)
    e.add_argument("--n", type=int, default=300)
    e.add_argument("--batch", type=int, default=10)
    e.add_argument("--start", type=int, default=0)
    e.add_argument("--checkpoints", default="100,200,300,500,1000")
    e.add_argument("--defaults-version", type=int, default=SWEEP_BASE_VERSION,
                   help="the version of kledger's default hyper-parameters the setting overrides")
    e.add_argument("--entity", default=None, help="add μ E, the names' key moment (bench/resolve.py), to λ C0")
    e.add_argument("--mu", type=float, default=0.0)
    e.add_argument("--two-keys", action="store_true",
                   help="two constraints per fact and layer: the setting with key_readings=2 (kledger.edit.hparams)")
    for p in (e, sub.add_parser("score"), sub.add_parser("table")):
        p.add_argument("--settings-dir", default=str(OUT))
    sub.choices["score"].add_argument("--base", action="store_true", help="also score the unedited model")
    for name in ("score", "table"):
        sub.choices[name].add_argument("--only", default=None, help="only these settings (folder names, comma-separated)")
    a = ap.parse_args()
    {"edit": edit, "score": score, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
