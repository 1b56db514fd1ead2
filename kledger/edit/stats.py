"""C0: the uncentered second moment of the down-projection inputs at the edited layers,
C0 = mean over corpus tokens of k kᵀ (float64, [d_in, d_in] per layer), in one forward pass per
batch that stops after the last edited layer.

The default corpus needs no download: text sampled from the model itself with a fixed seed
(`sample_corpus`). `--corpus FILE` gives user text instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError, ModelError
from ..settings import Progress, report
from .device import device_of
from .hooks import boundary_token, cache_kwargs, capture_down_inputs, encode, growing_cache, pad_batch, pad_id_of, returned_cache, run_until
from .hparams import SAMPLED_TOKENS, corpus_fingerprint  # noqa: F401  (torch-free, kept here by name)
from .solve import no_tf32
from .spec import down_proj, to_canonical

# corpus samplers: version → most sequences drawn at once. 1: transformers' generate (the first
# release); 2: a cached loop with a partial sort (same distribution, other random numbers), the
# default corpus's 157 sequences in one round
SAMPLERS = {1: 32, 2: 160}
SAMPLER = 2


def corpus_chunks(tokenizer: Any, text: str, n_tokens: int, seq_len: int,
                  bos_id: int | None) -> list[list[int]]:
    """Split the first `n_tokens` tokens of `text` into sequences of `seq_len` tokens (each with
    the boundary token in front when `bos_id` is given). The last chunk may be shorter."""
    ids = encode(tokenizer, text)[:n_tokens]
    if len(ids) < 2:
        raise InputError("the corpus is empty or too short to measure C0",
                         "give a text file with at least a few thousand tokens")
    pre = [bos_id] if bos_id is not None else []
    return [pre + ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


@torch.no_grad()
def compute_c0(lm: Any, layers: Sequence[int], text: str, *, n_tokens: int = 100_000, seq_len: int = 128,
               batch_size: int = 16, bos: str = "auto",
               progress: Progress | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """C0 per layer ([d_in, d_in], float64) over the first `n_tokens` tokens of `text`, and the
    number of tokens averaged over. The boundary token is fed but not counted. Runs on the model's
    device (sums in float64 there); C0 comes back on the CPU."""
    model, spec, tok = lm.model, lm.spec, lm.tokenizer
    dev = device_of(model)
    layers = sorted(set(int(x) for x in layers))
    bos_id = boundary_token(tok, bos)
    skip = 1 if bos_id is not None else 0
    chunks = corpus_chunks(tok, text, n_tokens, seq_len, bos_id)
    d_in = to_canonical(down_proj(model, spec, layers[0]).weight, spec).shape[1]
    sums = {la: torch.zeros(d_in, d_in, dtype=torch.float64, device=dev) for la in layers}
    count = 0
    batches = [chunks[i:i + batch_size] for i in range(0, len(chunks), batch_size)]
    pad = pad_id_of(tok)
    for b, batch in enumerate(batches):
        report(progress, "c0", b, len(batches))
        padded = pad_batch(batch, pad)
        ids, mask = padded.input_ids, padded.attention_mask  # [B, T]
        counted = mask.bool().to(dev, copy=True)
        counted[:, :skip] = False
        with capture_down_inputs(model, spec, layers, stop_after=layers[-1]) as got:
            run_until(model, ids, mask)
        with no_tf32():  # a TF32 product would put ~1e-3 relative error into C0
            for la in layers:
                x = got[la][counted].float()  # [n, d_in]
                sums[la] += (x.T @ x).double()  # per-batch sum in float32 (≤ a few thousand tokens)
        count += int(counted.sum())
    report(progress, "c0", len(batches), len(batches))
    c0 = {la: (s / count).cpu() for la, s in sums.items()}
    if not all(torch.isfinite(c).all() for c in c0.values()):
        raise ModelError("C0 has non-finite entries", "check the model weights and the corpus")
    return c0, count


@torch.no_grad()
def sample_corpus(lm: Any, n_tokens: int, *, seed: int = 0, seq_len: int = 128, batch_size: int | None = None,
                  top_p: float = 0.95, sampler: int = SAMPLER, progress: Progress | None = None) -> str:
    """Text sampled from the model itself (nucleus sampling from a document boundary, fixed seed):
    a corpus that needs no download. Deterministic on one machine and library version; stored
    constraints record its fingerprint, so a different sample is detected, not silently used.
    Always sampled on the CPU (a model on a GPU is moved to the CPU for it, then back), so that the
    text, and the C0 named after it, does not depend on the device: a GPU draws other random
    numbers. `sampler` 1 is transformers' `generate` (the first release's text); 2 (the default)
    draws the same kind of sample several times faster (`_sample_fast`)."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown corpus sampler {sampler}", f"choose one of {', '.join(map(str, SAMPLERS))}")
    model = lm.model
    dev = device_of(model)
    run = _sample if sampler == 1 else _sample_fast
    size = batch_size or SAMPLERS[sampler]
    if dev.type == "cpu":
        return run(lm, n_tokens, seed, seq_len, size, top_p, progress)
    model.to("cpu")  # moved, not copied: a copy would first double the model on the GPU
    try:
        return run(lm, n_tokens, seed, seq_len, size, top_p, progress)
    finally:
        model.to(dev)


def _start_token(tok: Any) -> int:
    start = boundary_token(tok, "always")
    if start is None:
        raise ModelError("the tokenizer has no boundary token to sample a corpus from",
                         "give a corpus file with --corpus")
    return start


def _sample(lm: Any, n_tokens: int, seed: int, seq_len: int, batch_size: int, top_p: float,
            progress: Progress | None) -> str:
    """Sampler 1: transformers' `generate`, seeded through the CPU's global generator (restored after)."""
    from .weights import quiet_transformers

    model, tok = lm.model, lm.tokenizer
    start = _start_token(tok)
    n_seq = max(1, -(-n_tokens // seq_len))
    texts: list[str] = []
    rounds = -(-n_seq // batch_size)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.default_generator.manual_seed(seed)  # the CPU stream only (torch.manual_seed seeds CUDA too)
        for r in range(rounds):
            report(progress, "sample corpus", r, rounds)
            b = min(batch_size, n_seq - r * batch_size)
            ids = torch.full((b, 1), start, dtype=torch.long)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 top_p=top_p, top_k=0, temperature=1.0, max_new_tokens=seq_len,
                                 min_new_tokens=seq_len, pad_token_id=pad_id_of(tok),
                                 eos_token_id=None)
            texts += [tok.decode(o[1:], skip_special_tokens=True) for o in out]
    report(progress, "sample corpus", rounds, rounds)
    return "\n\n".join(t.strip() for t in texts)


def nucleus_draw(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` [B, V], drawn from the smallest set of most probable tokens
    whose probability reaches `top_p` (nucleus sampling at temperature 1), with one uniform draw
    per row from `gen`. Sorting a whole vocabulary per token costs as much as the forward pass,
    so nothing is sorted but one bucket per row: the probabilities are bucketed by halves of a
    power of two; the buckets above the one where the mass reaches `top_p` are kept whole, those
    below it dropped whole, and only the tokens in that boundary bucket are ranked."""
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(logits.float(), dim=-1)
    B, V = probs.shape
    bucket = torch.log2(probs).mul_(-2).floor_().clamp_(0, 99).long()  # 0: p ≥ 2^-0.5; zeros land in 99
    cum = probs.new_zeros(B, 100).scatter_add_(1, bucket, probs).double().cumsum(1)
    last = (cum < top_p).sum(1).clamp_max(99)  # the boundary bucket
    above = torch.where(last > 0, cum.gather(1, (last - 1).clamp_min(0)[:, None]).squeeze(1), 0.0)
    keep = bucket < last[:, None]
    rows, cols = (bucket == last[:, None]).nonzero(as_tuple=True)
    p = probs[rows, cols].double()
    order = torch.argsort(-p, stable=True)  # by falling probability (ties: by column)...
    order = order[torch.argsort(rows[order], stable=True)]  # ...within each row
    rows, cols, p = rows[order], cols[order], p[order]
    before = p.cumsum(0) - p  # mass before each token in the list...
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    row_start = torch.zeros(B, dtype=p.dtype).index_put_((rows[first],), before[first])
    before = before - row_start[rows] + above[rows]  # ...made the mass ranked before it in its row
    inside = before < top_p
    keep[rows[inside], cols[inside]] = True
    weights = probs.mul_(keep).cumsum(1)
    u = torch.rand(B, 1, generator=gen) * weights[:, -1:]
    return torch.searchsorted(weights, u, right=True).clamp_max(V - 1).squeeze(1)


def _sample_fast(lm: Any, n_tokens: int, seed: int, seq_len: int, batch_size: int, top_p: float,
                 progress: Progress | None) -> str:
    """Sampler 2: a plain loop over a growing attention cache (`growing_cache`), up to
    `batch_size` sequences at once in rounds of equal size, with its own seeded generator and a
    nucleus found without sorting the whole vocabulary (`nucleus_draw`)."""
    model, tok = lm.model, lm.tokenizer
    start = _start_token(tok)
    n_seq = max(1, -(-n_tokens // seq_len))
    batch_size = min(batch_size, _fits(model.config, seq_len))
    rounds = -(-n_seq // batch_size)
    sizes = [n_seq // rounds + (r < n_seq % rounds) for r in range(rounds)]
    gen = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for r, b in enumerate(sizes):
        step = torch.full((b, 1), start, dtype=torch.long)
        past, drawn = growing_cache(model), []
        for t in range(seq_len):
            report(progress, "sample corpus", r * seq_len + t, rounds * seq_len)
            out = model(input_ids=step, use_cache=True, **cache_kwargs(model, past))
            past = returned_cache(out)
            step = nucleus_draw(out.logits[:, -1], top_p, gen)[:, None]
            drawn.append(step)
        texts += [tok.decode(o, skip_special_tokens=True) for o in torch.cat(drawn, dim=1)]
    report(progress, "sample corpus", rounds * seq_len, rounds * seq_len)
    return "\n\n".join(t.strip() for t in texts)


KV_BUDGET = 2 * 2**30  # bytes of attention cache sampler 2 may hold (its buffers double: 2× the keys and values)


def _fits(config: Any, seq_len: int) -> int:
    """How many sequences of `seq_len` tokens sampler 2 draws at once within KV_BUDGET: all of
    SmolLM2's 157 at once (up to its limit of 160), 32 for Llama-3-8B, 8 for a 7B model without
    grouped keys. A function of the model's configuration only, so
    the text does not depend on the machine."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 1) or 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // max(1, getattr(cfg, "num_attention_heads", 1) or 1)
    per_seq = 2 * 2 * cfg.num_hidden_layers * heads * head_dim * seq_len * 4  # keys and values, doubled, float32
    return max(8, KV_BUDGET // max(1, per_seq))


def default_corpus(lm: Any, n_tokens: int = SAMPLED_TOKENS, *, seed: int = 0, sampler: int = SAMPLER,
                   cache_dir: str | os.PathLike | None = None, progress: Progress | None = None) -> str:
    """The default C0 corpus: `sample_corpus` text, cached as a file in `cache_dir` (default:
    `kledger.edit.weights.corpus_cache_root()`) keyed by the model's config and all its
    down-projection weights (so an edited model never reuses a base model's sample). Measure C0
    on the base model."""
    from .weights import corpus_cache_root

    key = lm.fingerprint(range(lm.n_layers))[:16]
    root = Path(cache_dir) if cache_dir is not None else corpus_cache_root()
    version = "" if sampler == 1 else f"-sampler{sampler}"  # sampler 1's files keep their first name
    path = root / f"sampled-{key}-seed{seed}-{n_tokens}{version}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = sample_corpus(lm, n_tokens, seed=seed, sampler=sampler, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text

