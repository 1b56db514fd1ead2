"""The small version of bench/paper.py on the real default model: a handful of sequential edits per
solver mode, scored by kledger.edit.evaluate, with checks whose answers are known by construction.
Marked `real` (about a minute on 2 CPU cores)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-test.raw"
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.real
def test_paper_pipeline_small(tmp_path):
    import paper

    from kledger.edit.weights import load_model
    from kledger.settings import Settings

    lm = load_model(env=Settings.from_env())
    text = WIKI.read_text(encoding="utf-8")[:60_000]
    res = paper.run("counterfact", 4, 2, ["accumulated", "no-history"], c0_tokens=4000, ppl_tokens=256,
                    gen_tokens=8, lm=lm, corpus_text=text, log=lambda s: None)
    assert list(res["modes"]) == ["accumulated", "no-history"]
    for _mode, r in res["modes"].items():
        assert [p["edits"] for p in r["curve"]] == [2, 4]  # one point per batch
        for p in r["curve"]:
            for m in ("efficacy", "generalization", "specificity"):
                assert 0 <= p[m] <= 100 and (p[m] * 4 / 100) % 0.5 < 1e-9  # a share of 4 (or 2) records
    # the paper's identity on the real model: sequential accumulated == the one-shot stored solve
    assert res["modes"]["accumulated"]["accumulated_vs_stored_solve"] < 1e-6
    # by construction: efficacy is a share of the records, and the edits move it up from the base
    assert res["modes"]["accumulated"]["efficacy"] >= 75 and res["one_shot"]["efficacy"] >= 75
    assert res["base"]["efficacy"] <= 50
    # the model was given back unedited: the base scores are reproduced
    again = paper.run("counterfact", 4, 2, [], c0_tokens=4000, ppl_tokens=256, gen_tokens=8, lm=lm,
                      corpus_text=text, one_shot=False, log=lambda s: None)
    assert again["base"]["perplexity"] == res["base"]["perplexity"]
    # the page renders from the results
    md = paper.markdown([res], "python bench/paper.py --n 4 --batch 2", 1.0, paper.plot([res], tmp_path), tmp_path / "r.md")
    assert "| accumulated (sequential) |" in md and (tmp_path / "results-counterfact.png").stat().st_size > 0


@pytest.mark.real
def test_paper_run_goes_on_from_its_state(tmp_path):
    """A long run stopped after its first batch goes on from the saved state and ends where an
    unbroken run ends: the state is the stored constraints, and the mode's solve of them is the
    model the run had."""
    import paper

    from kledger.edit.weights import load_model
    from kledger.settings import Settings

    lm = load_model(env=Settings.from_env())
    text = WIKI.read_text(encoding="utf-8")[:60_000]
    kw = dict(c0_tokens=4000, ppl_tokens=0, gen_tokens=0, lm=lm, corpus_text=text, log=lambda s: None,
              one_shot=False, curve_at={4})
    whole = paper.run("counterfact", 4, 2, ["accumulated"], state_dir=tmp_path, **kw)["modes"]["accumulated"]
    state = next(tmp_path.glob("counterfact-accumulated-*.pt"))
    saved = torch.load(state, weights_only=False)
    assert len(saved["stored"]) == 2 and [p["edits"] for p in saved["curve"]] == [4]
    saved["stored"], saved["curve"] = saved["stored"][:1], []  # as if killed after batch 1
    torch.save(saved, state)
    resumed = paper.run("counterfact", 4, 2, ["accumulated"], state_dir=tmp_path, **kw)["modes"]["accumulated"]
    assert resumed["curve"] == whole["curve"]
    for m in ("efficacy", "generalization", "specificity"):
        assert resumed[m] == whole[m]
