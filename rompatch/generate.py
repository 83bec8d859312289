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
        out += _sample_batch(model, tok, chunk, max_out_len, top_k, [gen], device)
    return out


@torch.no_grad()
def sample_topk_rounds(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    max_out_len: int,
    top_k: int,
    batch_size: int = 16,
) -> list[list[list[int]]]:
    """``[sample_topk_ids(model, tok, prompts, seed=s, batch_size=batch_size, ...) for s in seeds]``,
    the same tokens, with the rounds run as one batch: each round's rows draw from their own
    generator, seeded as that call would seed it. One forward pass of 32 rows costs well under four of
    8 rows on a CPU, where a small batch's step is bound by reading the weights (bench_neighbours)."""
    if len(prompts) > batch_size:  # sample_topk_ids would split a round over several batches
        return [
            sample_topk_ids(
                model, tok, prompts, max_out_len=max_out_len, top_k=top_k, seed=s, batch_size=batch_size
            )
            for s in seeds
        ]
    device = input_device(model)
    seqs = [encode(tok, p) for p in prompts]
    rows = _sample_batch(
        model,
        tok,
        seqs * len(seeds),
        max_out_len,
        top_k,
        [torch.Generator(device=device).manual_seed(s) for s in seeds],
        device,
    )
    return [rows[i * len(seqs) : (i + 1) * len(seqs)] for i in range(len(seeds))]


def _sample_batch(model, tok, seqs, max_out_len, top_k, gens, device) -> list[list[int]]:
    """``gens`` split the rows into equal consecutive groups, each sampled with its own generator."""
    B, L = len(seqs), max(len(s) for s in seqs)
    per = B // len(gens)
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
        choice = torch.cat(
            [torch.multinomial(p[i * per : (i + 1) * per], 1, generator=g) for i, g in enumerate(gens)]
        )  # (B, 1)
        nxt = top.indices.gather(1, choice)  # (B, 1)
        new[:, t] = nxt[:, 0]
        step_ids = nxt
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    return [list(s) + new[i, : need[i]].tolist() for i, s in enumerate(seqs)]
