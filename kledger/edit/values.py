"""The value optimisation: for each fact, the residual change δ at the last edited layer (at the
subject's last token) that makes the model produce the target, all facts of a batch optimised
together (see `optimise_values`). Shapes: N facts, C contexts, d residual width."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from ..errors import ModelError
from ..settings import Progress, note, report
from .device import device_of
from .hooks import add_to_residual, capture_residual, head_logits, hidden_at, pad_batch, pad_id_of, returned_cache
from .hparams import HParams
from .spec import get_module

if TYPE_CHECKING:
    from .engine import _Tokens


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ModelError(f"non-finite values in {what} during the edit",
                         "lower the learning rate or check the model weights")


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


def _cache_for(model: Any, shared: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, P: int) -> Any:
    """A fresh cache holding the first `P` cached positions of the sequences in `rows` of the
    layout of all facts (a forward appends to it)."""
    from transformers import DynamicCache

    return DynamicCache([(K[rows, :, :P], V[rows, :, :P]) for K, V in shared], config=model.config)


@dataclass(frozen=True)
class _Group:
    """Sequences of a layout whose fed parts have about one length, fed together with little
    padding (a padded position costs what a real one does in every layer), with the cache cut to
    the group's longest cut. Indexes into the layout's sequences (`seq`), δ entries (`d_idx`) and
    output positions (`out_idx`); `d_rows` and `out_rows` are the group's own rows."""

    seq: torch.Tensor
    d_idx: torch.Tensor
    d_rows: torch.Tensor
    out_idx: torch.Tensor
    out_rows: torch.Tensor
    S: int  # fed tokens per sequence
    P: int  # cached positions kept


GROUP_COST = 40  # a forward of its own costs about this many fed tokens (CPU: small products run slower)


def _groups(lay: _Layout, by_length: bool = True) -> list[_Group]:
    """`lay`'s sequences in groups of nearby fed lengths (one padded group without `by_length`):
    the grouping of the sorted lengths with the fewest fed positions, padding included, counting
    GROUP_COST positions for each group."""
    fed = lay.mask[:, lay.prefix:].sum(1).cpu()
    cached = lay.mask[:, :lay.prefix].sum(1).cpu()
    lengths, counts = fed.unique(return_counts=True)
    lengths, counts = lengths.tolist(), counts.tolist()
    best, cut_at = [0.0], []  # best[j]: cheapest grouping of the j shortest lengths; its last group's start
    for j in range(1, len(lengths) + 1):
        cost = [best[i] + GROUP_COST + sum(counts[i:j]) * lengths[j - 1] for i in range(j)]
        i = min(range(j), key=cost.__getitem__) if by_length else 0
        best.append(cost[i]), cut_at.append(i)
    bounds, j = [], len(lengths)
    while j:
        bounds.append((lengths[cut_at[j - 1]], lengths[j - 1]))
        j = cut_at[j - 1]
    d_rows, out_rows = lay.d_rows.cpu(), lay.out_rows.cpu()
    local = torch.full((len(fed),), -1, dtype=torch.long)
    out, dev = [], lay.ids.device
    for lo, hi in reversed(bounds):
        seq = ((fed >= lo) & (fed <= hi)).nonzero()[:, 0]
        local[seq] = torch.arange(len(seq))
        d_idx, o_idx = (local[d_rows] >= 0).nonzero()[:, 0], (local[out_rows] >= 0).nonzero()[:, 0]
        out.append(_Group(seq.to(dev), d_idx.to(dev), local[d_rows[d_idx]].to(dev), o_idx.to(dev),
                          local[out_rows[o_idx]].to(dev), int(hi),
                          max(int(cached[seq].max()), min(lay.prefix, 1))))  # a cache of 0 positions: none
        local[seq] = -1
    return out


def _forward(model: Any, spec: Any, L: int, lay: _Layout, groups: Sequence[_Group], delta: torch.Tensor,
             shared: list[tuple[torch.Tensor, torch.Tensor]] | None, h_L: torch.Tensor | None,
             as_tuple: bool, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """One value-optimisation forward of `lay`, group by group, then the LM head once (reading its
    weight is much of its cost): the logits at the layout's output positions (in its order), layer
    L's output [B, S, d] (before δ; zero past each group's fed width; with `keep`, else None) and
    whether the layer returns a tuple. `h_L` (layer L's output at step 0, rows of the layout of
    all facts) stands in for the layers at and below L (`_only_above`); None runs them."""
    hidden, h, tup = [], None, as_tuple
    for g in groups:
        ids, pos, rows = lay.ids[g.seq, :g.S], lay.pos[g.seq, :g.S], lay.rows[g.seq]
        mask = torch.cat([lay.mask[g.seq, :g.P], lay.mask[g.seq, lay.prefix:lay.prefix + g.S]], 1)
        below = None if h_L is None else h_L[rows, :g.S]
        with _only_above(model, spec, L, below, as_tuple), capture_residual(model, spec, L) as got, \
                add_to_residual(model, spec, L, g.d_rows, lay.d_cols[g.d_idx], delta[lay.d_fact[g.d_idx]]):
            hidden.append(hidden_at(model, spec, ids, mask, g.out_rows, lay.out_cols[g.out_idx], position_ids=pos,
                                    past_key_values=None if shared is None else _cache_for(model, shared, rows, g.P)))
        if keep:
            h = got[L].new_zeros(*lay.ids.shape, got[L].shape[-1]) if h is None else h
            h[g.seq, :g.S] = got[L]
            tup = bool(got.get("tuple"))
    order = torch.cat([g.out_idx for g in groups]).argsort()
    return head_logits(model, spec, torch.cat(hidden)[order]).float(), h, tup


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


def _descend(opt: torch.optim.Optimizer | None, delta: torch.Tensor, active: torch.Tensor, loss: torch.Tensor,
             h_norm: torch.Tensor, hp: HParams) -> None:
    """One step on the active facts' deltas [N, d]: Adam's (`opt`), or with hp.step_norm > 0 (and
    `opt` None) a step of hp.step_norm × ‖h‖ along each delta's negative gradient; the frozen ones
    stay where they are (Adam's momentum would move them still); then each delta is clamped to
    hp.clamp × ‖h‖ (`h_norm` [N, 1])."""
    delta.grad = None  # Adam's zero_grad, and a fresh gradient for a plain step
    loss.backward()
    frozen = delta.detach()[~active].clone()
    with torch.no_grad():
        if opt is not None:
            opt.step()
        else:
            g = delta.grad
            delta.sub_(hp.step_norm * h_norm * g / g.norm(dim=1, keepdim=True).clamp_min(1e-30))
        delta[~active] = frozen
        max_norm = hp.clamp * h_norm
        norm = delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
        delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))


def optimise_values(lm: Any, toks: Sequence[_Tokens], hp: HParams,
                    progress: Progress | None = None, *, reuse_prefix: bool = True,
                    reuse_below: bool = True, by_length: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Target residuals z [N, d] at layer hp.layers[-1] (the subject's last token of the bare prompt)
    and diagnostics. A forward (group by group) and backward per step for all facts still optimising
    (Adam's step, or with hp.step_norm a gradient step of that length relative to ‖h‖: `_descend`):
    each fact has its own delta, and once its mean target probability exceeds hp.early_stop_prob it
    is frozen and leaves the batch. With `reuse_prefix` (these three are on by default) the tokens
    before each subject's last token run once, their attention cache reused at every step
    (`_Layout`; False, the reference: whole sequences, twice the cost). With `reuse_below`, later
    steps run only the layers above L, whose output δ does not change (`_only_above`; False: every
    layer). With `by_length` a CPU step feeds the sequences in groups of about one fed length,
    little padding computed (`_groups`; False, and on a GPU, where padding is cheap: one padded
    batch). Each way gives the same numbers up to round-off. The linear layers above L compute in
    hp.value_dtype (`_low_precision`). On the model's device, z returned on the CPU."""
    model, spec, dev, L = lm.model, lm.spec, device_of(lm.model), hp.layers[-1]
    N, C, pad = len(toks), len(toks[0].ctx), pad_id_of(lm.tokenizer)
    delta = torch.zeros(N, model.get_input_embeddings().weight.shape[1], device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr) if not hp.step_norm else None
    active = torch.ones(N, dtype=torch.bool, device=dev)
    h0 = torch.zeros_like(delta)  # [N, d] unedited residual at the bare prompt's subject token
    kl_init = None  # [N, V] unedited log-probabilities after "{subject} is a"
    prob, steps_done = torch.zeros(N, device=dev), torch.zeros(N, dtype=torch.long, device=dev)
    low = _low_precision(model, spec, L, hp.value_dtype)  # the linear layers above L
    shared = _prefix_cache(model, spec, toks, pad, dev, low) if reuse_prefix else None
    cut = shared is not None
    lay = _layout(toks, range(N), pad, dev, cut)
    by_length = by_length and dev.type == "cpu"
    groups = _groups(lay, by_length)
    h_L, as_tuple = None, False  # [B_all, S_all, d] layer L's output at step 0 (when reused), its form
    with torch.enable_grad():
        for step in range(hp.steps + 1):
            report(progress, "values", step, hp.steps)
            n = len(lay.facts)
            with _swapped(low):
                logits, got, as_tuple = _forward(model, spec, L, lay, groups, delta, shared, h_L, as_tuple, step == 0)
            if got is not None:  # step 0, δ = 0: the unedited model; context 0 is the bare prompt
                h0 = got[lay.d_rows[:N * C:C], lay.d_cols[:N * C:C]].clone()
                if reuse_below:
                    h_L = got
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
            _descend(opt, delta, active, loss_each[active[lay.facts]].sum(), h0.norm(dim=1, keepdim=True), hp)
            if int(active.sum()) < n:
                lay = _layout(toks, active.nonzero()[:, 0].tolist(), pad, dev, cut)
                groups = _groups(lay, by_length)
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
