"""The small version of the edit-quality and retraction benchmarks (bench/sweep.py,
bench/retraction.py) on the real default model, so their numbers cannot silently rot: 20
CounterFact records committed in two commits of 10 with the default hyper-parameters, scored by
the code behind `kledger eval` (teacher-forced and generation success), then one commit reverted
and one fact removed, and the retraction checked for exactness. Marked `real` (a few minutes on 2
CPU cores). Thresholds are below what this measured here (docs/editing.md), with room for one or
two records of 20 to move."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-test.raw"
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.real
def test_sequential_edits_and_exact_retraction_small(tmp_path):
    import retraction
    import sweep

    from kledger import model_side
    from kledger.edit.evaluate import Scorer
    from kledger.edit.hooks import boundary_token
    from kledger.ledger import Ledger

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        facts = sweep.records(20)
        lg = Ledger.init(tmp_path, settings={"corpus": str(WIKI), "hparams": {"c0_tokens": 20_000}})
        built = retraction.build(lg, facts, 10)
        assert built["commits"] == 2
        old_head = lg.head()
        ed = lg.editor()
        lm = ed.lm
        bos = boundary_token(lm.tokenizer, ed.hparams.bos)
        scorer = Scorer(lm.model, lm.tokenizer, bos, spec=lm.spec)
        model_side.load_at(lg, None)
        base = retraction.scores(scorer, lm, facts, None, bos)
        model_side.load_at(lg, old_head)
        edited = retraction.scores(scorer, lm, facts, None, bos)
        assert edited["efficacy"] >= 90 and edited["gen_rewrite"] >= 70, edited
        assert edited["generalization"] >= 60 and edited["specificity"] >= base["specificity"] - 15, (base, edited)

        retracted, how = retraction.retract(lg, facts, 10, 1, 1)
        assert len(retracted) == 11 and how["removed_single_facts"] == 1
        # (a) apply after revert + rm is the one-shot solve of the rest of the stored rows
        assert retraction.exact_check(lg, old_head, retracted) < 1e-6
        gone = [f for f in facts if f.id in retracted]
        kept = [f for f in facts if f.id not in retracted]
        model_side.load_at(lg, None)
        base_lp = retraction.next_token_logprobs(lm, retraction.prompts_of(gone), bos)
        base_gone = retraction.scores(scorer, lm, gone, base_lp, bos)
        model_side.load_at(lg, old_head)
        before = retraction.scores(scorer, lm, gone, base_lp, bos)
        model_side.load_at(lg, lg.head())
        after = retraction.scores(scorer, lm, gone, base_lp, bos)
        after_kept = retraction.scores(scorer, lm, kept, None, bos)
        # (b) the retracted facts' answers are the base model's again
        assert after["kl_from_base"] < 0.05 < before["kl_from_base"], (before, after)
        assert after["gen_rewrite"] <= base_gone["gen_rewrite"] + 10, (base_gone, after)
        assert after["efficacy"] <= base_gone["efficacy"] + 10, (base_gone, after)
        # (c) the kept facts keep their edits
        assert after_kept["efficacy"] >= 85, after_kept
    finally:
        torch.set_num_threads(threads)
