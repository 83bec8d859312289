"""What a model says next: top-k next tokens and greedy continuations (for ``rompatch predict``)."""

from __future__ import annotations

from typing import Any

import torch

from .placement import input_device as _device  # where token ids go (any placement)


@torch.no_grad()
def top_next_tokens(model: Any, tok: Any, prompt: str, *, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
    enc = tok(prompt, return_tensors="pt").to(_device(model))
    logits = model(**enc).logits[0, -1].float()
    probs = torch.softmax(logits, dim=-1)
    p, idx = probs.topk(k)
    return [(tok.decode([int(i)]), float(x)) for x, i in zip(p, idx)]


@torch.no_grad()
def greedy(model: Any, tok: Any, prompt: str, *, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` (special tokens removed)."""
    enc = tok(prompt, return_tensors="pt").to(_device(model))
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        top_p=None,
        top_k=None,
        temperature=None,
    )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
