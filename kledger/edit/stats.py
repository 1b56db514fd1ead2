"""C0: the uncentered second moment of the down-projection inputs at the edited layers,
C0 = mean over corpus tokens of k kᵀ (float64, [d_in, d_in] per layer), in one forward pass per
batch that stops after the last edited layer.

The default corpus needs no download: text sampled from the model itself with a fixed seed
(`sample_corpus`). `--corpus FILE` gives user text instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError, ModelError
from ..settings import Progress, report
from .device import device_of
from .hooks import boundary_token, capture_down_inputs, encode, pad_batch, pad_id_of, run_until
from .solve import no_tf32
from .spec import down_proj, to_canonical

SAMPLED_TOKENS = 20_000  # size of the default, model-sampled corpus (sampling is the slow part)


def corpus_fingerprint(text: str, n_tokens: int) -> str:
    """SHA-256 of the corpus text and the number of tokens C0 was measured on."""
    h = hashlib.sha256(b"corpus\0")
    h.update(text.encode("utf-8"))
    h.update(f"\0{int(n_tokens)}".encode())
    return h.hexdigest()


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
def sample_corpus(lm: Any, n_tokens: int, *, seed: int = 0, seq_len: int = 128, batch_size: int = 32,
                  top_p: float = 0.95, progress: Progress | None = None) -> str:
    """Text sampled from the model itself (nucleus sampling from a document boundary, fixed seed):
    a corpus that needs no download. Deterministic on one machine and library version; stored
    constraints record its fingerprint, so a different sample is detected, not silently used.
    Always sampled on the CPU (a model on a GPU is moved to the CPU for it, then back), so that the
    text, and the C0 named after it, does not depend on the device: a GPU draws other random
    numbers. Only the CPU's random generator is seeded, and it is restored after."""
    model = lm.model
    dev = device_of(model)
    if dev.type == "cpu":
        return _sample(lm, n_tokens, seed, seq_len, batch_size, top_p, progress)
    model.to("cpu")  # moved, not copied: a copy would first double the model on the GPU
    try:
        return _sample(lm, n_tokens, seed, seq_len, batch_size, top_p, progress)
    finally:
        model.to(dev)


def _sample(lm: Any, n_tokens: int, seed: int, seq_len: int, batch_size: int, top_p: float,
            progress: Progress | None) -> str:
    from .weights import quiet_transformers

    model, tok = lm.model, lm.tokenizer
    start = boundary_token(tok, "always")
    if start is None:
        raise ModelError("the tokenizer has no boundary token to sample a corpus from",
                         "give a corpus file with --corpus")
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


def default_corpus(lm: Any, n_tokens: int = SAMPLED_TOKENS, *, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None, progress: Progress | None = None) -> str:
    """The default C0 corpus: `sample_corpus` text, cached as a file in `cache_dir` (default:
    `kledger.edit.weights.corpus_cache_root()`) keyed by the model's config and all its
    down-projection weights (so an edited model never reuses a base model's sample). Measure C0
    on the base model."""
    from .weights import corpus_cache_root

    key = lm.fingerprint(range(lm.n_layers))[:16]
    root = Path(cache_dir) if cache_dir is not None else corpus_cache_root()
    path = root / f"sampled-{key}-seed{seed}-{n_tokens}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = sample_corpus(lm, n_tokens, seed=seed, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text

