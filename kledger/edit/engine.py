"""Keys and values: from edit requests to per-layer constraints (k, v).

For a commit's requests, against a model whose edited layers hold apply(prior):
  1. values: optimise one residual delta δ_i per fact at the last edited layer L (hook on the
     decoder layer's output at the subject's last token), batched over all facts; z_i = h_i + δ_i.
  2. spreading: for each edited layer l in order: keys k at l with the current weights (mean over
     the bare prompt and the prefix contexts), current z at L, residual r = (z − z_cur)/(layers
     left), v = W_cur k + r; then write layer l with the solve over prior + new constraints. The
     solve lands only part of each value (λC0 pulls towards W0): with hp.spread_passes > 1 the
     layers are visited again, each new value pushed out by the share r still missing (v ← v + r,
     k measured again), and rewritten.
Gemma 3 normalises the MLP output before adding it to the residual; there the residual is spread
as if it were added directly (an approximation). Shapes: N facts, C contexts, d residual width,
d_in the down-projection's input width.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Sequence, Union

import torch

from ..errors import InputError, ModelError
from ..settings import Progress, note, report
from .device import device_of
from .hooks import (
    add_to_residual,
    boundary_token,
    capture_down_inputs,
    capture_residual,
    encode,
    logits_at,
    pad_batch,
    pad_id_of,
    returned_cache,
    run_until,
    split_target,
)
from .hparams import HParams
from .solve import KV, solve_history
from .spec import get_module, get_weight, set_weight

LayerConstraints = Union[KV, Sequence[KV]]  # one (K, V) or the batches of commits in order

# Short neutral contexts put before the prompt (MEMIT's prefix contexts, fixed for determinism).
PREFIXES = (
    "The following is a short note.",
    "Here is what I learned today.",
    "It was a quiet morning in the town.",
    "Therefore, the answer is clear.",
    "Because of this, many people agreed.",
    "I read about it in the news.",
    "You may have heard this before.",
    "According to the old records,",
    "In the last chapter of the book,",
    "She said that it was true.",
)
KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class EditRequest:
    """Make the model complete `prompt` (which contains `subject`) with `target`."""

    prompt: str
    subject: str
    target: str

    @classmethod
    def from_fact(cls, fact: Any) -> "EditRequest":
        return cls(prompt=fact.prompt, subject=fact.subject, target=fact.target)


def context_prefixes(hp: HParams) -> list[str]:
    """"" (the bare prompt) and hp.n_prefixes prefixes, chosen by hp.seed, each cut to at most
    hp.prefix_len words."""
    order = list(range(len(PREFIXES)))
    random.Random(hp.seed).shuffle(order)
    chosen = [PREFIXES[i] for i in order[:hp.n_prefixes]]
    return [""] + [" ".join(p.split()[:hp.prefix_len]) + " " for p in chosen]


@dataclass(frozen=True)
class _Tokens:
    ctx: list[list[int]]  # per context: ids of (boundary +) prefix + prompt
    subj: list[int]  # per context: index of the subject's last token
    target: list[int]  # the target's ids as a continuation of the prompt
    kl: list[int]  # ids of "{subject} is a"
    kl_subj: int


def _subject_last(tok: Any, text: str, end: int, bos_id: int | None) -> int:
    return len(encode(tok, text[:end], bos_id)) - 1


def max_positions(model: Any) -> int | None:
    """How many tokens the model reads at most (its config's max_position_embeddings), if known."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def tokenize_request(tok: Any, req: EditRequest, prefixes: Sequence[str], bos_id: int | None,
                     max_len: int | None = None) -> _Tokens:
    """The request's token ids in every context; an InputError when a rewrite sequence (context,
    prompt and target) is longer than `max_len`, the model's context."""
    prompt = req.prompt.rstrip()
    target = req.target.strip()
    at = prompt.find(req.subject) if req.subject else -1
    if at < 0:
        raise InputError(f"subject {req.subject!r} does not occur in prompt {prompt!r}",
                         "give the subject exactly as it is spelled in the prompt")
    _, t_ids = split_target(tok, prompt, target)
    if not target or not t_ids:
        raise InputError(f"target {req.target!r} of prompt {prompt!r} tokenises to nothing",
                         "give a non-empty target")
    ctx, subj = [], []
    for pre in prefixes:
        text = pre + prompt
        ctx.append(encode(tok, text, bos_id))
        subj.append(_subject_last(tok, text, len(pre) + at + len(req.subject), bos_id))
    longest = max(len(c) for c in ctx) + len(t_ids) - 1
    if max_len is not None and longest > max_len:
        shown = prompt if len(prompt) <= 60 else prompt[:30] + "…" + prompt[-25:]
        raise InputError(f"prompt {shown!r} is too long: with its target and a context prefix it is {longest:,} "
                         f"tokens, and the model's context is {max_len:,}",
                         f"shorten the prompt to well under {max_len:,} tokens")
    kl_text = KL_TEMPLATE.format(req.subject)
    return _Tokens(ctx, subj, list(t_ids), encode(tok, kl_text, bos_id),
                   _subject_last(tok, kl_text, len(req.subject), bos_id))


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ModelError(f"non-finite values in {what} during the edit",
                         "lower the learning rate or check the model weights")


# ---- values ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """One value-optimisation batch for a subset of facts: rewrite sequences (every context +
    target) then one KL sequence per fact. `fact` indexes are global, positions are local.

    With a cut at the subject (the default), only the tokens from the subject's last token on are
    fed each step: everything before it is the same at every step (δ enters at the subject's last
    token and attention is causal), so its attention cache is measured once (`_prefix_cache`) and
    reused. Each sequence's cached part is padded to `prefix` positions (masked), then the fed
    tokens follow with their true position ids."""

    ids: torch.Tensor  # [B, S] fed tokens
    mask: torch.Tensor  # [B, prefix + S] cached (1 up to the cut) then fed tokens
    pos: torch.Tensor  # [B, S] position ids of the fed tokens
    d_rows: torch.Tensor  # [n_d] where δ is added ...
    d_cols: torch.Tensor
    d_fact: torch.Tensor  # ... and whose δ (global fact index)
    out_rows: torch.Tensor  # [M + n] positions whose logits are needed: targets, then KL
    out_cols: torch.Tensor
    t_ids: torch.Tensor  # [M] target token ids
    t_seq: torch.Tensor  # [M] local rewrite-sequence index (local fact * C + context)
    n_tok: torch.Tensor  # [n * C] target tokens per rewrite sequence
    facts: torch.Tensor  # [n] global fact indexes in this layout
    rows: torch.Tensor  # [B] each sequence's row in the layout of all facts (the cache's rows)
    prefix: int  # cached positions in front of the fed tokens (0: no cut)

    def to(self, device: torch.device) -> "_Layout":
        return _Layout(**{f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                          else getattr(self, f.name) for f in fields(self)})


def _layout(toks: Sequence[_Tokens], facts: Sequence[int], pad_id: int, device: torch.device,
            cut: bool = True) -> _Layout:
    N, C = len(toks), len(toks[0].ctx)
    seqs: list[list[int]] = []
    starts: list[int] = []  # per sequence: the subject's last token, where δ enters
    rows: list[int] = []
    d_fact, t_rows, t_cols, t_ids, t_seq = [], [], [], [], []
    for k, i in enumerate(facts):
        t = toks[i]
        for c in range(C):
            s = len(seqs)
            seqs.append(t.ctx[c] + t.target[:-1])
            starts.append(t.subj[c]), rows.append(i * C + c), d_fact.append(i)
            for j, tid in enumerate(t.target):
                t_rows.append(s), t_cols.append(len(t.ctx[c]) - 1 + j), t_ids.append(tid), t_seq.append(k * C + c)
    kl_rows = list(range(len(seqs), len(seqs) + len(facts)))
    for i in facts:
        starts.append(toks[i].kl_subj), rows.append(N * C + i), d_fact.append(i)
        seqs.append(toks[i].kl)
    cuts = starts if cut else [0] * len(seqs)
    P = max(cuts)
    batch = pad_batch([s[c:] for s, c in zip(seqs, cuts)], pad_id)  # [B, S]
    B, S = batch.input_ids.shape
    mask = torch.zeros(B, P + S, dtype=torch.long)
    for r, c in enumerate(cuts):
        mask[r, :c] = 1
        mask[r, P:P + batch.lengths[r]] = 1
    out_cols = t_cols + [len(toks[i].kl) - 1 for i in facts]
    out_rows = t_rows + kl_rows
    T = torch.tensor
    t_seq_t = T(t_seq)
    return _Layout(batch.input_ids, mask, T(cuts)[:, None] + torch.arange(S),
                   torch.arange(B), T([s - c for s, c in zip(starts, cuts)]), T(d_fact),
                   T(out_rows), T([col - cuts[r] for r, col in zip(out_rows, out_cols)]), T(t_ids), t_seq_t,
                   torch.zeros(len(facts) * C).index_add_(0, t_seq_t, torch.ones(len(t_ids))),
                   T(list(facts)), T(rows), P).to(device)


@torch.no_grad()
def _prefix_cache(model: Any, spec: Any, toks: Sequence[_Tokens], pad_id: int, device: torch.device,
                  low: Sequence[tuple[Any, str, Any, Any]] = ()) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per decoder layer, the attention keys and values [B_all, heads, P, head_dim] of every
    sequence of the layout of all facts (uncut), up to the longest cut, measured once with the
    current weights (the stand-ins `low` in place) and δ = 0. None when the model returns no
    cache of the expected form (then every step feeds whole sequences)."""
    full = _layout(toks, range(len(toks)), pad_id, device, cut=False)
    P = max(max(*t.subj, t.kl_subj) for t in toks)  # the longest cut (= the cut layout's prefix)
    base = get_module(model, spec.layers.rsplit(".", 1)[0])
    with _swapped(low):
        out = base(input_ids=full.ids[:, :P], attention_mask=full.mask[:, :P], use_cache=True)
    pkv = returned_cache(out)
    layers = getattr(pkv, "layers", None)
    if not layers or not all(hasattr(la, "keys") and getattr(la, "keys", None) is not None for la in layers):
        return None
    return [(la.keys[:, :, :P].clone(), la.values[:, :, :P].clone()) for la in layers]


def _cache_for(model: Any, shared: list[tuple[torch.Tensor, torch.Tensor]], lay: _Layout) -> Any:
    """A fresh cache holding `lay`'s sequences' cached prefixes (a forward appends to it)."""
    from transformers import DynamicCache

    P = lay.prefix
    return DynamicCache([(K[lay.rows, :, :P], V[lay.rows, :, :P]) for K, V in shared], config=model.config)


class _Standin(torch.nn.Module):
    """Stands in for a decoder layer at or below the one δ is added to, in the value optimisation's
    later steps: nothing there depends on δ. Layers below pass their input on unused; the layer
    itself returns its output cached at step 0 (`out`, before δ, which the δ hook then adds)."""

    def __init__(self, out: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.out, self.as_tuple = out, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        h = hidden_states if self.out is None else self.out
        return (h,) if self.as_tuple else h


@contextlib.contextmanager
def _only_above(model: Any, spec: Any, layer: int, out: torch.Tensor | None, as_tuple: bool) -> Iterator[None]:
    """Within the block, decoder layers 0..`layer` are stand-ins (`_Standin`) and only the layers
    above it compute; `out` [B, S, d] is `layer`'s output for the batch fed. None: no change."""
    if out is None:
        yield
        return
    stack = get_module(model, spec.layers)
    saved = [stack[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            stack[i] = _Standin(None, as_tuple)
        stack[layer] = _Standin(out, as_tuple)
        yield
    finally:
        for i, m in enumerate(saved):
            stack[i] = m


class _LowPrecisionLinear(torch.nn.Module):
    """Stands in for a linear layer: its product in `dtype` (input cast down, output cast back);
    norms, attention and the residual stream around it keep their precision."""

    def __init__(self, lin: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.w = lin.weight.detach().to(dtype)
        self.b = None if lin.bias is None else lin.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.w.dtype), self.w, self.b).to(x.dtype)


def value_dtype_on(dev: torch.device, dtype: str) -> str:
    """The precision hp.value_dtype `dtype` means on `dev`: "auto" is bfloat16 where its products
    are fast (a CUDA device that supports it; a CPU with AMX units, where they run about 6× faster
    than float32's; without AMX, CPUs run them several times slower than float32's), else float32."""
    if dtype != "auto":
        return dtype
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bfloat16" if dev.type == "cpu" and amx() else "float32"


def _low_precision(model: Any, spec: Any, layer: int, dtype: str) -> list[tuple[Any, str, Any, Any]]:
    """(parent, name, linear, stand-in) for every linear layer above decoder layer `layer` and the
    LM head, the stand-ins computing in `dtype` (as `value_dtype_on` reads it); none for float32."""
    dtype = value_dtype_on(device_of(model), dtype)
    if dtype == "float32":
        return []
    stack = get_module(model, spec.layers)
    mods = [(f"{spec.layers}.{i}", stack[i]) for i in range(layer + 1, len(stack))]
    mods.append((spec.lm_head, get_module(model, spec.lm_head)))
    out = []
    for path, top in mods:
        for name, m in ([("", top)] if isinstance(top, torch.nn.Linear) else top.named_modules()):
            if isinstance(m, torch.nn.Linear):
                full = f"{path}.{name}" if name else path
                parent, _, attr = full.rpartition(".")
                out.append((get_module(model, parent) if parent else model, attr, m,
                            _LowPrecisionLinear(m, getattr(torch, dtype))))
    return out


@contextlib.contextmanager
def _swapped(swaps: Sequence[tuple[Any, str, Any, Any]]) -> Iterator[None]:
    """Within the block, each linear layer of `swaps` is replaced by its stand-in."""
    try:
        for parent, attr, _, standin in swaps:
            setattr(parent, attr, standin)
        yield
    finally:
        for parent, attr, lin, _ in swaps:
            setattr(parent, attr, lin)


def _seq_logprobs(logits: torch.Tensor, lay: "_Layout", n: int, C: int) -> torch.Tensor:
    """[n, C] mean log-probability of the target tokens per sequence, from the first M rows of
    `logits` (the target positions). A sum over a one-hot matrix, not index_add, whose CUDA
    atomics would add in a different order from run to run."""
    M = len(lay.t_ids)
    dev = logits.device
    tok_lp = torch.log_softmax(logits[:M], -1).gather(1, lay.t_ids[:, None])[:, 0]  # [M]
    per_seq = torch.zeros(n * C, M, device=dev).index_put((lay.t_seq, torch.arange(M, device=dev)), tok_lp)
    return (per_seq.sum(1) / lay.n_tok).view(n, C)


def _descend(opt: torch.optim.Optimizer, delta: torch.Tensor, active: torch.Tensor, loss: torch.Tensor,
             max_norm: torch.Tensor) -> None:
    """One Adam step on the active facts' deltas [N, d]; the frozen ones stay where they are
    (Adam's momentum would move them still); then each delta is clamped to `max_norm` [N, 1]."""
    opt.zero_grad()
    loss.backward()
    frozen = delta.detach()[~active].clone()
    opt.step()
    with torch.no_grad():
        delta[~active] = frozen
        norm = delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
        delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))


def optimise_values(lm: Any, toks: Sequence[_Tokens], hp: HParams,
                    progress: Progress | None = None, *, reuse_prefix: bool = True,
                    reuse_below: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Target residuals z [N, d] at layer hp.layers[-1] (the subject's last token of the bare
    prompt) and diagnostics. One forward/backward per step for all facts still optimising: each
    fact has its own delta, and once its mean target probability exceeds hp.early_stop_prob it
    is frozen and leaves the batch (so a batch costs no more than its facts one at a time).
    With `reuse_prefix` (the default) the tokens before each subject's last token are run once
    and their attention cache reused at every step (see `_Layout`); False feeds whole sequences
    every step (the same numbers up to round-off, at about twice the cost: the reference). With
    `reuse_below` (the default), later steps run only the layers above L, whose output δ does not
    change (`_only_above`; False: every layer). The linear layers above L compute in
    hp.value_dtype (`_low_precision`). Runs on the model's device; z comes back on the CPU."""
    model, spec, dev, L = lm.model, lm.spec, device_of(lm.model), hp.layers[-1]
    N, C, pad = len(toks), len(toks[0].ctx), pad_id_of(lm.tokenizer)
    delta = torch.zeros(N, model.get_input_embeddings().weight.shape[1], device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    active = torch.ones(N, dtype=torch.bool, device=dev)
    h0 = torch.zeros_like(delta)  # [N, d] unedited residual at the bare prompt's subject token
    kl_init = None  # [N, V] unedited log-probabilities after "{subject} is a"
    prob, steps_done = torch.zeros(N, device=dev), torch.zeros(N, dtype=torch.long, device=dev)
    low = _low_precision(model, spec, L, hp.value_dtype)  # the linear layers above L
    shared = _prefix_cache(model, spec, toks, pad, dev, low) if reuse_prefix else None
    cut = shared is not None
    lay = _layout(toks, range(N), pad, dev, cut)
    h_L, as_tuple = None, False  # [B_all, S_all, d] layer L's output at step 0 (when reused), its form
    with torch.enable_grad():
        for step in range(hp.steps + 1):
            report(progress, "values", step, hp.steps)
            n = len(lay.facts)
            below = None if h_L is None else h_L[lay.rows, :lay.ids.shape[1]]
            with _only_above(model, spec, L, below, as_tuple), capture_residual(model, spec, L) as got, \
                    add_to_residual(model, spec, L, lay.d_rows, lay.d_cols, delta[lay.d_fact]), \
                    _swapped(low):
                logits = logits_at(model, spec, lay.ids, lay.mask, lay.out_rows, lay.out_cols, position_ids=lay.pos,
                                   past_key_values=_cache_for(model, shared, lay) if cut else None).float()
            if step == 0:  # δ = 0: the unedited model; context 0 is the bare prompt
                h0 = got[L][lay.d_rows[:N * C:C], lay.d_cols[:N * C:C]].detach().clone()
                if reuse_below:
                    h_L, as_tuple = got[L].detach().clone(), bool(got.get("tuple"))
            seq_lp = _seq_logprobs(logits, lay, n, C)  # [n, C]
            prob[lay.facts] = seq_lp.detach().exp().mean(1)
            kl_lp = torch.log_softmax(logits[len(lay.t_ids):], -1)  # [n, V]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            loss_each = _loss(seq_lp, kl_lp, kl_init[lay.facts], delta[lay.facts], h0[lay.facts], hp)
            active &= prob < hp.early_stop_prob
            if _done(progress, step, hp, bool(active.any())):
                break
            steps_done += active.long()
            _descend(opt, delta, active, loss_each[active[lay.facts]].sum(), hp.clamp * h0.norm(dim=1, keepdim=True))
            if int(active.sum()) < n:
                lay = _layout(toks, active.nonzero()[:, 0].tolist(), pad, dev, cut)
    return _targets(h0, delta.detach(), prob, steps_done)


def _done(progress: Progress | None, step: int, hp: HParams, any_active: bool) -> bool:
    """Whether the value optimisation ends after `step`; one that ends before its step budget says
    why, and its progress ends there (not at step/budget, as if cut short)."""
    if not any_active and step < hp.steps:
        note(progress, "values", f"stopped after {step} of {hp.steps} steps: every fact's target "
                                 f"probability passed {hp.early_stop_prob:g}")
        report(progress, "values", step, step)
    return step == hp.steps or not any_active


def _loss(seq_lp: torch.Tensor, kl_lp: torch.Tensor, ref: torch.Tensor, delta: torch.Tensor, h0: torch.Tensor,
          hp: HParams) -> torch.Tensor:
    """[n] per-fact loss: the target's negative mean log-probability over the contexts, plus
    hp.kl_weight × KL(unedited ‖ edited) after "{subject} is a", plus hp.weight_decay × (‖δ‖/‖h‖)²."""
    kl = (ref.exp() * (ref - kl_lp)).sum(-1)  # [n]
    wd = hp.weight_decay * delta.pow(2).sum(1) / h0.pow(2).sum(1)  # [n]
    loss_each = -seq_lp.mean(1) + hp.kl_weight * kl + wd
    _check_finite(loss_each, "the value optimisation loss")
    return loss_each


def _targets(h0: torch.Tensor, delta: torch.Tensor, prob: torch.Tensor,
             steps: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """z = h0 + δ [N, d] on the CPU, checked finite, and the optimisation's diagnostics."""
    z = (h0 + delta).to("cpu", copy=True)
    _check_finite(z, "the target values")
    return z, {"target_prob": prob.tolist(), "steps": steps.tolist(),
               "delta_norm_ratio": (delta.norm(dim=1) / h0.norm(dim=1)).tolist()}


# ---- keys and spreading ---------------------------------------------------------------------

def _at_subjects(lm: Any, toks: Sequence[_Tokens]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Every context of every request as one right-padded batch, and the (rows, cols) of each
    sequence's subject's last token, on the model's device."""
    dev = device_of(lm.model)
    batch = pad_batch([c for t in toks for c in t.ctx], pad_id_of(lm.tokenizer))
    rows = torch.arange(batch.input_ids.shape[0], device=dev)
    cols = torch.tensor([s for t in toks for s in t.subj], device=dev)
    return batch, rows, cols


def context_mean(x: torch.Tensor, bare_weight: float = 0.0) -> torch.Tensor:
    """[N, C, d] → [N, d]: the mean over the contexts, or with `bare_weight` > 0 that weight on
    context 0 (the bare prompt) and the rest shared evenly by the prefixed contexts."""
    C = x.shape[1]
    if bare_weight <= 0 or C == 1:
        return x.mean(1)
    return bare_weight * x[:, 0] + (1 - bare_weight) * x[:, 1:].mean(1)


def readings(x: torch.Tensor, hp: HParams) -> torch.Tensor:
    """[N, C, d] over the contexts → the readings a constraint is stored for: [N, d] with one
    reading (`context_mean`), [N, 2, d] with two (the bare prompt's, the prefixed contexts' mean)."""
    if hp.key_readings == 1:
        return context_mean(x, hp.bare_key_weight)
    return torch.stack([x[:, 0], x[:, 1:].mean(1)], 1)


@torch.no_grad()
def measure(lm: Any, toks: Sequence[_Tokens], layer: int, z_layer: int,
            hp: HParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at `layer` and residuals at `z_layer` at the subject's last token, as `readings`
    ([N, d] or [N, 2, d]), with the model's current weights; both on the CPU. With one reading
    the residual is the bare prompt's (the one the value was optimised on). No `hp`: one reading,
    the mean over the contexts."""
    hp = hp or HParams()
    N, C = len(toks), len(toks[0].ctx)
    batch, rows, cols = _at_subjects(lm, toks)
    with capture_down_inputs(lm.model, lm.spec, [layer]) as keys, \
            capture_residual(lm.model, lm.spec, z_layer, stop=True) as res:
        run_until(lm.model, batch.input_ids, batch.attention_mask)
    K = readings(keys[layer][rows, cols].float().view(N, C, -1), hp)
    z = res[z_layer][rows, cols].float().view(N, C, -1)
    return K.cpu(), (z[:, 0] if hp.key_readings == 1 else readings(z, hp)).cpu()


@torch.no_grad()
def first_keys(lm: Any, toks: Sequence[_Tokens], layer: int, hp: HParams | None = None) -> torch.Tensor:
    """Keys at `layer` ([N, d_in] on the CPU, `records.soft_key` of the readings `measure` gives), with
    the forward ended after that layer's down-projection. At the first edited layer they depend
    only on unedited weights, so they are the keys a commit will store, known before any value is
    optimised: what soft conflicts compare."""
    hp = hp or HParams()
    N, C = len(toks), len(toks[0].ctx)
    batch, rows, cols = _at_subjects(lm, toks)
    with capture_down_inputs(lm.model, lm.spec, [layer], stop_after=layer) as keys:
        run_until(lm.model, batch.input_ids, batch.attention_mask)
    K = readings(keys[layer][rows, cols].float().view(N, C, -1), hp)
    return (K if K.ndim == 2 else K[:, -1]).cpu()  # `records.soft_key` of each fact's readings


def rows_of(kv: KV) -> KV:
    """(K, V) with the readings as rows: [N, d] stays, [N, R, d] → [N·R, d] (fact-major)."""
    K, V = kv
    return (K, V) if K.ndim == 2 else (K.reshape(-1, K.shape[-1]), V.reshape(-1, V.shape[-1]))


def _batches(c: LayerConstraints | None) -> list[KV]:
    if c is None:
        return []
    if isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], torch.Tensor):
        return [rows_of(c)]
    return [rows_of(b) for b in c]


def prepare(lm: Any, requests: Sequence[EditRequest], hp: HParams) -> list[_Tokens]:
    """Tokenise requests with their contexts; InputError on a bad request (a subject not in its
    prompt, an empty target, a sequence longer than the model's context)."""
    if not requests:
        raise InputError("no edit requests", "stage at least one fact")
    bos_id = boundary_token(lm.tokenizer, hp.bos)
    prefixes = context_prefixes(hp)
    limit = max_positions(lm.model)
    return [tokenize_request(lm.tokenizer, r, prefixes, bos_id, limit) for r in requests]


def _require_layers(hp: HParams, c0: Mapping[int, Any], W0: Mapping[int, Any]) -> None:
    missing = [la for la in hp.layers if la not in c0 or la not in W0]
    if missing:
        raise ModelError(f"no C0 or base weight for layers {missing}", "compute C0 for the edited layers")


def spread(lm: Any, toks: Sequence[_Tokens], z: torch.Tensor, hp: HParams,
           c0: Mapping[int, torch.Tensor], W0: Mapping[int, torch.Tensor],
           prior: Mapping[int, LayerConstraints] | None = None,
           progress: Progress | None = None) -> dict[int, KV]:
    """Spread target residuals z [N, d] over hp.layers, writing each layer as it goes; returns
    the new constraints. Same pre/postconditions as `compute_constraints`. The solves run in
    float64 on the model's device."""
    prior = prior or {}
    dev = device_of(lm.model)
    _require_layers(hp, c0, W0)
    L = hp.layers[-1]
    new: dict[int, KV] = {}
    target = None  # [N, d] or [N, 2, d]: the residual each reading should reach at L
    steps = hp.spread_passes * len(hp.layers)
    for step in range(steps):
        i, layer = step % len(hp.layers), hp.layers[step % len(hp.layers)]
        report(progress, "layers", step, steps)
        K, z_cur = measure(lm, toks, layer, L, hp)  # readings: [N, d_in], [N, d] or [N, 2, *]
        if target is None:  # nothing of this commit written yet: each reading's residual + δ
            target = z if z_cur.ndim == 2 else z_cur + (z - z_cur[:, 0])[:, None]
        resid = (target - z_cur) / (len(hp.layers) - i)
        if layer in new:  # a later pass: push the value out by the share still missing
            V = (new[layer][1].double() + resid.double()).float()
        else:
            W_cur = get_weight(lm.model, lm.spec, layer).double()  # [d_out, d_in]
            V = (K.double() @ W_cur.T + resid.double()).float()  # [N, (2,) d_out]
        _check_finite(V, f"the values of layer {layer}")
        new[layer] = (K, V)
        W = solve_history(W0[layer], _batches(prior.get(layer)) + [rows_of(new[layer])], c0[layer], hp.lam,
                          hp.mode, device=dev)
        _check_finite(W, f"the solved weight of layer {layer}")
        set_weight(lm.model, lm.spec, layer, W)
    report(progress, "layers", steps, steps)
    return new


def compute_constraints(lm: Any, requests: Sequence[EditRequest], hp: HParams,
                        c0: Mapping[int, torch.Tensor], W0: Mapping[int, torch.Tensor],
                        prior: Mapping[int, LayerConstraints] | None = None,
                        progress: Progress | None = None,
                        diagnostics: dict | None = None, values: Any = None) -> dict[int, KV]:
    """New constraints {layer: (K [N, d_in], V [N, d_out])} (float32, CPU) for `requests`; with
    two key readings (`HParams.key_readings`) K [N, 2, d_in] and V [N, 2, d_out].

    Precondition: lm's edited layers hold apply(prior) (W0 when prior is empty).
    Postcondition: they hold apply(prior + new), solved with hp.mode. `prior[layer]` is one
    (K, V) or the list of commits' (K, V) in order. `diagnostics`, if given, receives the value
    optimisation's per-fact target probabilities and step counts. `values(lm, requests, hp,
    progress)`, if given, does the value optimisation instead of this process (kledger.edit.scale:
    across Ray workers) and returns what `optimise_values` returns."""
    toks = prepare(lm, requests, hp)
    _require_layers(hp, c0, W0)
    z, info = values(lm, requests, hp, progress) if values is not None else optimise_values(lm, toks, hp, progress)
    new = spread(lm, toks, z, hp, c0, W0, prior, progress)
    if diagnostics is not None:
        diagnostics.update(info)
    return new

