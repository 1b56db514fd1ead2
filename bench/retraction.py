"""Exact retraction, measured on the real model: remove edits from a long history by re-solving,
and compare with the only route editors without a kept history have, editing each fact back to its
old object (RoundEdit).

1. A ledger on the default model gets N CounterFact train records in sequential commits of B
   (`kledger add` + `kledger commit` through the library; conflicting records are committed with
   `allow_conflicts`, and the count is reported). The ledger lives in --dir, so a killed run goes
   on from its last commit.
2. R of the facts are retracted on a branch: whole commits with `revert`, then single facts with
   `rm` and one commit.
3. Checked there:
   (a) the weights `apply` gives equal the one-shot solve, in float64, of the constraints stored
       at the old HEAD without the retracted facts' (computed here from those rows directly);
   (b) the retracted facts' answers return to the base model's: efficacy and generation success
       against the base model's, and the mean KL divergence of the next-token distribution after
       their prompts from the base model's (beside the same KL for the edited model);
   (c) the kept facts keep their scores.
4. RoundEdit from the old HEAD: the retracted facts are edited again with their true object as
   the target, in batches of B, each batch measured against the current weights and written on
   top of them (MEMIT's sequential update: the earlier edits stay in the weights, the new batch is
   solved against λC0 alone), and (b), (c) are measured the same way.

    OMP_NUM_THREADS=1 python bench/retraction.py [--n 300] [--batch 10] [--revert 2] [--rm 10] \
        [--dir bench/out/retraction] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sweep import records  # noqa: E402

from kledger import model_side  # noqa: E402
from kledger.edit.engine import EditRequest, compute_constraints  # noqa: E402
from kledger.edit.evaluate import Scorer, evaluate_model  # noqa: E402
from kledger.edit.hooks import boundary_token, encode, logits_at, pad_batch  # noqa: E402
from kledger.edit.solve import no_tf32, rel_fro, solve_history  # noqa: E402
from kledger.edit.spec import get_weight, set_weight  # noqa: E402
from kledger.errors import ConflictError  # noqa: E402
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402

AUTHOR = "bench <bench@kledger>"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(lg: Ledger, facts: list[Fact], batch: int) -> dict:
    """Commit `facts` in batches on `main`, going on after the commits already there."""
    done = len(lg.first_parent_chain(lg.head())) if lg.head() else 0
    forced = 0
    for i in range(done * batch, len(facts), batch):
        t = time.perf_counter()
        lg.add(facts[i:i + batch])
        try:
            lg.commit(f"edits {i + 1}-{i + batch}", author=AUTHOR)
        except ConflictError:
            lg.commit(f"edits {i + 1}-{i + batch} (conflicts kept)", author=AUTHOR, allow_conflicts=True)
            forced += 1
        log(f"committed {min(i + batch, len(facts))}/{len(facts)} in {time.perf_counter() - t:.1f} s")
    return {"commits": len(lg.first_parent_chain(lg.head())), "committed_with_conflicts": forced}


@torch.no_grad()
def next_token_logprobs(lm: Any, prompts: list[str], bos: int | None) -> torch.Tensor:
    """[n, V] log-probabilities of the next token after each prompt."""
    seqs = [encode(lm.tokenizer, p.rstrip(), bos) for p in prompts]
    out = []
    for i in range(0, len(seqs), 32):
        b = pad_batch(seqs[i:i + 32], 0)
        cols = torch.tensor([len(s) - 1 for s in seqs[i:i + 32]])
        out.append(torch.log_softmax(logits_at(lm.model, lm.spec, b.input_ids, b.attention_mask,
                                               torch.arange(len(cols)), cols).float(), -1).cpu())
    return torch.cat(out)


def kl_from(base_lp: torch.Tensor, lp: torch.Tensor) -> float:
    """Mean over prompts of KL(base ‖ model) of the next-token distributions, in nats."""
    return float((base_lp.exp() * (base_lp - lp)).sum(-1).mean())


def scores(scorer: Scorer, lm: Any, facts: list[Fact], base_lp: torch.Tensor | None, bos: int | None) -> dict:
    m = evaluate_model(scorer, facts)["metrics"]["counterfact"]
    out = {k: round(100 * m[k], 1) for k in ("efficacy", "generalization", "specificity", "gen_rewrite",
                                              "gen_paraphrase", "gen_neighborhood")}
    out["p_new_prompt"] = round(m["p_new_prompt"], 4)
    if base_lp is not None:
        out["kl_from_base"] = round(kl_from(base_lp, next_token_logprobs(lm, prompts_of(facts), bos)), 4)
    return out


def prompts_of(facts: list[Fact]) -> list[str]:
    return [p for f in facts for p in (f.prompt, *f.paraphrases)]


def retract(lg: Ledger, facts: list[Fact], batch: int, n_revert: int, n_rm: int) -> tuple[set[str], dict]:
    """On branch `retract` from HEAD: revert `n_revert` whole commits (spread over the history),
    then `rm` `n_rm` single facts whose subject is unique, and commit. The ids retracted."""
    head = lg.head()
    chain = lg.first_parent_chain(head)  # newest first
    lg.checkout("retract", create=True, start=head)
    picks = [chain[len(chain) * (k + 1) // (n_revert + 1)] for k in range(n_revert)]
    retracted: set[str] = set()
    for cid in picks:
        retracted |= {o["fact_id"] for o in lg.show(cid)["ops"] if o["op"] == "add"}
        lg.revert(cid, author=AUTHOR)
    count: dict[str, int] = {}
    for f in facts:
        count[f.subject] = count.get(f.subject, 0) + 1
    singles = [f for f in facts[::-1] if count[f.subject] == 1 and f.id not in retracted][:n_rm]
    for f in singles:
        lg.remove(f.subject)
        retracted.add(f.id)
    lg.commit(f"retract {len(singles)} single facts", author=AUTHOR)
    return retracted, {"reverted_commits": picks, "removed_single_facts": len(singles)}


def exact_check(lg: Ledger, old_head: str, retracted: set[str]) -> float:
    """(a): max over layers of the relative Frobenius difference between `apply` at the retracted
    tip and the float64 solve of old HEAD's stored rows minus the retracted facts'."""
    ed = lg.editor()
    applied, _ = ed.solve(lg.history.constraints_at(lg.head()))
    kept = [[r for r in b if r.fact_id not in retracted] for b in lg.history.constraints_at(old_head)]
    hp, c0 = ed.hparams, ed.c0()
    worst = 0.0
    with no_tf32():
        for la in hp.layers:
            rows = [r for b in kept for r in b if r.layer == la]
            K = torch.from_numpy(np.stack([r.key for r in rows])).double()
            V = torch.from_numpy(np.stack([r.value for r in rows])).double()
            W = solve_history(ed.W0[la].double(), [(K, V)], c0[la], hp.lam, "accumulated")
            worst = max(worst, rel_fro(applied[la].double(), W))
    return worst


def round_edit(lg: Ledger, back: list[Fact], batch: int) -> None:
    """Edit `back` (the retracted facts with their true object as target) on top of the weights now
    in the model, batch by batch, each batch solved against λC0 alone on the current weights."""
    ed = lg.editor()
    lm, hp, c0 = ed.lm, ed.hparams, ed.c0()
    start = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
    hp_seq = hp.with_(mode="no-history")
    done: list[dict] = []
    for i in range(0, len(back), batch):
        reqs = [EditRequest(f.prompt, f.subject, f.target_true) for f in back[i:i + batch]]
        prior = {la: [d[la] for d in done] for la in hp.layers}
        done.append(compute_constraints(lm, reqs, hp_seq, c0, start, prior))


def markdown(out: dict, command: str) -> str:
    """The section of docs/results.md for these results."""
    def row(name: str, part: dict) -> str:
        r, k = part["retracted"], part["kept"]
        kl = "" if r.get("kl_from_base") is None else f"{r['kl_from_base']:.4f}"
        return (f"| {name} | {r['efficacy']} | {r['gen_rewrite']} | {r['p_new_prompt']:.4f} | {kl} | "
                f"{k['efficacy']} | {k['generalization']} | {k['specificity']} | {k['gen_rewrite']} |")

    lines = [f"## Exact retraction against RoundEdit ({out['n']} sequential edits)", "",
             f"```\n{command}\n```", "",
             f"{out['n']} CounterFact train records (positions {out['start']}–{out['start'] + out['n'] - 1}) committed "
             f"in {out['commits']} commits of {out['batch']} on the default model "
             f"({out['committed_with_conflicts']} committed with `--allow-conflicts`), then {out['retracted']} retracted "
             f"on a branch: {len(out['reverted_commits'])} whole commits with `kledger revert` and "
             f"{out['removed_single_facts']} single facts with `kledger rm` and one commit. RoundEdit instead edits each "
             f"of the same facts back to its true object on top of the edited weights (batches of {out['batch']}, "
             f"each measured against the current weights and solved against λC0 alone, as editors without a kept "
             f"history do; {out['roundedit_seconds']:.0f} s of editing). Efficacy, generalization, specificity and "
             f"generation success in percent, as `kledger eval` scores them; P(new) is the mean probability of the "
             f"new object after the prompt; KL is the mean KL divergence (nats) of the next-token distribution "
             f"after the retracted facts' prompts and paraphrases from the base model's.", "",
             "| model | retracted: efficacy | retracted: generation | retracted: P(new) | retracted: KL from base | "
             "kept: efficacy | kept: generalization | kept: specificity | kept: generation |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             row("base model", out["base"]), row(f"after {out['n']} edits", out["edited"]),
             row("exact retraction (revert + rm)", out["exactly_retracted"]), row("RoundEdit", out["roundedit"]), "",
             f"The weights `apply` gives after the retraction equal the float64 one-shot solve of the stored constraints "
             f"without the retracted facts' to a relative Frobenius difference of {out['a_rel_fro_vs_one_shot_without']:.1e} "
             f"(the weights are stored in float32).", "", reading(out)]
    return "\n".join(lines) + "\n"


def reading(out: dict) -> str:
    """What the table says, in numbers taken from it."""
    base, done, ed, rnd = (out[k]["retracted"] for k in ("base", "exactly_retracted", "edited", "roundedit"))
    n = out["retracted"]
    diff = round((done["efficacy"] - base["efficacy"]) * n / 100)
    kept_e, kept_d = out["edited"]["kept"], out["exactly_retracted"]["kept"]
    return (f"Reading it: after the exact retraction the {n} retracted facts score like the base model "
            f"(efficacy {done['efficacy']} against {base['efficacy']}: {abs(diff)} fact(s) of {n} differ; "
            f"P(new) {done['p_new_prompt']:.4f} against {base['p_new_prompt']:.4f}), and what is left of the "
            f"distance from the base model (KL {done['kl_from_base']:.2f} nats, against {ed['kl_from_base']:.2f} "
            f"edited) is the {out['kept']} kept edits' effect on the same prompts: the model is, to round-off, "
            f"the one made without those facts. RoundEdit overshoots instead: efficacy falls to {rnd['efficacy']} "
            f"(below the base model's {base['efficacy']}: the true object is now pushed harder than before any "
            f"edit) while the next-token distribution stays as far from the base model's as the edited one "
            f"(KL {rnd['kl_from_base']:.2f}); the kept facts lose "
            f"{kept_e['efficacy'] - out['roundedit']['kept']['efficacy']:.1f} points of efficacy and "
            f"{kept_e['gen_rewrite'] - out['roundedit']['kept']['gen_rewrite']:.1f} of generation success under it, "
            f"against {kept_e['efficacy'] - kept_d['efficacy']:.1f} and "
            f"{kept_e['gen_rewrite'] - kept_d['gen_rewrite']:.1f} under the exact retraction.")


def put_section(page: Path, name: str, text: str) -> None:
    """Write `text` into `page` between the markers of section `name`, replacing an earlier one,
    or at the end (bench/paper.py keeps such sections when it rewrites the page)."""
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    old = page.read_text(encoding="utf-8") if page.exists() else ""
    block = f"{begin}\n{text}{end}\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    page.write_text(new, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--revert", type=int, default=2, help="whole commits to revert")
    ap.add_argument("--rm", type=int, default=10, help="single facts to retract with rm")
    ap.add_argument("--dir", default=str(ROOT / "bench" / "out" / "retraction"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="write the results' section into this page (docs/results.md)")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="write --out from results saved with --json (runs nothing)")
    a = ap.parse_args()
    if a.render:
        out = json.loads(Path(a.render).read_text())
        command = (f"OMP_NUM_THREADS=1 python bench/retraction.py --n {out['n']} --revert {len(out['reverted_commits'])} "
                   f"--rm {out['removed_single_facts']} --json {a.render} --out {a.out}")
        put_section(Path(a.out), "retraction", markdown(out, command))
        return
    facts = records(a.n, a.start)
    d = Path(a.dir)
    lg = (Ledger.open(d, write=True) if (d / ".kledger").exists() else Ledger.init(d))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"n": a.n, "batch": a.batch, "start": a.start, **build(lg, facts, a.batch)}
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    if lg.current_branch() != "main":
        lg.checkout("main")
    if "retract" in {b["name"] for b in lg.branches()}:
        lg.delete_branch("retract")
    old_head = lg.head()
    ed = lg.editor()
    lm = ed.lm
    bos = boundary_token(lm.tokenizer, ed.hparams.bos)
    scorer = Scorer(lm.model, lm.tokenizer, bos, spec=lm.spec)
    in_force = set(lg.state(old_head))
    facts = [f for f in facts if f.id in in_force]

    retracted, how = retract(lg, facts, a.batch, a.revert, a.rm)
    gone = [f for f in facts if f.id in retracted]
    kept = [f for f in facts if f.id not in retracted]
    out.update(how, retracted=len(gone), kept=len(kept))
    out["a_rel_fro_vs_one_shot_without"] = exact_check(lg, old_head, retracted)

    model_side.load_at(lg, None)
    base_lp = next_token_logprobs(lm, prompts_of(gone), bos)
    out["base"] = {"retracted": scores(scorer, lm, gone, base_lp, bos), "kept": scores(scorer, lm, kept, None, bos)}
    model_side.load_at(lg, old_head)
    out["edited"] = {"retracted": scores(scorer, lm, gone, base_lp, bos), "kept": scores(scorer, lm, kept, None, bos)}
    model_side.load_at(lg, lg.head())
    out["exactly_retracted"] = {"retracted": scores(scorer, lm, gone, base_lp, bos),
                                   "kept": scores(scorer, lm, kept, None, bos)}
    model_side.load_at(lg, old_head)
    t = time.perf_counter()
    round_edit(lg, gone, a.batch)
    out["roundedit_seconds"] = round(time.perf_counter() - t, 1)
    out["roundedit"] = {"retracted": scores(scorer, lm, gone, base_lp, bos), "kept": scores(scorer, lm, kept, None, bos)}
    for la, W in ed.W0.items():
        set_weight(lm.model, lm.spec, la, W)
    lg.checkout("main")
    lg.close()
    text = json.dumps(out, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    if a.out:
        put_section(Path(a.out), "retraction", markdown(out, "OMP_NUM_THREADS=1 python bench/retraction.py "
                                                             + " ".join(sys.argv[1:])))
    print(text)


if __name__ == "__main__":
    main()
