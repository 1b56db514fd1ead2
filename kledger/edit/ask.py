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
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    text = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return {"answer": " ".join(text.split()),
            "top": [{"token": tok.decode([int(i)]), "prob": float(q)} for q, i in zip(p.tolist(), idx.tolist())]}


@torch.no_grad()
def next_token_probs(lm: Any, prompt: str, bos: str = "auto") -> torch.Tensor:
    """The next-token distribution [V] after `prompt`."""
    ids = torch.tensor([encode(lm.tokenizer, prompt, boundary_token(lm.tokenizer, bos))], device=device_of(lm.model))
    return torch.softmax(lm.model(input_ids=ids).logits[0, -1].float(), dim=-1).cpu()
