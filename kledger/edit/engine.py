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

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch

from ..errors import InputError, ModelError
from ..settings import Progress, report
from .device import device_of
from .hooks import (
    boundary_token,
    capture_down_inputs,
    capture_residual,
    encode,
    pad_batch,
    pad_id_of,
    run_until,
    split_target,
)
from .hparams import HParams
from .solve import KV, solve_history
from .spec import get_weight, set_weight
from .values import _check_finite, optimise_values

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

