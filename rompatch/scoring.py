"""Sequence log-probabilities of targets after prompts, batched (used by evaluation and create)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .placement import input_device
from .request import EditRequest
from .tokens import encode, pad_id, pad_right, target_ids


@torch.no_grad()
def target_logprobs(
    model: Any, tok: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 64
) -> torch.Tensor:
    """(len(prompts), len(targets)) full-sequence log P(target | prompt), summed over target tokens."""
    device = input_device(model)
    items = []  # (prompt index, target index, prompt ids, target ids)
    for i, p in enumerate(prompts):
        pids = encode(tok, p)
        for j, t in enumerate(targets):
            tids, _ = target_ids(tok, p, t)
            items.append((i, j, pids, tids))
    out = torch.zeros(len(prompts), len(targets), dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = pad_right([pi + ti for _, _, pi, ti in chunk], pad_id(tok)).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1)
        for r, (i, j, pi, ti) in enumerate(chunk):
            pos = torch.arange(len(pi) - 1, len(pi) - 1 + len(ti), device=device)
            out[i, j] = logp[r, pos, torch.tensor(ti, device=device)].sum().double().cpu()
    return out


def probe(model: Any, tok: Any, req: EditRequest) -> dict[str, float]:
    """P(target_new) (``p_new``) and, when the request names it, P(target_true) (``p_true``) after
    the request's prompt: what a patch records at creation, before and after."""
    targets = [req.target_new] + ([req.target_true] if req.target_true else [])
    lp = target_logprobs(model, tok, [req.text], targets)[0]
    out = {"p_new": math.exp(lp[0])}
    if req.target_true:
        out["p_true"] = math.exp(lp[1])
    return out
