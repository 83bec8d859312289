"""Batched, seeded top-k sampling with a KV cache (ROME's ``generate_fast``, batched).

Batches are left-padded with explicit position ids, so each prompt sees exactly what it would see
alone. A ``torch.Generator`` seeded per call makes the same prompts give the same texts on the same
model. ``top_k=1`` is greedy decoding. Used by the fluency metrics, the audit's probes and the search
for an edit's neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .models import cache_kwarg
from .placement import input_device
from .tokens import encode, pad_id


@torch.no_grad()
def sample_topk_ids(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_out_len: int,
    top_k: int,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[int]]:
    """Token ids (prompt + sampled continuation, ``max_out_len`` tokens in all) per prompt: top-k
    sampling from the last position's softmax renormalised over the k tokens, no temperature."""
    device = input_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(tok, p) for p in prompts[start : start + batch_size]]
        out += _sample_batch(model, tok, chunk, max_out_len, top_k, gen, device)
    return out


def _sample_batch(model, tok, seqs, max_out_len, top_k, gen, device) -> list[list[int]]:
    B, L = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, L), pad_id(tok), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding: every prompt ends at column L-1
        ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L) positions of real tokens start at 0
    need = [max(0, max_out_len - len(s)) for s in seqs]
    new = torch.zeros((B, max(need)), dtype=torch.long, device=device)
    cache_kw = cache_kwarg(model)
    past = None
    step_ids, step_pos = ids, pos
    for t in range(max(need)):
        res = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: past},
        )
        past = getattr(res, cache_kw, None)
        probs = torch.softmax(res.logits[:, -1, :].float(), dim=-1)  # (B, V)
        top = torch.topk(probs, top_k, dim=-1)
        p = top.values / top.values.sum(-1, keepdim=True)
        choice = torch.multinomial(p, 1, generator=gen)  # (B, 1)
        nxt = top.indices.gather(1, choice)  # (B, 1)
        new[:, t] = nxt[:, 0]
        step_ids = nxt
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    return [list(s) + new[i, : need[i]].tolist() for i, s in enumerate(seqs)]
