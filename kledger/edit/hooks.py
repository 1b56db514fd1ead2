"""Scoped forward hooks and tokenisation helpers. Every hook is removed when its `with` block
ends, also on error. Shapes: B sequences, T tokens, d_in the down-projection's input width,
d the residual width."""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .device import device_of
from .spec import ArchSpec, down_proj, get_module, layer_module


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early; caught by `run_until`."""


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_down_inputs(model: Any, spec: ArchSpec, layers: Sequence[int],
                        stop_after: int | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input [B, T, d_in] of each layer's down-projection into the yielded dict
    (detached). With `stop_after`, the forward ends after that layer's down-projection; run the
    forward through `run_until`."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def pre(_mod, args, _layer=layer):
            got[_layer] = args[0].detach()
        handles.append(down_proj(model, spec, layer).register_forward_pre_hook(pre))
    if stop_after is not None:
        def stop(_mod, _args, _out):
            raise _StopForward
        handles.append(down_proj(model, spec, stop_after).register_forward_hook(stop))
    with _hooks(handles):
        yield got


@contextlib.contextmanager
def capture_residual(model: Any, spec: ArchSpec, layer: int,
                     stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output of decoder layer `layer` (the residual stream, [B, T, d]) under its
    number, and whether the layer returns a tuple under "tuple"; with `stop`, end the forward
    there."""
    got: dict = {}

    def hook(_mod, _args, out):
        got[layer] = (out[0] if isinstance(out, tuple) else out).detach()
        got["tuple"] = isinstance(out, tuple)  # the layer's output form
        if stop:
            raise _StopForward

    with _hooks([layer_module(model, spec, layer).register_forward_hook(hook)]):
        yield got


@contextlib.contextmanager
def add_to_residual(model: Any, spec: ArchSpec, layer: int, rows: torch.Tensor, cols: torch.Tensor,
                    delta: torch.Tensor) -> Iterator[None]:
    """Add delta[j] [d] to the output of decoder layer `layer` at (rows[j], cols[j]) (differentiably)."""
    def hook(_mod, _args, out):
        h = out[0] if isinstance(out, tuple) else out  # [B, T, d]
        add = torch.zeros_like(h)
        add = add.index_put((rows.to(h.device), cols.to(h.device)), delta.to(h.device, h.dtype))
        h = h + add
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    with _hooks([layer_module(model, spec, layer).register_forward_hook(hook)]):
        yield


def run_until(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """Forward pass (on the model's device) that may be ended early by a stop hook; returns the
    output or None."""
    dev = device_of(model)
    try:
        return model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False)
    except _StopForward:
        return None


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands an attention cache to `model`'s forward: `cache` in transformers 5.x
    (where `past_key_values` is deprecated), `past_key_values` before."""
    return {_cache_keyword(type(model).forward): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward: Any) -> str:
    """Looked up once per forward function (it is asked at every decoding and optimisation step)."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def growing_cache(model: Any) -> Any:
    """An empty attention cache for token-by-token decoding that grows its key and value buffers
    by doubling and hands attention views of them, instead of concatenating the whole cache at
    every token (a fifth of a decoding step on the CPU at 128 tokens). The same keys and values
    as transformers' DynamicCache, so the same outputs. None before transformers 5 (its cache
    layers differ from version to version) and for layouts other than plain full attention: the
    model then makes its own cache, with the same outputs, only slower."""
    try:
        import transformers
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    if int(transformers.__version__.split(".")[0]) < 5:
        return None

    class _Growing(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            bufs = getattr(self, "_bufs", None)
            used = getattr(self, "_used", 0)
            n = used + key_states.shape[-2]
            if bufs is None or n > bufs[0].shape[-2]:
                grown = []
                for old, new in zip(bufs or (None, None), (key_states, value_states)):
                    shape = list(new.shape)
                    shape[-2] = max(2 * n, 16)
                    buf = new.new_empty(shape)
                    if old is not None:
                        buf[..., :used, :] = old[..., :used, :]
                    grown.append(buf)
                bufs = self._bufs = tuple(grown)
            bufs[0][..., used:n, :] = key_states
            bufs[1][..., used:n, :] = value_states
            self._used, self.device, self.is_initialized = n, key_states.device, True
            self.keys, self.values = bufs[0][..., :n, :], bufs[1][..., :n, :]
            return self.keys, self.values

    try:
        cache = DynamicCache(config=model.config)
        if any(type(la) is not DynamicLayer for la in cache.layers):  # sliding windows & co.: left as they are
            return None
        for la in cache.layers:
            la.__class__ = _Growing
        return cache
    except Exception:  # another cache layout: the model makes its own
        return None


def returned_cache(out: Any) -> Any:
    """The attention cache a forward returned (`cache` in transformers 5.x, `past_key_values` before)."""
    got = out.get("cache") if hasattr(out, "get") else None
    return got if got is not None else getattr(out, "past_key_values", None)


def logits_at(model: Any, spec: ArchSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor, *, position_ids: torch.Tensor | None = None,
              past_key_values: Any = None) -> torch.Tensor:
    """Logits [M, V] at positions (rows[j], cols[j]) only: the decoder stack runs on all tokens,
    the lm head (the largest matmul of a small model) on the M positions needed. Inputs may be
    on the CPU; the logits are on the model's device. With `past_key_values` (an attention cache
    of P positions), `attention_mask` covers P + T positions and `position_ids` [B, T] places the
    fed tokens."""
    return head_logits(model, spec, hidden_at(model, spec, input_ids, attention_mask, rows, cols,
                                              position_ids=position_ids, past_key_values=past_key_values))


def hidden_at(model: Any, spec: ArchSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor, *, position_ids: torch.Tensor | None = None,
              past_key_values: Any = None) -> torch.Tensor:
    """The decoder stack's final hidden states [M, d] at positions (rows[j], cols[j]) (the
    arguments as `logits_at`'s)."""
    dev = device_of(model)
    base = get_module(model, spec.layers.rsplit(".", 1)[0])
    extra: dict[str, Any] = {"use_cache": past_key_values is not None}
    if position_ids is not None:
        extra["position_ids"] = position_ids.to(dev)
    if past_key_values is not None:
        extra.update(cache_kwargs(base, past_key_values))
    h = base(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), **extra).last_hidden_state
    return h[rows.to(dev), cols.to(dev)]


def head_logits(model: Any, spec: ArchSpec, h: torch.Tensor) -> torch.Tensor:
    """The LM head's logits [M, V] for final hidden states [M, d] (soft-capped where the model does)."""
    logits = get_module(model, spec.lm_head)(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# ---- tokenisation ---------------------------------------------------------------------------

def boundary_token(tokenizer: Any, bos: str) -> int | None:
    """The document-boundary token to prepend to every sequence, or None. "auto" prepends one
    when the tokenizer adds none by itself (SmolLM2, GPT-2); "always" prepends one regardless;
    "never" none. The token: `<|endoftext|>` if the vocabulary has it, else BOS, else EOS."""
    if bos == "never":
        return None
    if bos == "auto":
        probe = tokenizer("a").input_ids
        specials = {tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
        if probe and probe[0] in specials:
            return None
    vocab = tokenizer.get_vocab()
    for cand in (vocab.get("<|endoftext|>"), tokenizer.bos_token_id, tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    return None


def encode(tokenizer: Any, text: str, bos_id: int | None = None) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    return ([bos_id] if bos_id is not None else []) + ids


def split_target(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids), no boundary token: the target tokenised as the continuation of
    the prompt after a space (the ids of prompt + " " + target after the prompt's own), or as
    " " + target alone when the prompt's tokens change at the seam. The target's ids may be
    empty; the caller says what that means."""
    p = encode(tokenizer, prompt)
    full = encode(tokenizer, prompt + " " + target)
    return p, (full[len(p):] if full[:len(p)] == p else encode(tokenizer, " " + target))


@dataclass(frozen=True)
class Padded:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] 1 = token, 0 = padding
    lengths: list[int]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0, *, left: bool = False) -> Padded:
    """Pad token lists into a batch: on the right (positions stay 0..len-1 for every sequence),
    or with `left` on the left (every sequence ends in the last column, as generation needs)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        lo = T - len(s) if left else 0
        ids[i, lo:lo + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, lo:lo + len(s)] = 1
    return Padded(ids, mask, [len(s) for s in seqs])


def pad_id_of(tokenizer: Any) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0
