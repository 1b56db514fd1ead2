"""`kledger eval`: how well the facts are in the model at a revision, and what else moved.

Metrics (defined exactly in docs/evaluation.md):

- CounterFact records (a fact with a `target_true`): efficacy, generalization and specificity as
  in ROME (Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022): the new
  object beats the true one in per-token mean log-probability after the prompt / after each
  paraphrase; on each neighbourhood prompt the true object beats the new one. Plus the mean
  probabilities exp(mean token log-probability) of the new object on prompts and paraphrases and of
  the true object on neighbourhood prompts.
- ZsRE records (a fact whose `extra` holds ZsRE's `loc_ans` or `cond`): MEMIT's token accuracy
  (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023): the fraction of target tokens
  that are the argmax next token with the earlier target tokens fed (teacher forcing), for the new
  answer on the question and on its rephrasings, and for `loc_ans` on the unrelated question.
- Other facts: the same token accuracy and the mean probability of the new object, on the prompt
  and the paraphrases.
- Generation success, for every kind: the share of prompts whose greedy continuation (the
  object's token count plus GEN_MARGIN tokens) starts with the new object (`gen_rewrite`,
  `gen_paraphrase`), and for neighbourhood prompts with the object they should keep
  (`gen_neighborhood`): what a user who lets the model answer sees, where the scores above compare
  two given answers with the correct prefix fed (teacher forcing).
- General ability: perplexity on held-out text (fixed windows, the same tokens for every model) and
  fluency, ROME's weighted bi-/tri-gram entropy of a greedy continuation of each record's prompt.

The scoring is batched: one forward pass per batch of sequences, tokenised and padded as the edit
engine does (kledger.edit.hooks). `Scorer` works with any causal LM whose call returns `.logits`
[B, T, V] (the tests use a bigram table); `evaluate_model` scores one model. Which records and
revisions: kledger.model_side.evaluate, the library call behind the command. torch is
imported only when scoring (importing this module to plot needs neither torch nor a model);
matplotlib only by `plot_history`.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..errors import InputError, StateError
from ..records import Fact
from ..settings import Progress, report

if TYPE_CHECKING:  # pragma: no cover
    import torch

KINDS = ("counterfact", "zsre", "other")
KIND_TITLES = {"counterfact": "CounterFact", "zsre": "ZsRE", "other": "Other facts"}
# the summary metrics of each kind, in display order
GROUP_METRICS = {
    "counterfact": ("efficacy", "generalization", "specificity", "p_new_prompt", "p_new_paraphrase",
                    "p_true_neighborhood", "gen_rewrite", "gen_paraphrase", "gen_neighborhood"),
    "zsre": ("rewrite_acc", "paraphrase_acc", "neighborhood_acc", "gen_rewrite", "gen_paraphrase",
             "gen_neighborhood"),
    "other": ("rewrite_acc", "paraphrase_acc", "p_new_prompt", "p_new_paraphrase", "gen_rewrite", "gen_paraphrase"),
}
GEN_METRICS = ("gen_rewrite", "gen_paraphrase", "gen_neighborhood")
GEN_MARGIN = 2  # greedy tokens generated beyond the object's own token count
# which per-record metrics need which prompts: the denominators reported as n_paraphrase, n_neighborhood
_NEEDS = {"generalization": "paraphrase", "p_new_paraphrase": "paraphrase", "paraphrase_acc": "paraphrase",
          "gen_paraphrase": "paraphrase", "specificity": "neighborhood", "p_true_neighborhood": "neighborhood",
          "neighborhood_acc": "neighborhood", "gen_neighborhood": "neighborhood"}
ZSRE_MARKERS = ("loc_ans", "cond")
PPL_WINDOW = 256  # tokens per perplexity window (plus the boundary token)
PPL_TOKENS_PER_FORWARD = 1024  # windows are batched up to about this many tokens
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # ROME's compute_n_gram_entropy
_WORD = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------------------- records

def record_kind(fact: Fact) -> str:
    """"zsre" when the fact came from ZsRE (its `extra` keeps `loc_ans` or `cond`), else
    "counterfact" when it has a `target_true`, else "other"."""
    if any(k in fact.extra for k in ZSRE_MARKERS):
        return "zsre"
    return "counterfact" if fact.target_true else "other"


def _text_field(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def neighborhood_object(fact: Fact) -> str | None:
    """The object the neighbourhood prompts should keep: EasyEdit's `locality_ground_truth`, else
    the true object (ROME's neighbourhood subjects share it)."""
    return _text_field(fact.extra.get("locality_ground_truth")) or fact.target_true


def zsre_question(loc: str) -> str:
    """MEMIT reads ZsRE's unrelated question `loc` with a "?" after it."""
    return loc if loc.rstrip().endswith("?") else loc.rstrip() + "?"


def generation_prompt(fact: Fact) -> str:
    """The prompt a record's fluency text continues: its first CounterFact `generation_prompts`
    entry when it has one, else its prompt."""
    return _text_field(fact.extra.get("generation_prompts")) or fact.prompt


def _pairs(fact: Fact, kind: str) -> dict[str, list[tuple[str, str]]]:
    """The (prompt, object) pairs a record is scored on, by role."""
    prompts = [fact.prompt]
    out: dict[str, list[tuple[str, str]]] = {"rewrite_new": [(p, fact.target) for p in prompts],
                                             "para_new": [(p, fact.target) for p in fact.paraphrases]}
    if kind == "counterfact":
        true, keep = fact.target_true, neighborhood_object(fact)
        out["rewrite_true"] = [(p, true) for p in prompts]
        out["para_true"] = [(p, true) for p in fact.paraphrases]
        out["nb_keep"] = [(p, keep) for p in fact.neighborhood]
        out["nb_new"] = [(p, fact.target) for p in fact.neighborhood]
    elif kind == "zsre":
        ans = _text_field(fact.extra.get("loc_ans"))
        out["nb_keep"] = [(zsre_question(p), ans) for p in fact.neighborhood] if ans else []
    return out


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def record_metrics(fact: Fact, kind: str, got: dict[tuple[str, str], "Scores"]) -> dict[str, float | None]:
    """One record's metrics from the scores of its pairs (None where it has no such prompts)."""
    p = {role: [got[pair] for pair in pairs] for role, pairs in _pairs(fact, kind).items()}
    if kind == "counterfact":
        def beats(a: list[Scores], b: list[Scores]) -> float | None:
            return _mean(float(x.mean_logprob > y.mean_logprob) for x, y in zip(a, b))

        return {"efficacy": beats(p["rewrite_new"], p["rewrite_true"]),
                "generalization": beats(p["para_new"], p["para_true"]),
                "specificity": beats(p["nb_keep"], p["nb_new"]),
                "p_new_prompt": _mean(s.prob for s in p["rewrite_new"]),
                "p_new_paraphrase": _mean(s.prob for s in p["para_new"]),
                "p_true_neighborhood": _mean(s.prob for s in p["nb_keep"])}

    def acc(scores: list[Scores]) -> float | None:  # MEMIT: mean over all target tokens of the prompts
        return _mean(c for s in scores for c in s.correct)

    if kind == "zsre":
        return {"rewrite_acc": acc(p["rewrite_new"]), "paraphrase_acc": acc(p["para_new"]),
                "neighborhood_acc": acc(p["nb_keep"])}
    return {"rewrite_acc": acc(p["rewrite_new"]), "paraphrase_acc": acc(p["para_new"]),
            "p_new_prompt": _mean(s.prob for s in p["rewrite_new"]),
            "p_new_paraphrase": _mean(s.prob for s in p["para_new"])}


def _generation_checks(fact: Fact, kind: str) -> dict[str, list[tuple[str, str]]]:
    """Per generation metric, the (prompt, object) pairs whose greedy continuation should start
    with the object."""
    plan = _pairs(fact, kind)
    out = {"gen_rewrite": plan["rewrite_new"], "gen_paraphrase": plan["para_new"]}
    if kind in ("counterfact", "zsre"):
        out["gen_neighborhood"] = plan["nb_keep"]
    return out


def starts_with_object(continuation: str, obj: str) -> bool:
    """Whether a generated continuation (leading whitespace ignored) starts with the object as a
    whole word: case-insensitive, and not followed by a letter or digit ("Rome" is not found in
    "Romeo")."""
    text, want = continuation.lstrip().casefold(), obj.strip().casefold()
    return bool(want) and text.startswith(want) and (len(text) == len(want) or not text[len(want)].isalnum())


def generation_metrics(fact: Fact, kind: str, continuations: dict[str, str]) -> dict[str, float | None]:
    """One record's generation success rates from the greedy continuations of its prompts (None
    where it has no such prompts)."""
    return {name: _mean(float(starts_with_object(continuations[p], obj)) for p, obj in pairs)
            for name, pairs in _generation_checks(fact, kind).items()}


def summarize(kinds: Sequence[str], per_record: Sequence[dict]) -> dict[str, dict]:
    """Per kind: `n` records and the mean of each metric over the records that have it, with
    `n_paraphrase` / `n_neighborhood`, the number of records that had such prompts."""
    out = {}
    for kind in KINDS:
        rows = [m for k, m in zip(kinds, per_record) if k == kind]
        if not rows:
            continue
        g: dict[str, Any] = {"n": len(rows)}
        for name in GROUP_METRICS[kind]:
            g[name] = _mean(r[name] for r in rows if r.get(name) is not None)
        for need in ("paraphrase", "neighborhood"):
            names = [n for n in GROUP_METRICS[kind] if _NEEDS.get(n) == need]
            if names:
                g[f"n_{need}"] = sum(1 for r in rows if r.get(names[0]) is not None)
        out[kind] = g
    return out


# ---------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class Scores:
    """A target scored after a prompt: per target token, its log-probability and whether it was
    the argmax next token (teacher forcing: the earlier target tokens are fed)."""

    logprobs: tuple[float, ...]
    correct: tuple[bool, ...]

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """exp of the per-token mean log-probability (the geometric mean of the token probabilities)."""
        return math.exp(self.mean_logprob)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def _no_grad(fn: Callable) -> Callable:
    """torch.no_grad() around a method, with torch imported when it is called."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return inner


def split_ids(tokenizer: Any, prompt: str, target: str, bos_id: int | None) -> tuple[list[int], list[int]]:
    """(context ids, target ids): the target as a continuation of the prompt after a space,
    tokenised as the edit engine does (kledger.edit.hooks.split_target), with the boundary token
    in front of the context."""
    from .hooks import split_target

    p, t = split_target(tokenizer, prompt.rstrip(), target.strip())
    if not t:
        raise InputError(f"object {target!r} after {prompt!r} tokenises to nothing", "give a non-empty object")
    return ([bos_id] if bos_id is not None else []) + p, t


class Scorer:
    """Batched scoring with one causal LM. `spec` (an ArchSpec), when given, lets the LM head run
    on the scored positions only."""

    def __init__(self, model: Any, tokenizer: Any, bos_id: int | None = None, *, batch_size: int = 32,
                 spec: Any = None, progress: Progress | None = None):
        self.model, self.tokenizer, self.bos_id = model, tokenizer, bos_id
        self.batch_size, self.spec, self.progress = max(1, int(batch_size)), spec, progress
        from .hooks import pad_id_of

        self.pad_id = pad_id_of(tokenizer)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits [M, V] (float32, on the model's device) at the positions (rows[j], cols[j])."""
        from .device import device_of
        from .hooks import logits_at

        if self.spec is not None:
            return logits_at(self.model, self.spec, ids, mask, rows, cols).float()
        dev = device_of(self.model)
        return self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[rows.to(dev), cols.to(dev)].float()

    def _report(self, stage: str, done: int, total: int) -> None:
        report(self.progress, stage, done, total)

    @_no_grad
    def score(self, pairs: Sequence[tuple[str, str]], stage: str = "score") -> dict[tuple[str, str], Scores]:
        """Scores of every distinct (prompt, target) pair. A pair needs the sequence context +
        target[:-1] (the last target token is never fed); a one-token target needs only the
        context, so it shares the sequence of any other target after the same context (the new
        and the true object of a CounterFact prompt usually cost one sequence). Sequences are
        sorted by length and right-padded into batches of `batch_size`: one forward pass each."""
        import torch

        from .hooks import pad_batch

        unique = list(dict.fromkeys(pairs))
        toks = [split_ids(self.tokenizer, p, t, self.bos_id) for p, t in unique]
        feeds: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # context → what is fed after it
        for c, t in toks:
            feeds.setdefault(tuple(c), [])
            if len(t) > 1 and tuple(t[:-1]) not in feeds[tuple(c)]:
                feeds[tuple(c)].append(tuple(t[:-1]))
        seqs: dict[tuple[int, ...], list[int]] = {}  # sequence → indices of the pairs it scores
        for i, (c, t) in enumerate(toks):
            fed = tuple(t[:-1]) if len(t) > 1 else (feeds[tuple(c)] or [()])[0]
            seqs.setdefault(tuple(c) + fed, []).append(i)
        order = sorted(seqs, key=len, reverse=True)
        out: dict[tuple[str, str], Scores] = {}
        n_batches = -(-len(order) // self.batch_size)
        for b in range(n_batches):
            self._report(stage, b, n_batches)
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            padded = pad_batch(batch, self.pad_id)  # [B, T] right-padded
            rows, cols, tgt, owner = [], [], [], []
            for j, seq in enumerate(batch):
                for i in seqs[seq]:
                    c, t = toks[i]
                    for k, tid in enumerate(t):  # target token k is predicted at position len(c) - 1 + k
                        rows.append(j)
                        cols.append(len(c) - 1 + k)
                        tgt.append(tid)
                        owner.append(i)
            logits = self._logits(padded.input_ids, padded.attention_mask, torch.tensor(rows),
                                  torch.tensor(cols))  # [M, V]
            target = torch.tensor(tgt, device=logits.device)
            lp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0].tolist()  # [M]
            hit = (logits.argmax(dim=-1) == target).tolist()  # [M]
            got: dict[int, tuple[list, list]] = {}
            for i, x, h in zip(owner, lp, hit):
                got.setdefault(i, ([], []))[0].append(float(x))
                got[i][1].append(bool(h))
            for i, (x, h) in got.items():
                out[unique[i]] = Scores(tuple(x), tuple(h))
        self._report(stage, n_batches, n_batches)
        return out

    @_no_grad
    def perplexity(self, ids: Sequence[int], window: int = PPL_WINDOW) -> dict:
        """exp(mean negative log-likelihood) of `ids` cut into windows of `window` tokens, each
        read on its own with the boundary token in front (then every token of the window is
        predicted; without a boundary token the first token of each window is not)."""
        import torch

        from .hooks import pad_batch

        pre = [self.bos_id] if self.bos_id is not None else []
        seqs = [pre + list(ids[i:i + window]) for i in range(0, len(ids), window)]
        seqs = [s for s in seqs if len(s) >= 2]
        if not seqs:
            raise InputError("the held-out text is too short for perplexity", "give a longer --text file")
        per = max(1, PPL_TOKENS_PER_FORWARD // (window + len(pre)))
        nll, count = 0.0, 0
        n_batches = -(-len(seqs) // per)
        for b in range(n_batches):
            self._report("perplexity", b, n_batches)
            batch = seqs[b * per:(b + 1) * per]
            padded = pad_batch(batch, self.pad_id)  # [B, T] right-padded
            rows, cols, tgt = [], [], []
            for j, s in enumerate(batch):
                rows += [j] * (len(s) - 1)
                cols += range(len(s) - 1)
                tgt += s[1:]
            logits = self._logits(padded.input_ids, padded.attention_mask, torch.tensor(rows), torch.tensor(cols))
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(tgt, device=logits.device),
                                                           reduction="sum"))
            count += len(tgt)
        self._report("perplexity", n_batches, n_batches)
        return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(seqs)}

    @_no_grad
    def greedy(self, wants: dict[str, int], stage: str = "greedy") -> dict[str, str]:
        """Greedy continuations: prompt → the text of its first `wants[prompt]` generated tokens
        (without the prompt), prompts of similar length batched. A transformers model decodes with
        its own KV-cached `generate` (left padding); any other LM the scorer takes is decoded step
        by step with the scorer's forward pass, right-padded, each row's next token read at its
        own last position (the same tokens: tested)."""
        import torch

        from .hooks import encode, pad_batch

        pre = [self.bos_id] if self.bos_id is not None else []
        toks = {p: pre + encode(self.tokenizer, p.rstrip()) for p in wants}
        order = sorted(wants, key=lambda p: (-len(toks[p]), -wants[p]))
        out: dict[str, str] = {}
        n_batches = -(-len(order) // self.batch_size)
        for b in range(n_batches):
            self._report(stage, b, n_batches)
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            n = max(wants[p] for p in batch)
            if hasattr(self.model, "generate"):  # a transformers model: its KV-cached greedy search
                new = self._generate_ids([toks[p] for p in batch], n)
            else:
                seqs = [list(toks[p]) for p in batch]
                for _ in range(n):
                    padded = pad_batch(seqs, self.pad_id)  # [B, T] right-padded
                    nxt = self._logits(padded.input_ids, padded.attention_mask, torch.arange(len(seqs)),
                                       torch.tensor([len(s) - 1 for s in seqs])).argmax(-1).tolist()  # [B]
                    for s, t in zip(seqs, nxt):
                        s.append(int(t))
                new = [s[len(toks[p]):] for p, s in zip(batch, seqs)]
            for p, g in zip(batch, new):
                out[p] = self.tokenizer.decode(g[:wants[p]], skip_special_tokens=True)
        self._report(stage, n_batches, n_batches)
        return out

    def _generate_ids(self, seqs: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
        """The `n_tokens` greedy tokens after each sequence, from transformers' generate on a
        left-padded batch (no stop at end of text)."""
        from .device import device_of
        from .hooks import pad_batch
        from .weights import quiet_transformers

        padded = pad_batch(seqs, self.pad_id, left=True)  # [B, T] left-padded
        dev = device_of(self.model)
        with quiet_transformers():
            gen = self.model.generate(input_ids=padded.input_ids.to(dev), attention_mask=padded.attention_mask.to(dev),
                                      do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                      pad_token_id=self.pad_id, eos_token_id=None)
        T = padded.input_ids.shape[1]
        return [gen[j, T:].tolist() for j in range(len(seqs))]

    @_no_grad
    def generate(self, prompts: Sequence[str], n_tokens: int) -> dict[str, str]:
        """Greedy continuations of exactly `n_tokens` tokens (no stop at end of text), batched with
        left padding; returns prompt → the decoded prompt and continuation."""
        from .hooks import encode

        unique = list(dict.fromkeys(prompts))
        pre = [self.bos_id] if self.bos_id is not None else []
        toks = [pre + encode(self.tokenizer, p.rstrip()) for p in unique]
        order = sorted(range(len(unique)), key=lambda i: -len(toks[i]))
        out: dict[str, str] = {}
        n_batches = -(-len(order) // self.batch_size)
        for b in range(n_batches):
            self._report("generate", b, n_batches)
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            new = self._generate_ids([toks[i] for i in idx], n_tokens)
            for i, g in zip(idx, new):  # the whole text, prompt included, as ROME's generate_fast
                out[unique[i]] = self.tokenizer.decode(toks[i] + g, skip_special_tokens=True)
        self._report("generate", n_batches, n_batches)
        return out

def ngram_entropy(text: str) -> float:
    """ROME's fluency of one text (compute_n_gram_entropy): the entropies in bits of its bigram and
    trigram frequency distributions, weighted 2/3 and 4/3, averaged. Words and punctuation marks
    are split by the regular expression `\\w+|[^\\w\\s]` (ROME uses nltk.word_tokenize). A text
    with no n-grams of a size counts 0 for that size."""
    words = _WORD.findall(text)
    terms = []
    for n, w in NGRAM_WEIGHTS.items():
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


# ---------------------------------------------------------------------------- one model

def _generation_success(scorer: Scorer, facts: Sequence[Fact], kinds: Sequence[str], per: list[dict]) -> None:
    """Add each record's generation success rates to its metrics in `per`: one greedy continuation
    per distinct prompt, as long as the longest object checked after it plus GEN_MARGIN tokens."""
    checks = [_generation_checks(f, k) for f, k in zip(facts, kinds)]
    wants: dict[str, int] = {}
    for c in checks:
        for prompt, obj in (pair for pairs in c.values() for pair in pairs):
            n = len(split_ids(scorer.tokenizer, prompt, obj, scorer.bos_id)[1]) + GEN_MARGIN
            wants[prompt] = max(wants.get(prompt, 0), n)
    conts = scorer.greedy(wants) if wants else {}
    for f, k, m in zip(facts, kinds, per):
        m.update(generation_metrics(f, k, conts))


def evaluate_model(scorer: Scorer, facts: Sequence[Fact], *, ppl_ids: Sequence[int] | None = None,
                   ppl_window: int = PPL_WINDOW, gen_tokens: int = 0, greedy: bool = True) -> dict:
    """All metrics of the model in `scorer` on `facts`: {"metrics": {kind: group..., "perplexity",
    "fluency"}, "per_record": [metrics per fact], "seconds": {"records", "greedy", "fluency",
    "perplexity"}}. `greedy` False skips generation success (its metrics are then absent from
    the records and None in the summary)."""
    kinds = [record_kind(f) for f in facts]
    t0 = time.perf_counter()
    plans = [_pairs(f, k) for f, k in zip(facts, kinds)]
    got = scorer.score([pair for plan in plans for pairs in plan.values() for pair in pairs])
    per = [record_metrics(f, k, got) for f, k in zip(facts, kinds)]
    t1 = time.perf_counter()
    if greedy:
        _generation_success(scorer, facts, kinds, per)
    t_g = time.perf_counter()
    fluency = None
    if gen_tokens > 0 and facts:
        texts = scorer.generate([generation_prompt(f) for f in facts], gen_tokens)
        for f, m in zip(facts, per):
            m["fluency"] = ngram_entropy(texts[generation_prompt(f)])
        fluency = _mean(m["fluency"] for m in per)
    t2 = time.perf_counter()
    ppl = scorer.perplexity(ppl_ids, ppl_window) if ppl_ids else None
    t3 = time.perf_counter()
    metrics: dict[str, Any] = summarize(kinds, per)
    metrics["perplexity"] = ppl["perplexity"] if ppl else None
    metrics["fluency"] = fluency
    return {"metrics": metrics, "per_record": per, "perplexity": ppl,
            "seconds": {"records": t1 - t0, "greedy": t_g - t1, "fluency": t2 - t_g, "perplexity": t3 - t2}}


# ---------------------------------------------------------------------------- held-out text

def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read text {path}: {exc}", "give a UTF-8 text file") from exc


def held_out_text(ed: Any, text_path: Path | None, n_tokens: int) -> tuple[list[int], dict]:
    """The tokens perplexity is measured on, and where they come from, for the model of `ed` (a
    kledger.edit.editor.Editor). `--text FILE`: its first `n_tokens` tokens. Else the editor's
    C0 corpus file, skipping the tokens C0 was measured on when the file has enough after them;
    else the model-sampled default corpus (which C0 was measured on). Call with the base weights
    loaded (the sampled corpus is keyed by them)."""
    from .hooks import encode

    tok = ed.lm.tokenizer
    if text_path is not None:
        ids = encode(tok, _read_text(text_path))
        info = {"source": "file", "path": str(text_path), "offset": 0, "held_out": None}
        ids = ids[:n_tokens]
    elif ed.corpus_path is not None:
        ids = encode(tok, _read_text(ed.corpus_path))
        used = int(ed.hparams.c0_tokens)
        offset = used if len(ids) - used >= n_tokens else max(0, len(ids) - n_tokens)
        info = {"source": "ledger-corpus", "path": str(ed.corpus_path), "offset": offset,
                "held_out": offset >= used}
        ids = ids[offset:offset + n_tokens]
    else:
        ids = encode(tok, ed.sampled_corpus())[:n_tokens]
        info = {"source": "model-sampled", "path": None, "offset": 0, "held_out": False}
    if len(ids) < 2:
        raise InputError(f"the text for perplexity has {len(ids)} token(s)", "give a longer --text file")
    return ids, {**info, "tokens": len(ids), "window": PPL_WINDOW}


# ---------------------------------------------------------------------------- plot

def _rate_series(history: Sequence[dict]) -> list[tuple[str, str, list]]:
    """(kind, label, values along the history) of every rate or probability that has a value."""
    rates = []
    for kind in KINDS:
        for name in GROUP_METRICS[kind]:
            ys = [(p["metrics"].get(kind) or {}).get(name) for p in history]
            if any(y is not None for y in ys):
                rates.append((kind, f"{KIND_TITLES[kind]} {name}", ys))
    return rates


def plot_history(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """A line plot of the metrics along the history (PNG or any format matplotlib knows from the
    extension): the rates and probabilities on a 0–1 axis, perplexity and fluency below it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise StateError("--plot needs matplotlib, which is not installed",
                         "pip install 'kledger[eval]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    xs = list(range(len(history)))
    labels = [p["label"] for p in history]
    styles = {"counterfact": ("-", "o"), "zsre": ("--", "s"), "other": (":", "^")}  # one line style per kind
    rates = _rate_series(history)
    extra = [name for name in ("perplexity", "fluency") if any(p["metrics"].get(name) is not None for p in history)]
    fig, axes = plt.subplots(1 + len(extra), 1, sharex=True, squeeze=False,
                             figsize=(max(6.0, 0.5 * len(xs) + 3) + 3.5, 3.2 * (1 + len(extra))))
    ax = axes[0][0]
    for i, (kind, name, ys) in enumerate(rates):
        ls, mk = styles[kind]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], linestyle=ls, marker=mk, color=f"C{i % 10}",
                label=name)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("rate / probability")
    legend = {"fontsize": "small", "loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}
    if rates:
        ax.legend(**legend)
    if title:
        ax.set_title(title)
    for row, name in enumerate(extra, 1):
        a = axes[row][0]
        ys = [p["metrics"].get(name) for p in history]
        a.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", color="k", label=name)
        a.set_ylabel(name)
        a.legend(**legend)
    last = axes[-1][0]
    last.set_xticks(xs)
    last.set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
    last.set_xlabel("commit (first-parent history, oldest first)")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot write the plot {path}: {exc}",
                         "give a writable path ending in .png (or .pdf, .svg)") from exc
    finally:
        plt.close(fig)
    return path
