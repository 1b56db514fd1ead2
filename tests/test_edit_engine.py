"""Keys, values and the end-to-end equivalence claim on a tiny random Llama (no download):
sequential commits against the weights left by the previous ones equal one solve over all stored
constraints; retracting a commit is the solve without it; batched value optimisation matches
one fact at a time."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_edit import one_thread, tiny_lm, word_corpus  # noqa: E402,F401
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kledger.edit.engine import EditRequest, compute_constraints, context_prefixes, optimise_values, tokenize_request  # noqa: E402
from kledger.edit.hooks import boundary_token  # noqa: E402
from kledger.edit.hparams import HParams  # noqa: E402
from kledger.edit.solve import rel_fro, solve_history, solve_layer  # noqa: E402
from kledger.edit.spec import get_weight, set_weight  # noqa: E402
from kledger.edit.stats import compute_c0, corpus_fingerprint  # noqa: E402
from kledger.errors import InputError  # noqa: E402

HP = HParams(layers=(1, 2), lam=5.0, steps=8, lr=0.5, n_prefixes=2, early_stop_prob=0.99)

FACTS = [
    EditRequest("the Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
    EditRequest("the Louvre is located in the city of", "Louvre", "Berlin"),
    EditRequest("the Colosseum is located in the city of", "Colosseum", "London"),
    EditRequest("Big Ben is located in the city of", "Big Ben", "Madrid"),
    EditRequest("Danielle Darrieux speaks the language", "Danielle Darrieux", "English"),
    EditRequest("Toko Yasuda plays the", "Toko Yasuda", "guitar"),
    EditRequest("the capital of France is", "France", "Rome"),
    EditRequest("the capital of Italy is", "Italy", "Paris"),
    EditRequest("the capital of Germany is", "Germany", "Madrid"),
    EditRequest("the capital of Spain is", "Spain", "Berlin"),
]

# subjects at the end and in the middle, a two-token target: the cut layouts' cases
CUT_FACTS = [EditRequest("located in the Eiffel Tower", "Eiffel Tower", "Rome"),
             EditRequest("the Louvre is located in the city of", "Louvre", "Berlin"),
             EditRequest("the capital of France", "France", "London Paris"),
             EditRequest("Toko Yasuda plays the", "Toko Yasuda", "guitar")]


def corpus(n_words: int = 1500) -> str:
    return word_corpus(n_words)


def setup(dtype=torch.float64):
    lm = tiny_lm("llama")
    lm.model.to(dtype)
    c0, n = compute_c0(lm, HP.layers, corpus(), n_tokens=1200, seq_len=64)
    assert n > 1000 and all(c.dtype == torch.float64 and c.shape == (48, 48) for c in c0.values())
    return lm, c0, {la: get_weight(lm.model, lm.spec, la).double() for la in HP.layers}  # W0


def test_sequential_commits_equal_one_solve_and_retraction():
    lm, c0, W0 = setup()
    stored: list[dict] = []  # one {layer: (K, V)} per commit
    for t in range(5):
        prior = {la: [c[la] for c in stored] for la in HP.layers}
        new = compute_constraints(lm, FACTS[2 * t:2 * t + 2], HP, c0, W0, prior)
        assert set(new) == set(HP.layers)
        for K, V in new.values():
            assert K.shape == (2, 48) and V.shape == (2, 32)
        stored.append(new)
    all_c = {la: [c[la] for c in stored] for la in HP.layers}
    one_shot = {la: solve_history(W0[la], all_c[la], c0[la], HP.lam) for la in HP.layers}
    for la in HP.layers:
        assert rel_fro(get_weight(lm.model, lm.spec, la), one_shot[la]) < 1e-9
    # retract commit 3: the solve without its constraints, from the stored pairs only
    kept = {la: [c[la] for i, c in enumerate(stored) if i != 2] for la in HP.layers}
    without = {la: solve_history(W0[la], kept[la], c0[la], HP.lam) for la in HP.layers}
    for la in HP.layers:
        K = torch.cat([k for k, _ in kept[la]])
        V = torch.cat([v for _, v in kept[la]])
        assert rel_fro(without[la], solve_layer(W0[la], K, V, c0[la], HP.lam)) < 1e-12
        assert rel_fro(without[la], one_shot[la]) > 1e-6
    for la, W in without.items():
        set_weight(lm.model, lm.spec, la, W)
    # no constraints at all gives back the base weights
    base = {la: solve_history(W0[la], [], c0[la], HP.lam) for la in HP.layers}
    assert all(torch.equal(base[la], W0[la]) for la in HP.layers)


@pytest.mark.parametrize("step_norm", [0.0, 0.3])
def test_batched_values_match_one_at_a_time(step_norm):
    """Adam's steps and plain gradient steps of a set length (`step_norm`) alike."""
    lm, _, _ = setup(torch.float32)
    # subjects at the end of the prompt, so that facts reach the threshold at different steps and
    # leave the batch one by one
    reqs = [EditRequest("located in the Eiffel Tower", "Eiffel Tower", "Rome"),
            EditRequest("the city of Louvre", "Louvre", "Berlin"),
            EditRequest("the capital of France", "France", "London"),
            EditRequest("Big Ben", "Big Ben", "Madrid")]
    hp = HP.with_(steps=12, lr=0.5, clamp=4.0, early_stop_prob=0.2, step_norm=step_norm)
    tok = lm.tokenizer
    bos = boundary_token(tok, hp.bos)
    toks = [tokenize_request(tok, r, context_prefixes(hp), bos) for r in reqs]
    z_batch, info = optimise_values(lm, toks, hp)
    assert z_batch.shape == (4, 32) and len(info["target_prob"]) == 4
    assert len(set(info["steps"])) > 1  # facts froze at different steps
    for i in range(4):
        z_one, info_one = optimise_values(lm, toks[i:i + 1], hp)
        assert info_one["steps"][0] == info["steps"][i]
        assert torch.allclose(z_one[0], z_batch[i], rtol=1e-4, atol=1e-4)


def test_a_gradient_step_has_the_set_length_and_raises_the_target():
    """With step_norm, the first step moves δ by step_norm × ‖h‖ (the clamp far away), downhill:
    the target's probability rises with a small step, δ points the same way whatever the length,
    and it is the gradient's direction, not Adam's first step (lr × the gradient's sign): the same
    sign in every coordinate, another direction."""
    lm = tiny_lm("llama")
    tok = lm.tokenizer
    toks = [tokenize_request(tok, r, context_prefixes(HP), boundary_token(tok, HP.bos)) for r in FACTS[:3]]
    got = {}
    for sn in (1e-4, 0.05, 0.2):
        z, info = optimise_values(lm, toks, HP.with_(steps=1, clamp=4.0, early_stop_prob=0.9999, step_norm=sn))
        assert info["steps"] == [1, 1, 1]
        assert info["delta_norm_ratio"] == pytest.approx([sn] * 3, rel=1e-4)
        got[sn] = (z, info["target_prob"])
    h0, base = optimise_values(lm, toks, HP.with_(steps=1, early_stop_prob=0.0))  # stops at step 0: δ = 0
    assert base["steps"] == [0, 0, 0]
    assert all(p > b for p, b in zip(got[0.05][1], base["target_prob"]))
    d1, d2 = got[0.05][0] - h0, got[0.2][0] - h0
    assert torch.nn.functional.cosine_similarity(d1, d2).min() > 0.999
    z_adam, _ = optimise_values(lm, toks, HP.with_(steps=1, clamp=4.0, early_stop_prob=0.9999, lr=0.01))
    adam = z_adam - h0
    assert (torch.sign(adam) == torch.sign(d1)).float().mean() > 0.99
    assert torch.nn.functional.cosine_similarity(adam, d1).max() < 0.97
    for bad in (-0.1, float("inf"), float("nan"), "0.3", True, 10 ** 400):
        with pytest.raises(InputError, match="step_norm"):
            HParams(step_norm=bad)
    assert "step_norm" not in HP.to_dict() and HP.with_(step_norm=0.3).to_dict()["step_norm"] == 0.3


def test_a_value_optimisation_that_stops_early_says_why():
    """Progress of the value optimisation ends where it stops, with a note saying why, so that a
    bar at 5/12 does not look cut short; one that uses its whole budget ends at the budget."""
    lm = tiny_lm("llama")
    tok = lm.tokenizer
    toks = [tokenize_request(tok, EditRequest("the city of Louvre", "Louvre", "Berlin"), context_prefixes(HP),
                             boundary_token(tok, HP.bos))]
    for stop, early in ((0.2, True), (0.9999, False)):
        seen, notes = [], []

        def progress(stage, done, total, seen=seen):
            seen.append((stage, done, total))

        progress.note = lambda stage, text, notes=notes: notes.append((stage, text))
        hp = HP.with_(steps=12, lr=0.5, clamp=4.0, early_stop_prob=stop)
        _, info = optimise_values(lm, toks, hp, progress=progress)
        stopped = info["steps"][0]
        assert (stopped < 12) == early
        if early:
            assert notes and "stopped after" in notes[0][1] and seen[-1] == ("values", stopped, stopped)
        else:
            assert not notes and seen[-1] == ("values", 12, 12)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gptj", "gpt_neox"])
def test_reused_prefix_equals_whole_sequences(kind):
    """Feeding only the tokens from the subject's last token on, with the attention cache of what
    comes before measured once, gives the values of feeding whole sequences every step, also after
    facts leave the batch (llama, qwen3: the first fact freezes at step 5)."""
    from conftest_edit import tiny_lm as make

    from kledger.edit.engine import prepare
    from kledger.edit.hooks import pad_id_of
    from kledger.edit.values import _layout, _prefix_cache

    lm = make(kind)
    reqs = CUT_FACTS
    hp = HParams(layers=(1,), steps=12, n_prefixes=2, lr=1.0, clamp=4.0, early_stop_prob=0.2)
    toks = prepare(lm, reqs, hp)
    pad, cpu = pad_id_of(lm.tokenizer), torch.device("cpu")
    cut, whole = _layout(toks, range(4), pad, cpu), _layout(toks, range(4), pad, cpu, cut=False)
    assert cut.prefix > 0 and whole.prefix == 0 and cut.ids.shape[1] < whole.ids.shape[1]
    assert _prefix_cache(lm.model, lm.spec, toks, pad, cpu) is not None  # no silent fallback
    z_cut, info_cut = optimise_values(lm, toks, hp)
    z_whole, info_whole = optimise_values(lm, toks, hp, reuse_prefix=False)
    assert info_cut["steps"] == info_whole["steps"]
    if kind in ("llama", "qwen3"):
        assert len(set(info_cut["steps"])) > 1
    assert rel_fro(z_cut, z_whole) < 1e-5
    assert max(abs(a - b) for a, b in zip(info_cut["target_prob"], info_whole["target_prob"])) < 1e-5


def test_groups_trade_padding_against_a_cost_per_group(monkeypatch):
    """The grouping of fed lengths has the fewest positions, padding included, at GROUP_COST per
    group: lengths far apart in many rows get groups of their own, a few rows join a longer group."""
    from types import SimpleNamespace

    from kledger.edit import values

    def groups(lengths, cost):
        monkeypatch.setattr(values, "GROUP_COST", cost)
        S = max(lengths)
        mask = torch.tensor([[1] * 2 + [1] * n + [0] * (S - n) for n in lengths])
        lay = SimpleNamespace(mask=mask, prefix=2, ids=torch.zeros(len(lengths), S, dtype=torch.long),
                              d_rows=torch.arange(len(lengths)), out_rows=torch.arange(len(lengths)))
        return sorted((g.S, len(g.seq)) for g in values._groups(lay))

    assert groups([2] * 50 + [8] * 50, 40) == [(2, 50), (8, 50)]  # 580 positions against 840
    assert groups([2] * 3 + [8] * 50, 40) == [(8, 53)]  # 464 against 486
    assert groups([2, 3, 4, 8], 0) == [(2, 1), (3, 1), (4, 1), (8, 1)]
    assert groups([5] * 7, 40) == [(5, 7)]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gptj", "gpt_neox"])
def test_sequences_fed_by_length_equal_one_padded_batch(kind, monkeypatch):
    """Each step feeds the sequences in groups of about one fed length (with no cost per group,
    exactly one: no padding computed, the cache cut to the group's longest cut; with a small cost,
    mixed lengths padded within a group): the values of one padded batch, also after facts leave
    the batch and the groups are chosen again, with or without the reused prefix."""
    from conftest_edit import tiny_lm as make

    from kledger.edit import values
    from kledger.edit.engine import prepare
    from kledger.edit.hooks import pad_id_of
    from kledger.edit.values import _groups, _layout

    monkeypatch.setattr(values, "GROUP_COST", 0)
    lm = make(kind)
    hp = HParams(layers=(0, 1), steps=12, n_prefixes=2, lr=1.0, clamp=4.0, early_stop_prob=0.2)
    toks = prepare(lm, CUT_FACTS, hp)
    lay = _layout(toks, range(4), pad_id_of(lm.tokenizer), torch.device("cpu"))
    groups = _groups(lay)
    assert len(groups) > 1 and sum(len(g.seq) for g in groups) == lay.ids.shape[0]
    assert sorted(torch.cat([g.out_idx for g in groups]).tolist()) == list(range(len(lay.out_rows)))
    assert all(int(lay.mask[g.seq, lay.prefix:].sum(1).min()) == g.S for g in groups)  # no padding fed
    assert min(g.P for g in groups) < lay.prefix  # some cache cut shorter
    assert len(_groups(lay, by_length=False)) == 1
    monkeypatch.setattr(values, "GROUP_COST", 3)  # groups of mixed lengths, padded within
    mixed = _groups(lay)
    assert 1 < len(mixed) < len(groups) and any(int(lay.mask[g.seq, lay.prefix:].sum(1).min()) < g.S for g in mixed)
    for reuse, cost in ((True, 0), (False, 0), (True, 3)):
        monkeypatch.setattr(values, "GROUP_COST", cost)
        z_len, info_len = optimise_values(lm, toks, hp, reuse_prefix=reuse)
        z_pad, info_pad = optimise_values(lm, toks, hp, reuse_prefix=reuse, by_length=False)
        assert info_len["steps"] == info_pad["steps"]
        if kind in ("llama", "qwen3"):
            assert len(set(info_len["steps"])) > 1
        assert rel_fro(z_len, z_pad) < 1e-5
        assert max(abs(a - b) for a, b in zip(info_len["target_prob"], info_pad["target_prob"])) < 1e-5


def test_edit_raises_target_probability():
    lm, c0, W0 = setup(torch.float32)
    # subject at the end of the prompt: the delta sits where the tiny random model predicts
    req = EditRequest("located in the Eiffel Tower", "Eiffel Tower", "Rome")
    hp = HP.with_(lam=0.5, steps=20, lr=1.0, clamp=4.0)
    tok = lm.tokenizer
    ids = tok("<|endoftext|> " + req.prompt, return_tensors="pt").input_ids
    target = tok.convert_tokens_to_ids(req.target)

    def p_target() -> float:
        with torch.no_grad():
            return float(torch.softmax(lm.model(ids).logits[0, -1], -1)[target])

    before = p_target()
    diag: dict = {}
    compute_constraints(lm, [req], hp, c0, W0, {}, diagnostics=diag)
    after = p_target()
    assert diag["target_prob"][0] > 5 * before
    assert after > 5 * before and abs(after - diag["target_prob"][0]) < 0.2 * after


def test_bad_requests():
    lm = tiny_lm("llama")
    tok = lm.tokenizer
    with pytest.raises(InputError):
        tokenize_request(tok, EditRequest("the Louvre is in", "Eiffel Tower", "Rome"), [""], 1)
    with pytest.raises(InputError):
        tokenize_request(tok, EditRequest("the Louvre is in", "Louvre", "  "), [""], 1)
    with pytest.raises(InputError):
        compute_constraints(lm, [], HP, {}, {}, {})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_prompt_longer_than_the_context_is_refused_before_optimising(kind, monkeypatch):
    """The tiny models read 128 positions; a longer rewrite sequence (prefix + prompt + target)
    is an InputError naming the limit, raised while tokenising, before any value optimisation."""
    from kledger.edit import engine

    lm = tiny_lm(kind)
    monkeypatch.setattr(engine, "optimise_values", lambda *a, **kw: pytest.fail("optimised a too-long prompt"))
    long_prompt = "the " * 140 + "Eiffel Tower is located in the city of"
    with pytest.raises(InputError, match="128"):
        compute_constraints(lm, [FACTS[0], EditRequest(long_prompt, "Eiffel Tower", "Rome")], HP, {}, {}, {})
    fits = "the " * 100 + "Eiffel Tower is in"  # 104 tokens + boundary + the longest prefix + target
    toks = engine.prepare(lm, [EditRequest(fits, "Eiffel Tower", "Rome")], HP.with_(n_prefixes=0))
    assert len(toks[0].ctx[0]) + len(toks[0].target) - 1 <= 128


def test_subject_index_and_prefixes():
    lm = tiny_lm("llama")
    tok = lm.tokenizer
    prefixes = context_prefixes(HP.with_(n_prefixes=3))
    assert prefixes[0] == "" and len(prefixes) == 4 and prefixes == context_prefixes(HP.with_(n_prefixes=3))
    t = tokenize_request(tok, FACTS[0], prefixes, 1)
    for ids, s in zip(t.ctx, t.subj):
        assert ids[0] == 1 and tok.convert_ids_to_tokens(ids[s]) == "Tower"
    assert t.target == [tok.convert_tokens_to_ids("Rome")]


def test_corpus_fingerprint():
    assert corpus_fingerprint("abc", 10) != corpus_fingerprint("abc", 11)
    assert corpus_fingerprint("abc", 10) != corpus_fingerprint("abd", 10)
    assert len(corpus_fingerprint("abc", 10)) == 64


def test_sampled_corpus_is_deterministic_and_cached(tmp_path):
    from kledger.edit.stats import default_corpus, sample_corpus

    lm = tiny_lm("llama")
    a = sample_corpus(lm, 40, seed=1, seq_len=10, batch_size=2)
    assert a == sample_corpus(lm, 40, seed=1, seq_len=10, batch_size=2)
    assert a != sample_corpus(lm, 40, seed=2, seq_len=10, batch_size=2)
    text = default_corpus(lm, 40, seed=1, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    assert default_corpus(lm, 40, seed=1, cache_dir=str(tmp_path)) == text
    old = default_corpus(lm, 40, seed=1, sampler=1, cache_dir=str(tmp_path))  # sampler 1: its own file
    assert len(list(tmp_path.iterdir())) == 2 and old == sample_corpus(lm, 40, seed=1, sampler=1)
    with pytest.raises(InputError, match="sampler"):
        sample_corpus(lm, 40, sampler=7)
    c0, n = compute_c0(lm, [1], text, n_tokens=30, seq_len=16)
    assert n > 0 and c0[1].shape == (48, 48)


def test_growing_cache_decodes_as_the_models_own_cache():
    """The growing attention cache hands attention the same keys and values as transformers' own
    cache: token by token, the logits are equal, bit for bit. It exists from transformers 5 on;
    before, None lets the model make its own."""
    import transformers

    from kledger.edit.hooks import cache_kwargs, growing_cache, returned_cache

    lm = tiny_lm("llama")
    cache = growing_cache(lm.model)
    assert (cache is None) == (int(transformers.__version__.split(".")[0]) < 5)
    logits = []
    for past in (None, cache):
        ids, got = torch.tensor([[1], [2], [3]]), []
        with torch.no_grad():
            for _ in range(40):  # past the first buffer size: it grows twice
                out = lm.model(input_ids=ids, use_cache=True, **cache_kwargs(lm.model, past))
                past = returned_cache(out)
                got.append(out.logits[:, -1])
                ids = got[-1].argmax(-1, keepdim=True)
        logits.append(torch.stack(got))
    assert torch.equal(logits[0], logits[1])


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The nucleus by a full sort (the definition)."""
    p, order = probs.double().sort(descending=True)
    return set(order[(p.cumsum(0) - p) < top_p].tolist())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 8.0), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_nucleus_draw_stays_in_the_nucleus(seed, scale, top_p):
    """Every draw lies in the nucleus (the tokens ranked before it hold less than top_p), whatever
    the shape of the distribution (flat or peaked), and the same generator seed gives the same draws."""
    from kledger.edit.stats import nucleus_draw

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 3000, generator=g) * scale
    logits[0, :5] = 40.0  # one row with a few tokens holding nearly all the mass
    a = nucleus_draw(logits, top_p, torch.Generator().manual_seed(seed))
    assert torch.equal(a, nucleus_draw(logits, top_p, torch.Generator().manual_seed(seed)))
    probs = torch.softmax(logits.float(), -1).double()
    for r in range(len(a)):
        j = int(a[r])  # in the nucleus under some order of equal probabilities (row 0 has ties)
        assert float(probs[r][probs[r] > probs[r, j]].sum()) < top_p


def test_nucleus_draw_refuses_an_empty_nucleus():
    from kledger.edit.stats import nucleus_draw

    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(InputError, match="top_p"):
            nucleus_draw(torch.zeros(2, 10), bad, torch.Generator())


def test_nucleus_draw_follows_the_renormalised_nucleus():
    """Drawn 20,000 times from one distribution, the frequencies match the nucleus's renormalised
    probabilities (total variation within sampling noise) and nothing outside it is drawn."""
    from kledger.edit.stats import nucleus_draw

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, 200, generator=g) * 2).repeat(20_000, 1)
    draws = nucleus_draw(logits, 0.9, g)
    probs = torch.softmax(logits[0].double(), -1)
    keep = sorted(_nucleus(probs, 0.9))
    assert set(draws.tolist()) <= set(keep)
    want = torch.zeros(200, dtype=torch.float64)
    want[keep] = probs[keep] / probs[keep].sum()
    got = torch.bincount(draws, minlength=200).double() / len(draws)
    assert 0.5 * (got - want).abs().sum() < 0.06  # at most about 0.03 expected from 20,000 draws


@pytest.mark.parametrize("mode", ["no-history", "alphaedit", "alphaedit-no-history"])
def test_other_modes_commits_equal_apply(mode):
    lm, c0, W0 = setup()
    hp = HP.with_(mode=mode, steps=3, weight_decay=0.5)
    stored: list[dict] = []
    for t in range(3):
        prior = {la: [c[la] for c in stored] for la in hp.layers}
        stored.append(compute_constraints(lm, FACTS[2 * t:2 * t + 2], hp, c0, W0, prior))
    applied = {la: solve_history(W0[la], [c[la] for c in stored], c0[la], hp.lam, mode) for la in hp.layers}
    for la in hp.layers:
        assert rel_fro(get_weight(lm.model, lm.spec, la), applied[la]) < 1e-9
    # with its history AlphaEdit is order-free too (the paper's point: it is least squares); without
    # history the order of commits matters (the later ones overwrite the earlier ones)
    rev = {la: solve_history(W0[la], [c[la] for c in stored][::-1], c0[la], hp.lam, mode) for la in hp.layers}
    diff = max(rel_fro(rev[la], applied[la]) for la in hp.layers)
    assert diff < 1e-9 if mode == "alphaedit" else diff > 1e-6


def test_ledger_c0_records_its_corpus(tmp_path):
    """C0 as a ledger measures it (Editor.c0): on the corpus file given, up to c0_tokens tokens,
    named in the fingerprint by the corpus text and the tokens measured."""
    from conftest_edit import save_tiny_model_dir

    from kledger.ledger import Ledger

    d = save_tiny_model_dir(tmp_path / "model", corpus_words=None)
    (tmp_path / "corpus.txt").write_text(corpus())
    hp = HP.with_(c0_tokens=300, c0_seq_len=32)
    lg = Ledger.init(tmp_path / "l", model=str(d), settings={
        "hparams": {"layers": list(hp.layers), "c0_tokens": hp.c0_tokens, "c0_seq_len": hp.c0_seq_len},
        "corpus": str(tmp_path / "corpus.txt")})
    try:
        ed = lg.editor()
        c0 = ed.c0()
        _, body = ed.fingerprint()
        meta = body["c0"]
        assert set(c0) == set(hp.layers) and ed.corpus_identity()[1] == corpus() and 250 < meta["n_tokens"] <= 300
        assert meta["corpus"] == corpus_fingerprint(corpus(), meta["n_tokens"])
    finally:
        lg.close()


def test_a_second_spreading_pass_lands_the_values_closer_and_stays_one_solve():
    """The λC0 solve lands only part of each value; a second pass pushes the new values out by the
    residual still missing at the last edited layer, so the residual there comes closer to the
    optimised target, and the model still holds exactly the solve of the stored constraints."""
    from kledger.edit.engine import measure, prepare, spread

    lm, c0, W0 = setup()
    hp = HP
    toks = prepare(lm, FACTS[:4], hp)
    _, z0 = measure(lm, toks, hp.layers[0], hp.layers[-1])  # the unedited residual
    z, _ = optimise_values(lm, toks, hp)
    gaps = {}
    for passes in (1, 2, 3):
        for la in hp.layers:
            set_weight(lm.model, lm.spec, la, W0[la])
        new = spread(lm, toks, z, hp.with_(spread_passes=passes), c0, W0, {})
        _, z_now = measure(lm, toks, hp.layers[0], hp.layers[-1])
        gaps[passes] = float((z - z_now).norm() / (z - z0).norm())  # share of the change still missing
        for la in hp.layers:
            assert rel_fro(get_weight(lm.model, lm.spec, la), solve_history(W0[la], [new[la]], c0[la], hp.lam)) < 1e-9
    assert gaps[3] < gaps[2] < gaps[1], gaps  # (a tiny random model lands little; SmolLM2: docs/editing.md)


def test_later_hparams_fields_keep_old_fingerprints():
    """A field added later is left out of the fingerprint while it holds its "as before" value."""
    old = HParams(layers=(3, 4), lam=3000.0)
    assert "spread_passes" not in old.to_dict()
    assert HParams.from_dict(old.to_dict()) == old
    two = old.with_(spread_passes=2)
    assert two.to_dict()["spread_passes"] == 2 and two.fingerprint() != old.fingerprint()
    assert HParams.from_dict(two.to_dict()) == two
    with pytest.raises(InputError):
        HParams(spread_passes=0)


def test_bare_key_weight_weighs_the_bare_prompts_key_and_keeps_old_fingerprints():
    """A key is the mean over the contexts (bare_key_weight 0, the default, left out of the
    fingerprint) or the given weight on the bare prompt's key and the rest on the prefixed ones';
    the stored keys and the soft-conflict keys follow it, and the model still holds the solve."""
    from kledger.edit.engine import context_mean, first_keys, measure, prepare, spread

    x = torch.arange(24, dtype=torch.float32).view(2, 4, 3)  # [N, C, d]
    assert torch.equal(context_mean(x), x.mean(1))
    assert torch.allclose(context_mean(x, 0.5), 0.5 * x[:, 0] + 0.5 * x[:, 1:].mean(1))
    assert torch.equal(context_mean(x[:, :1], 0.5), x[:, 0])  # no prefixes: the bare key
    lm, c0, W0 = setup()
    hp = HP.with_(bare_key_weight=0.75)
    toks = prepare(lm, FACTS[:3], hp)
    plain = first_keys(lm, toks, hp.layers[0])
    weighted = first_keys(lm, toks, hp.layers[0], hp)
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(measure(lm, toks, hp.layers[0], hp.layers[-1], hp)[0], weighted, atol=1e-5)
    z, _ = optimise_values(lm, toks, hp)
    new = spread(lm, toks, z, hp, c0, W0, {})
    assert torch.allclose(new[hp.layers[0]][0], weighted, atol=1e-5)
    for la in hp.layers:
        assert rel_fro(get_weight(lm.model, lm.spec, la), solve_history(W0[la], [new[la]], c0[la], hp.lam)) < 1e-9
    assert "bare_key_weight" not in HP.to_dict() and hp.fingerprint() != HP.fingerprint()
    assert HParams.from_dict(hp.to_dict()) == hp
    for bad in (-0.1, 1.0):
        with pytest.raises(InputError, match="bare_key_weight"):
            HParams(bare_key_weight=bad)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gptj", "gpt_neox"])
def test_running_only_the_layers_above_equals_every_layer(kind):
    """Later steps run only the decoder layers above the one δ is added to (its output, which δ
    does not change, is kept from step 0): the values equal those of running every layer every
    step, also after facts leave the batch, and the model's layers are its own again after."""
    from conftest_edit import tiny_lm as make

    from kledger.edit.engine import prepare
    from kledger.edit.spec import get_module

    lm = make(kind)
    reqs = CUT_FACTS
    hp = HParams(layers=(0, 1), steps=12, n_prefixes=2, lr=1.0, clamp=4.0, early_stop_prob=0.2)
    toks = prepare(lm, reqs, hp)
    stack = list(get_module(lm.model, lm.spec.layers))
    z_above, info_above = optimise_values(lm, toks, hp)
    assert list(get_module(lm.model, lm.spec.layers)) == stack
    z_all, info_all = optimise_values(lm, toks, hp, reuse_below=False)
    assert info_above["steps"] == info_all["steps"]
    if kind in ("llama", "qwen3"):
        assert len(set(info_above["steps"])) > 1
    assert rel_fro(z_above, z_all) < 1e-5
    assert max(abs(a - b) for a, b in zip(info_above["target_prob"], info_all["target_prob"])) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gptj", "gpt_neox"])
def test_bfloat16_linear_layers_above_the_edit_stay_close_and_leave_the_model_as_it_was(kind, monkeypatch):
    """value_dtype=bfloat16 computes the linear layers above the last edited layer (and the LM
    head) in bfloat16: only those are swapped, the values stay close to float32's, the model's
    modules are its own again afterwards, also when a step fails; float32 is left out of the
    fingerprint and other precisions are refused."""
    from conftest_edit import tiny_lm as make

    from kledger.edit import values
    from kledger.edit.engine import prepare
    from kledger.edit.spec import get_module
    from kledger.edit.values import _low_precision

    lm = make(kind)
    hp = HParams(layers=(0, 1), steps=8, n_prefixes=2, lr=1.0, clamp=4.0, early_stop_prob=0.99)
    low = hp.with_(value_dtype="bfloat16")
    swaps = _low_precision(lm.model, lm.spec, 1, "bfloat16")
    linears = {id(m) for i, la in enumerate(get_module(lm.model, lm.spec.layers)) if i > 1
               for m in la.modules() if isinstance(m, torch.nn.Linear)}
    head = get_module(lm.model, lm.spec.lm_head)
    assert {id(s[2]) for s in swaps} == linears | {id(head)} and _low_precision(lm.model, lm.spec, 1, "float32") == []
    toks = prepare(lm, CUT_FACTS, hp)
    before = [(n, id(m)) for n, m in lm.model.named_modules()]
    z32, _ = optimise_values(lm, toks, hp)
    z16, info = optimise_values(lm, toks, low)
    assert [(n, id(m)) for n, m in lm.model.named_modules()] == before
    assert rel_fro(z16, z32) < 0.05 and all(0 < p <= 1 for p in info["target_prob"])

    def fail(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(values, "_seq_logprobs", fail)
    with pytest.raises(RuntimeError, match="boom"):
        optimise_values(lm, toks, low)
    assert [(n, id(m)) for n, m in lm.model.named_modules()] == before
    assert "value_dtype" not in hp.to_dict() and low.fingerprint() != hp.fingerprint()
    assert HParams.from_dict(low.to_dict()) == low
    with pytest.raises(InputError, match="value_dtype"):
        HParams(value_dtype="float16")


def test_value_dtype_auto_is_bfloat16_only_where_its_products_are_fast(monkeypatch):
    """auto: bfloat16 on a CPU with AMX units and on a GPU that supports it, float32 elsewhere (a
    CPU without AMX runs bfloat16 products several times slower); explicit values are kept."""
    from kledger.edit.values import value_dtype_on

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        assert value_dtype_on(cpu, "auto") == ("bfloat16" if amx else "float32")
        assert value_dtype_on(cpu, "float32") == "float32" and value_dtype_on(cpu, "bfloat16") == "bfloat16"
    for ok in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda ok=ok: ok)
        assert value_dtype_on(cuda, "auto") == ("bfloat16" if ok else "float32")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch without the probe: float32
    assert value_dtype_on(cpu, "auto") == "float32"
    assert HParams(value_dtype="auto").to_dict()["value_dtype"] == "auto"


def test_two_key_readings_store_the_bare_and_prefixed_keys_each_moved_by_delta():
    """key_readings=2: each fact's constraint at a layer is two rows, the bare prompt's key and the
    prefixed contexts' mean key, each valued to move its own reading's residual at the last
    edited layer by the optimised δ; the model holds the solve of all rows, prior commits'
    [N, 2, d] constraints are solved in as rows, and soft conflicts compare the prefixed reading."""
    from kledger.edit.engine import first_keys, measure, prepare, rows_of, spread

    lm, c0, W0 = setup()
    hp = HP.with_(key_readings=2)
    toks = prepare(lm, FACTS[:3], hp)
    L = hp.layers[-1]
    K1, z_before = measure(lm, toks, hp.layers[0], L, hp)
    assert K1.shape == (3, 2, 48) and z_before.shape[:2] == (3, 2)
    one_k, one_z = measure(lm, toks, hp.layers[0], L, HP)  # one reading: context mean, bare residual
    assert torch.allclose(one_k, (K1[:, 0] + 2 * K1[:, 1]) / 3, atol=1e-6)  # n_prefixes=2
    assert torch.allclose(one_z, z_before[:, 0], atol=1e-6)
    assert torch.allclose(first_keys(lm, toks, hp.layers[0], hp), K1[:, 1], atol=1e-6)
    z, _ = optimise_values(lm, toks, hp)
    new = spread(lm, toks, z, hp, c0, W0, {})
    for la in hp.layers:
        K, V = new[la]
        assert K.shape[:2] == (3, 2) and V.shape[:2] == (3, 2)
        assert rel_fro(get_weight(lm.model, lm.spec, la), solve_history(W0[la], [rows_of(new[la])], c0[la], hp.lam)) < 1e-9
    delta = z - z_before[:, 0]  # what the value optimisation asks of the bare prompt
    _, z_after = measure(lm, toks, hp.layers[0], L, hp)
    moved = (z_after - z_before)  # each reading moves toward its own δ (a tiny model lands part of it)
    cos = torch.nn.functional.cosine_similarity(moved.reshape(-1, moved.shape[-1]),
                                                delta[:, None].expand_as(moved).reshape(-1, moved.shape[-1]), dim=1)
    assert (cos > 0.5).all(), cos
    # a second commit on top: the prior's [N, 2, d] constraints are solved in as rows
    toks2 = prepare(lm, FACTS[3:5], hp)
    z2, _ = optimise_values(lm, toks2, hp)
    new2 = spread(lm, toks2, z2, hp, c0, W0, {la: [new[la]] for la in hp.layers})
    for la in hp.layers:
        both = solve_history(W0[la], [rows_of(new[la]), rows_of(new2[la])], c0[la], hp.lam)
        assert rel_fro(get_weight(lm.model, lm.spec, la), both) < 1e-9
    assert "key_readings" not in HP.to_dict() and HParams.from_dict(hp.to_dict()) == hp
    for bad in ({"key_readings": 3}, {"key_readings": 2, "n_prefixes": 0}, {"key_readings": 2, "bare_key_weight": 0.5}):
        with pytest.raises(InputError, match="key_readings"):
            HP.with_(**bad)
