"""`kledger eval`: metrics whose answers are known by construction (a bigram logit table as the
model, so every log-probability is one log-softmax entry), the n-gram entropy on hand-made
strings, the command on a ledger with a tiny random Llama (table, JSON, plot, errors), and one
real-model run marked `real`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import snapshot  # noqa: E402
from conftest_edit import VOCAB, one_thread, save_tiny_model_dir, tiny_lm, tiny_tokenizer  # noqa: E402,F401

from kledger.edit.evaluate import (  # noqa: E402
    Scorer,
    evaluate_model,
    ngram_entropy,
    record_kind,
    split_ids,
    starts_with_object,
    summarize,
)
from kledger.ledger import Ledger  # noqa: E402
from kledger.records import Fact  # noqa: E402
from kledger.settings import Settings  # noqa: E402

ID = {w: i for i, w in enumerate(VOCAB)}
BOS = ID["<|endoftext|>"]


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend on the current token only: logits[b, t] =
    table[input_ids[b, t]]. log P(b | ... a) = log_softmax(table[a])[b]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

        self.sequences = 0  # how many sequences it was run on

    def forward(self, input_ids, attention_mask=None, **_):
        self.sequences += input_ids.shape[0]
        return SimpleNamespace(logits=self.table[input_ids])


def bigram_table(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 64, generator=g)


def lp(table: torch.Tensor, a: str, b: str) -> float:
    """log P(b | a) by hand: table[a, b] − log Σ_j exp(table[a, j])."""
    row = table[ID[a]].double()
    return float(row[ID[b]] - torch.logsumexp(row, 0))


def mean_lp(table, prompt: str, target: str) -> float:
    """Per-token mean log-probability of target's words after the prompt's last word."""
    words = [prompt.split()[-1]] + target.split()
    return sum(lp(table, a, b) for a, b in zip(words, words[1:])) / (len(words) - 1)


def scorer(table: torch.Tensor, batch_size: int = 4) -> Scorer:
    return Scorer(Bigram(table), tiny_tokenizer(), BOS, batch_size=batch_size)


CF = Fact.create("the Eiffel Tower is located in", "Big Ben", subject="Eiffel Tower", target_true="Paris",
                 paraphrases=["the Eiffel Tower can be found in the city of", "Eiffel Tower , it is in"],
                 neighborhood=["the Louvre is located in", "the Colosseum can be found in the city of"])
ZSRE = Fact.create("where is the Eiffel Tower located", "Rome", subject="Eiffel Tower", target_true="Paris",
                   paraphrases=["where can the Eiffel Tower be found"], neighborhood=["what city is the Louvre in"],
                   extra={"loc_ans": "Paris France", "pred": "Paris", "cond": "Paris >> Rome || ..."})
PLAIN = Fact.create("Toko Yasuda plays the", "piano", subject="Toko Yasuda",
                    paraphrases=["Toko Yasuda can be found in the city of"])


# ------------------------------------------------------------------ known by construction

def test_record_kinds():
    assert [record_kind(f) for f in (CF, ZSRE, PLAIN)] == ["counterfact", "zsre", "other"]


def test_split_ids_continues_the_prompt_after_a_space():
    tok = tiny_tokenizer()
    ctx, tgt = split_ids(tok, "the Eiffel Tower is located in ", " Big Ben", BOS)
    assert ctx == [BOS] + [ID[w] for w in "the Eiffel Tower is located in".split()]
    assert tgt == [ID["Big"], ID["Ben"]]


def test_scores_are_the_bigram_log_probabilities():
    table = bigram_table()
    s = scorer(table, batch_size=2)
    pairs = [("the Eiffel Tower is located in", "Big Ben"), ("the capital of France is", "Rome"),
             ("a", "Paris London Berlin"), ("the Eiffel Tower is located in", "Paris"),
             ("the capital of France is", "Paris"), ("the Eiffel Tower is located in", "Big Ben")]
    got = s.score(pairs)
    for prompt, target in pairs:
        words = [prompt.split()[-1]] + target.split()
        want = [lp(table, a, b) for a, b in zip(words, words[1:])]
        assert got[(prompt, target)].logprobs == pytest.approx(want, abs=1e-5)
        assert got[(prompt, target)].prob == pytest.approx(math.exp(sum(want) / len(want)), rel=1e-5)
        want_hit = [int(table[ID[a]].argmax()) == ID[b] for a, b in zip(words, words[1:])]
        assert list(got[(prompt, target)].correct) == want_hit
    # one-token objects share their prompt's sequence: 3 sequences, not 6 (or 5 distinct pairs)
    assert s.model.sequences == 3


def test_counterfact_metrics_by_hand():
    table = bigram_table(1)
    # decide the comparisons: after "in" the new object wins; after "of" the true one does
    for a, new, true in (("in", 3.0, -3.0), ("of", -3.0, 3.0)):
        table[ID[a], ID["Big"]] = new
        table[ID[a], ID["Paris"]] = true
    res = evaluate_model(scorer(table), [CF])
    m = res["per_record"][0]
    assert m["efficacy"] == 1.0  # prompt ends in "in"
    assert m["generalization"] == 0.5  # one paraphrase ends in "of", one in "in"
    assert m["specificity"] == 0.5  # neighbourhood: "in" → new wins (0), "of" → true wins (1)
    assert m["p_new_prompt"] == pytest.approx(math.exp(mean_lp(table, CF.prompt, "Big Ben")), rel=1e-5)
    assert m["p_new_paraphrase"] == pytest.approx(
        (math.exp(mean_lp(table, "x of", "Big Ben")) + math.exp(mean_lp(table, "x in", "Big Ben"))) / 2, rel=1e-5)
    assert m["p_true_neighborhood"] == pytest.approx(
        (math.exp(lp(table, "in", "Paris")) + math.exp(lp(table, "of", "Paris"))) / 2, rel=1e-5)
    g = res["metrics"]["counterfact"]
    assert g["n"] == 1 and g["efficacy"] == 1.0 and g["n_paraphrase"] == 1 and g["n_neighborhood"] == 1
    assert res["metrics"]["perplexity"] is None and res["metrics"]["fluency"] is None


def test_efficacy_compares_per_token_means_not_sums():
    """A two-token object with a higher mean but a lower sum than a one-token object wins."""
    table = torch.zeros(64, 64)
    table[ID["in"], ID["Big"]] = 4.0  # P(Big | in) high
    table[ID["Big"], ID["Ben"]] = 4.0
    table[ID["in"], ID["Paris"]] = 3.5
    new_sum = lp(table, "in", "Big") + lp(table, "Big", "Ben")
    true_sum = lp(table, "in", "Paris")
    assert new_sum < true_sum < new_sum / 2  # sums say Paris, means say Big Ben
    f = Fact.create("the Louvre is located in", "Big Ben", subject="Louvre", target_true="Paris")
    assert evaluate_model(scorer(table), [f])["per_record"][0]["efficacy"] == 1.0


def test_zsre_token_accuracy_by_hand():
    table = torch.zeros(64, 64)
    table[ID["located"], ID["Rome"]] = 5.0  # question → new answer: argmax, 1/1
    table[ID["found"], ID["London"]] = 5.0  # rephrase → another token: 0/1
    # unrelated question ends in "in" then "?" (MEMIT adds it; <unk> here): "Paris" right, "France" wrong
    table[ID["<unk>"], ID["Paris"]] = 5.0
    table[ID["Paris"], ID["Germany"]] = 5.0
    res = evaluate_model(scorer(table), [ZSRE])
    # greedy: "... located" → "Rome" (a success), the rephrase → "London", the unrelated question
    # → "Paris Germany", which does not start with "Paris France"
    assert res["per_record"][0] == {"rewrite_acc": 1.0, "paraphrase_acc": 0.0, "neighborhood_acc": 0.5,
                                    "gen_rewrite": 1.0, "gen_paraphrase": 0.0, "gen_neighborhood": 0.0}
    assert res["metrics"]["zsre"] == {"n": 1, "rewrite_acc": 1.0, "paraphrase_acc": 0.0,
                                      "neighborhood_acc": 0.5, "gen_rewrite": 1.0, "gen_paraphrase": 0.0,
                                      "gen_neighborhood": 0.0, "n_paraphrase": 1, "n_neighborhood": 1}
    no_greedy = evaluate_model(scorer(table), [ZSRE], greedy=False)
    assert no_greedy["per_record"][0] == {"rewrite_acc": 1.0, "paraphrase_acc": 0.0, "neighborhood_acc": 0.5}
    assert no_greedy["metrics"]["zsre"]["gen_rewrite"] is None


def test_generation_success_by_hand():
    """Teacher forcing and generation disagree where the first token is right but the greedy
    path then leaves the object: after "in" the model says "Big" then "Paris", so "Big Ben" wins
    efficacy (its per-token mean beats "Paris") but the user sees "Big Paris"."""
    table = torch.zeros(64, 64)
    table[ID["in"], ID["Big"]] = 6.0
    table[ID["Big"], ID["Paris"]] = 3.0  # the greedy path after "Big"
    table[ID["Big"], ID["Ben"]] = 2.5  # "Ben" is second: teacher forcing still gives it a high probability
    table[ID["of"], ID["Paris"]] = 6.0  # paraphrase and neighbourhood prompts ending in "of" → "Paris"
    res = evaluate_model(scorer(table), [CF])
    m = res["per_record"][0]
    assert m["efficacy"] == 1.0 and m["gen_rewrite"] == 0.0
    assert m["gen_paraphrase"] == 0.0  # "... of" → "Paris", "... in" → "Big Paris": neither is "Big Ben"
    assert m["gen_neighborhood"] == 0.5  # "... in" → "Big Paris" (lost), "... of" → "Paris" (kept)
    table[ID["Big"], ID["Ben"]] = 4.0  # now the greedy path says "Big Ben"
    m = evaluate_model(scorer(table), [CF])["per_record"][0]
    assert m["gen_rewrite"] == 1.0 and m["gen_paraphrase"] == 0.5


@pytest.mark.parametrize("text,obj,want", [
    (" Rome is", "Rome", True), ("\n rome", "Rome", True), (" Rome", "Rome", True), (" Romeo and", "Rome", False),
    (" Rome-based", "Rome", True), (" the Rome", "Rome", False), (" New York City", "New York", True),
    ("", "Rome", False), (" x", "", False)])
def test_starts_with_object(text, obj, want):
    assert starts_with_object(text, obj) is want


def test_greedy_continuations_match_generate():
    """The scorer's step-by-step greedy decoding (right padding, any batch; the path of LMs without
    `generate`) and its KV-cached path through transformers' generate give the same tokens, which
    are those transformers' generate gives one prompt at a time."""
    lm = tiny_lm("llama", seed=1)
    wants = {CF.prompt: 4, "a": 6, PLAIN.prompt: 3}

    class NoGenerate(torch.nn.Module):  # the same model, seen as a plain causal LM
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a, **k):
            return self.m(*a, **k)

    stepwise = Scorer(NoGenerate(lm.model), lm.tokenizer, BOS, batch_size=2).greedy(wants)
    cached = Scorer(lm.model, lm.tokenizer, BOS, batch_size=2, spec=lm.spec).greedy(wants)
    assert stepwise == cached
    for p, n in wants.items():
        full = Scorer(lm.model, lm.tokenizer, BOS, batch_size=1).generate([p], n)[p]
        assert cached[p] and full.endswith(cached[p])


def test_other_facts_get_accuracy_and_probability():
    table = bigram_table(2)
    table[ID["the"], ID["piano"]] = 9.0
    m = evaluate_model(scorer(table), [PLAIN])["per_record"][0]
    assert m["rewrite_acc"] == 1.0
    assert m["p_new_prompt"] == pytest.approx(math.exp(lp(table, "the", "piano")), rel=1e-5)
    assert m["p_new_paraphrase"] == pytest.approx(math.exp(lp(table, "of", "piano")), rel=1e-5)
    assert m["paraphrase_acc"] == float(int(table[ID["of"]].argmax()) == ID["piano"])


def test_summary_averages_records_and_skips_missing_prompts():
    per = [{"efficacy": 1.0, "generalization": 0.5, "specificity": None, "p_new_prompt": 0.2,
            "p_new_paraphrase": 0.1, "p_true_neighborhood": None},
           {"efficacy": 0.0, "generalization": None, "specificity": 1.0, "p_new_prompt": 0.4,
            "p_new_paraphrase": None, "p_true_neighborhood": 0.3},
           {"rewrite_acc": 0.25, "paraphrase_acc": None, "neighborhood_acc": 1.0}]
    s = summarize(["counterfact", "counterfact", "zsre"], per)
    assert s["counterfact"] == {"n": 2, "efficacy": 0.5, "generalization": 0.5, "specificity": 1.0,
                                "p_new_prompt": pytest.approx(0.3), "p_new_paraphrase": 0.1,
                                "p_true_neighborhood": 0.3, "gen_rewrite": None, "gen_paraphrase": None,
                                "gen_neighborhood": None, "n_paraphrase": 1, "n_neighborhood": 1}
    assert s["zsre"]["paraphrase_acc"] is None and s["zsre"]["n_paraphrase"] == 0
    assert "other" not in s


def test_perplexity_by_hand():
    table = bigram_table(3)
    words = "the Eiffel Tower is located in the city of Paris".split()  # 10 tokens
    ids = [ID[w] for w in words]
    got = scorer(table).perplexity(ids, window=4)  # windows of 4, 4, 2; each after the boundary token
    nll, n = 0.0, 0
    for i in range(0, len(words), 4):
        w = ["<|endoftext|>"] + words[i:i + 4]
        nll -= sum(lp(table, a, b) for a, b in zip(w, w[1:]))
        n += len(w) - 1
    assert got["tokens"] == n == 10 and got["windows"] == 3
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_batching_and_padding_do_not_change_scores():
    """On a real (tiny) transformer: scores in a padded batch equal scores one at a time, and the
    LM-head-on-scored-positions path equals the full-logits path."""
    lm = tiny_lm("llama")
    pairs = [(CF.prompt, "Big Ben"), (CF.prompt, "Paris"), ("a", "Rome"), (CF.paraphrases[0], "Paris London")]
    batched = Scorer(lm.model, lm.tokenizer, BOS, batch_size=4, spec=lm.spec).score(pairs)
    full = Scorer(lm.model, lm.tokenizer, BOS, batch_size=4).score(pairs)
    for p in pairs:
        alone = Scorer(lm.model, lm.tokenizer, BOS, batch_size=1).score([p])[p]
        assert batched[p].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert full[p].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert batched[p].correct == alone.correct


def test_batched_greedy_generation_equals_one_at_a_time():
    lm = tiny_lm("llama", seed=1)
    prompts = [CF.prompt, "a", PLAIN.prompt]
    together = Scorer(lm.model, lm.tokenizer, BOS, batch_size=3).generate(prompts, 6)
    for p in prompts:
        assert together[p] == Scorer(lm.model, lm.tokenizer, BOS, batch_size=1).generate([p], 6)[p]
        assert together[p].startswith(p)
    assert together[CF.prompt] != CF.prompt  # it continued (this random model says words after it)


def test_ngram_entropy_on_hand_made_strings():
    h = lambda ps: -sum(p * math.log2(p) for p in ps)  # noqa: E731
    # "a b a b": bigrams ab ×2, ba ×1; trigrams aba, bab
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h([2 / 3, 1 / 3]) + 4 / 3 * 1.0) / 2)
    # all distinct: 4 bigrams (2 bits), 3 trigrams (log2 3 bits)
    assert ngram_entropy("one two three four five") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    # punctuation marks are words: "x, y." is x , y .
    assert ngram_entropy("x, y.") == ngram_entropy("x , y .")
    # repetition is what the metric punishes
    assert ngram_entropy("the the the the the the") == 0.0
    assert ngram_entropy("") == 0.0 and ngram_entropy("word") == 0.0


# ------------------------------------------------------------------ the command, on a tiny ledger

FACTS = [
    Fact.create("the Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower", target_true="Paris",
                paraphrases=["the Eiffel Tower can be found in the city of"],
                neighborhood=["the Louvre is located in the city of"]),
    Fact.create("the Colosseum is located in the city of", "London", subject="Colosseum", target_true="Rome",
                paraphrases=["the Colosseum can be found in"], neighborhood=["Big Ben is located in the city of"],
                extra={"locality_ground_truth": "London"}),
    Fact.create("Danielle Darrieux speaks the language", "English", subject="Danielle Darrieux",
                target_true="French", extra={"case_id": 0}),
    Fact.create("what is the capital of Spain", "Berlin", subject="Spain", target_true="Madrid",
                paraphrases=["where is the capital of Spain"], neighborhood=["who plays the piano"],
                extra={"loc_ans": "Toko Yasuda", "cond": "Madrid >> Berlin"}),
    Fact.create("Toko Yasuda plays the", "guitar", subject="Toko Yasuda"),
]
SETTINGS = {"hparams": {"c0_tokens": 1200, "c0_seq_len": 64, "steps": 6, "n_prefixes": 2, "lam": 5.0}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-eval"))


@pytest.fixture(scope="module")
def ledger(model_dir, tmp_path_factory):
    """Two commits: three facts, then two."""
    root = tmp_path_factory.mktemp("eval-ledger")
    lg = Ledger.init(root, model=str(model_dir), settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    lg.add(FACTS[:3])
    first = lg.commit("three facts", author="t")
    lg.add(FACTS[3:])
    second = lg.commit("two more", author="t")
    lg.close()
    return SimpleNamespace(dir=root / ".kledger", commits=[first, second])


FAST = ("--ppl-tokens", "200", "--gen-tokens", "4")


def test_eval_json_shape_and_base_column(k, ledger, model_dir):
    before = snapshot(ledger.dir)
    r = k("-C", ledger.dir, "eval", "--json", *FAST)
    assert r.code == 0, r.err
    doc = r.json
    assert doc["version"] == 1 and doc["command"] == "eval"
    assert doc["revision"] == ledger.commits[1] and doc["mode"] == "accumulated"
    assert doc["data"] == {"source": "ledger", "path": None, "records": 5, "counterfact": 3, "zsre": 1, "other": 1}
    for side in ("base", "edited"):
        m = doc[side]
        assert set(m) == {"counterfact", "zsre", "other", "perplexity", "fluency"}
        assert m["counterfact"]["n"] == 3 and m["zsre"]["n"] == 1 and m["other"]["n"] == 1
        for kind in ("counterfact", "zsre", "other"):
            for name, v in m[kind].items():
                if not name.startswith("n") and v is not None:
                    assert 0.0 <= v <= 1.0, (side, kind, name, v)
        assert m["perplexity"] > 1 and m["fluency"] >= 0
    assert doc["text"] == {"source": "ledger-corpus", "path": str(model_dir / "corpus.txt"), "offset": 1200,
                           "held_out": True, "tokens": 200, "window": 256}
    assert doc["generation"] == {"tokens": 4, "greedy": True}
    assert [r["fact_id"] for r in doc["records"]] == [f.id for f in FACTS]
    assert doc["records"][0]["kind"] == "counterfact" and set(doc["records"][0]["edited"]) >= {"efficacy", "fluency"}
    assert doc["seconds_per_record"] > 0 and doc["seconds"]["total"] > 0
    assert "history" not in doc and "plot" not in doc
    assert snapshot(ledger.dir) == before  # nothing written to the ledger (the apply cache is a file)

    # the base column is the base model: score it independently, from the saved model directory
    from kledger.edit.weights import load_model

    lm = load_model(str(model_dir), env=Settings.from_env())
    ids = lm.tokenizer(" ".join((model_dir / "corpus.txt").read_text().split()), add_special_tokens=False).input_ids
    fresh = evaluate_model(Scorer(lm.model, lm.tokenizer, BOS), FACTS, ppl_ids=ids[1200:1400], gen_tokens=4)
    assert fresh["metrics"]["perplexity"] == pytest.approx(doc["base"]["perplexity"], rel=1e-5)
    for kind in ("counterfact", "zsre", "other"):
        for name, v in fresh["metrics"][kind].items():
            assert v == pytest.approx(doc["base"][kind][name], abs=1e-6), (kind, name)
    assert doc["edited"]["counterfact"]["p_new_prompt"] != pytest.approx(doc["base"]["counterfact"]["p_new_prompt"])


def test_eval_table(k, ledger):
    r = k("-C", ledger.dir, "eval", "HEAD~1", *FAST)
    assert r.code == 0, r.err
    for word in ("CounterFact (3)", "efficacy", "generalization", "specificity", "p_true_neighborhood",
                 "perplexity", "fluency", "base", f"at {ledger.commits[0][:10]}"):
        assert word in r.out, word
    assert "ZsRE" not in r.out  # HEAD~1 has the CounterFact facts only
    assert "held out from C0" in r.err and "s per record" in r.err


def test_eval_data_file_and_options(k, ledger, tmp_path):
    from kledger.formats import write_facts

    data = tmp_path / "records.json"
    write_facts(data, FACTS[:2], "easyedit")
    r = k("-C", ledger.dir, "eval", "--data", data, "--no-fluency", "--ppl-tokens", "0", "--json", "--limit", "1")
    assert r.code == 0, r.err
    doc = r.json
    assert doc["data"]["source"] == "file" and doc["data"]["records"] == 1 and doc["data"]["counterfact"] == 1
    assert doc["text"] is None and doc["generation"] is None
    assert doc["edited"]["perplexity"] is None and doc["edited"]["fluency"] is None
    assert set(doc["edited"]) == {"counterfact", "perplexity", "fluency"}
    # the default text when the ledger's corpus is too short to hold out 2048 tokens: its start
    r = k("-C", ledger.dir, "eval", "--data", data, "--no-fluency", "--json", "--mode", "no-history")
    assert r.code == 0, r.err
    assert r.json["text"]["held_out"] is False and r.json["text"]["offset"] == 0 and r.json["mode"] == "no-history"
    txt = tmp_path / "held-out.txt"
    txt.write_text("the city of Paris is the capital of France . " * 20)
    r = k("-C", ledger.dir, "eval", "--data", data, "--no-fluency", "--json", "--text", txt)
    assert r.code == 0 and r.json["text"]["source"] == "file" and r.json["text"]["held_out"] is None


def test_eval_plot_history(k, ledger, tmp_path):
    png = tmp_path / "history.png"
    r = k("-C", ledger.dir, "eval", "--json", "--plot", png, *FAST)
    assert r.code == 0, r.err
    doc = r.json
    assert doc["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = doc["history"]
    assert [p["commit"] for p in hist] == [None] + ledger.commits
    assert [p["records"] for p in hist] == [5, 3, 5]
    assert hist[0]["metrics"] == doc["base"] and hist[-1]["metrics"] == doc["edited"]
    assert set(hist[1]["metrics"]) == {"counterfact", "perplexity", "fluency"}
    r = k("-C", ledger.dir, "eval", "--plot", tmp_path / "t.png", "--no-fluency", "--ppl-tokens", "0")
    assert r.code == 0 and "wrote" in r.err and (tmp_path / "t.png").is_file()

    # the same document, plotted along the history by `kledger report --eval`
    (tmp_path / "eval.json").write_text(json.dumps(doc))
    r = k("-C", ledger.dir, "report", "--html", tmp_path / "r.html", "--eval", tmp_path / "eval.json", "--json")
    assert r.code == 0 and r.json["metric_points"] == 3, r.err
    page = (tmp_path / "r.html").read_text()
    data = json.loads(re.search(r'id="kledger-data">(.*?)</script>', page, re.S).group(1))
    series = {s["name"]: s["ys"] for s in data["metrics"]["series"]}
    assert series["CounterFact efficacy"] == [p["metrics"]["counterfact"]["efficacy"] for p in hist]
    assert series["perplexity"] == [p["metrics"]["perplexity"] for p in hist]
    assert 'id="metrics-rates"' in page and 'id="metrics-perplexity"' in page


def test_eval_limit_and_a_revision_with_no_facts(k, model_dir, tmp_path):
    lg = Ledger.init(tmp_path / "l", model=str(model_dir),
                     settings={**SETTINGS, "corpus": str(model_dir / "corpus.txt")})
    lg.add(FACTS[:2])
    lg.commit("two", author="t")
    lg.remove("Eiffel Tower")
    lg.remove("Colosseum")
    lg.commit("none left", author="t")
    lg.close()
    ldir = tmp_path / "l" / ".kledger"
    r = k("-C", ldir, "eval", "HEAD~1", "--limit", "1", "--json", *FAST)
    assert r.code == 0, r.err
    assert r.json["data"]["records"] == 1 and [x["subject"] for x in r.json["records"]] == ["Eiffel Tower"]
    r = k("-C", ldir, "eval", "--json", *FAST)  # nothing in force: only general ability
    assert r.code == 0, r.err
    doc = r.json
    assert doc["data"]["records"] == 0 and doc["records"] == [] and doc["seconds_per_record"] is None
    assert set(doc["edited"]) == {"perplexity", "fluency"} and doc["edited"]["fluency"] is None
    assert doc["edited"]["perplexity"] == pytest.approx(doc["base"]["perplexity"], rel=1e-6)
    r = k("-C", ldir, "eval", *FAST)
    assert r.code == 0 and "0 record(s)" in r.out and "perplexity" in r.out


@pytest.mark.parametrize("args, code, kind", [
    (("nope",), 2, "revision"),
    (("--mode", "nope"), 2, "usage"),
    (("--format", "csv"), 2, "usage"),
    (("--data", "missing.json"), 2, "input"),
    (("--text", "missing.txt"), 2, "input"),
    (("--plot", "no/such/dir/x.png", "--no-fluency", "--ppl-tokens", "0"), 2, "input"),
])
def test_eval_errors_are_one_line(k, ledger, args, code, kind):
    r = k("-C", ledger.dir, "eval", "--json", *args)
    assert r.code == code, r.err
    assert r.err.startswith("error:") and len(r.err.strip().splitlines()) == 1
    assert json.loads(r.out)["error"]["kind"] == kind


def test_eval_needs_a_model(k):
    assert k("init", "--model", "none").code == 0
    k("add", "the Eiffel Tower is located in", "Rome", "--subject", "Eiffel Tower")
    assert k("commit", "-m", "x").code == 0
    r = k("eval", "--json")
    assert r.code == 1 and r.json["error"]["kind"] == "state"


# ------------------------------------------------------------------ the real model

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-test.raw"
CF_DATA = WIKI.parent / "counterfact-train.json"


@pytest.mark.real
@pytest.mark.skipif(not CF_DATA.is_file(), reason="shared data not found")
def test_real_eval_after_two_counterfact_edits(k, tmp_path):
    """About 30 s on one thread: C0 on 2,000 WikiText tokens and 2 prefix contexts keep the
    commit short. One thread: on a busy 2-core machine two threads made generation 10x slower."""
    from kledger.formats import read_facts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _real_eval(k, tmp_path, read_facts(CF_DATA, limit=2))
    finally:
        torch.set_num_threads(threads)


def _real_eval(k, tmp_path, facts):
    lg = Ledger.init(tmp_path, model="smollm2-135m",
                     settings={"corpus": str(WIKI), "hparams": {"c0_tokens": 2000, "n_prefixes": 2}})
    lg.add(facts)
    lg.commit("two CounterFact edits", author="t")
    lg.close()
    r = k("eval", "--json", "--ppl-tokens", "512", "--gen-tokens", "8")
    assert r.code == 0, r.err
    doc = r.json
    assert doc["data"]["counterfact"] == 2
    assert doc["edited"]["counterfact"]["efficacy"] == 1.0
    # what the user sees: the base model says neither new object; the edited model says both
    assert doc["base"]["counterfact"]["gen_rewrite"] == 0.0 and doc["edited"]["counterfact"]["gen_rewrite"] == 1.0
    assert doc["text"]["held_out"] is True and doc["text"]["offset"] == 2000
    # the base column is the unedited model: the same numbers from a fresh load
    from kledger.edit.hooks import boundary_token
    from kledger.edit.weights import load_model

    lm = load_model(env=Settings.from_env())
    fresh = evaluate_model(Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, "auto")), facts)
    for name, v in fresh["metrics"]["counterfact"].items():
        assert v == pytest.approx(doc["base"]["counterfact"][name], abs=1e-5), name
    assert doc["base"]["counterfact"]["p_new_prompt"] < doc["edited"]["counterfact"]["p_new_prompt"]
    assert doc["edited"]["perplexity"] == pytest.approx(doc["base"]["perplexity"], rel=0.05)
