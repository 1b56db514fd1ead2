"""What the model says: greedy answer and the top next tokens with probabilities."""

from __future__ import annotations

from typing import Any

import torch

from .device import device_of
from .hooks import boundary_token, encode
from .weights import quiet_transformers


@torch.no_grad()
def answer(lm: Any, prompt: str, top: int = 5, max_new_tokens: int = 8, bos: str = "auto") -> dict:
    """Encoded as the edit engine encodes prompts (with the document-boundary token per `bos`)."""
    tok, model = lm.tokenizer, lm.model
    bos_id = boundary_token(tok, bos)
    ids = torch.tensor([encode(tok, prompt, bos_id)], device=device_of(model))  # [1, T]
    probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)  # [V]
    p, idx = probs.topk(top)
    with quiet_transformers():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens + WORD_TAIL,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new = gen[0, ids.shape[1]:].tolist()
    text = whole_words(tok.decode(new[:max_new_tokens], skip_special_tokens=True),
                       tok.decode(new, skip_special_tokens=True), len(new) > max_new_tokens)
    return {"answer": " ".join(text.split()),
            "top": [{"token": tok.decode([int(i)]), "prob": float(q)} for q, i in zip(p.tolist(), idx.tolist())]}


WORD_TAIL = 4  # tokens generated past the answer's length to finish its last word


def whole_words(head: str, longer: str, more: bool) -> str:
    """`head` (the first tokens of a continuation) ending on a whole word: finished from `longer`
    (the same continuation a few tokens on) when it ends there, else cut before the unfinished
    word with "…". `more`: whether the continuation went on past `head`."""
    if not more or not longer.startswith(head) or not head or head[-1].isspace():
        return head
    tail = longer[len(head):]
    for i, ch in enumerate(tail):
        if ch.isspace():
            return head + tail[:i]
    words = head.rstrip().rsplit(None, 1)
    return (words[0] + " …") if len(words) == 2 else head + tail + " …"


@torch.no_grad()
def next_token_probs(lm: Any, prompt: str, bos: str = "auto") -> torch.Tensor:
    """The next-token distribution [V] after `prompt`."""
    ids = torch.tensor([encode(lm.tokenizer, prompt, boundary_token(lm.tokenizer, bos))], device=device_of(lm.model))
    return torch.softmax(lm.model(input_ids=ids).logits[0, -1].float(), dim=-1).cpu()
