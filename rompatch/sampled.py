"""Statistics text the model writes itself: the source that is always there.

When no corpus is given, no WikiText-2 is under ``$ROMPATCH_DATA`` and the Hub cannot be read,
C = E[k kᵀ] is estimated on text sampled from the model being edited. The keys then follow the
model's own distribution over text rather than a corpus's, which is what C stands for in ROME
(the keys the edited matrix normally sees).

Sampling is seeded and batched: batch ``b`` of ``batch`` sequences is generated from
``seed`` and ``b`` alone, so a larger budget extends a smaller one and every batch is cached on
its own under ``$ROMPATCH_CACHE/samples``. Each sequence starts (after BOS, where the tokenizer
adds one) with the first token of an opener word drawn from ``OPENERS`` — encyclopedic,
narrative, conversational and technical beginnings — and continues by nucleus sampling at
temperature 1 for exactly ``seq_len`` tokens. The identity (model weights, tokenizer, every
setting) goes into the statistics identity and so into each patch made with them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .cached import identity_key, read_cached, write_cached
from .constants import DEFAULT_SAMPLED_TOKENS, cache_dir
from .fingerprint import tensor_sha256
from .placement import input_device, named_values
from .tokens import bos_prefix

log = logging.getLogger(__name__)

SAMPLER_VERSION = 1

# First words of the sampled texts: varied registers, so the keys are not all from one kind of text.
OPENERS = (
    "The", "In", "A", "He", "She", "It", "They", "We", "I", "This",
    "During", "After", "According", "Born", "Located", "Founded", "Its", "His", "Her", "There",
    "On", "For", "When", "As", "Although", "Many", "Most", "Some", "One", "Today",
    "History", "Science", "Music", "Sports", "Football", "Paris", "London", "John", "Mary", "Dr",
    "How", "Why", "What", "Who", "Yes", "No", "Note", "Chapter", "Introduction", "Abstract",
    "Q", "Dear", "Once", "If", "While", "Since", "Before", "Under", "Between", "Every",
    "Our", "Your", "My", "Their",
)  # fmt: skip


@dataclass(frozen=True)
class SamplerSettings:
    """How the text is sampled. Every field is part of the identity."""

    seed: int = 0
    seq_len: int = 128  # tokens per sequence, BOS and opener included (edit prompts are short)
    batch: int = 64  # sequences per generated (and cached) batch
    top_p: float = 0.95
    temperature: float = 1.0


def _opener_ids(tok: Any) -> list[int]:
    """The first token of each opener word (distinct, in ``OPENERS`` order)."""
    ids: list[int] = []
    for w in OPENERS:
        t = tok(w, add_special_tokens=False)["input_ids"]
        if t and t[0] not in ids:
            ids.append(t[0])
    return ids


def model_sha256(model: Any) -> str:
    """sha256 over every parameter's name and bytes: the sampler is the whole model."""
    h = hashlib.sha256()
    for name, p in named_values(model):
        h.update(name.encode())
        h.update(tensor_sha256(p).encode())
    return h.hexdigest()


def sampler_identity(model: Any, tok: Any, settings: SamplerSettings, tokenizer_sha: str) -> dict[str, Any]:
    return {
        "source": "sampled",
        "sampler_version": SAMPLER_VERSION,
        "model_sha256": model_sha256(model),
        "tokenizer_sha256": tokenizer_sha,
        **asdict(settings),
        "openers_sha256": hashlib.sha256(json.dumps(OPENERS).encode()).hexdigest()[:16],
    }


def _batch_path(identity: dict[str, Any], b: int) -> Path:
    return cache_dir() / "samples" / identity_key(identity, 32) / f"batch-{b:05d}.safetensors"


@torch.no_grad()
def _generate_batch(model: Any, tok: Any, settings: SamplerSettings, b: int) -> torch.Tensor:
    device = input_device(model)
    prefix = bos_prefix(tok)
    openers = _opener_ids(tok)
    new = settings.seq_len - len(prefix) - 1
    if new < 1:
        raise ValueError(f"seq_len {settings.seq_len} leaves no room for sampled tokens")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed * 1_000_003 + b)
        pick = torch.randint(len(openers), (settings.batch,))
        start = torch.tensor([prefix + [openers[i]] for i in pick.tolist()], dtype=torch.long)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = model.generate(
            input_ids=start.to(device),
            attention_mask=torch.ones_like(start).to(device),
            do_sample=True,
            top_k=0,
            top_p=settings.top_p,
            temperature=settings.temperature,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
            use_cache=True,
        )
    return out.to("cpu", torch.int32)


def sampled_chunks(
    model: Any,
    tok: Any,
    identity: dict[str, Any],
    settings: SamplerSettings,
    n_tokens: int,
    *,
    progress: bool = False,
) -> Iterator[list[int]]:
    """Yield token sequences of ``settings.seq_len`` until ``n_tokens`` tokens (cached per batch)."""
    from tqdm.auto import tqdm

    n_seqs = math.ceil(n_tokens / settings.seq_len)
    n_batches = math.ceil(n_seqs / settings.batch)
    bar = tqdm(
        total=n_batches, desc="sampling statistics text", unit="batch", disable=not progress, leave=False
    )
    left = n_seqs
    try:
        for b in range(n_batches):
            path = _batch_path(identity, b)
            entry = read_cached(path, identity)
            ids = entry[0].get("ids") if entry is not None else None
            if ids is None:
                ids = _generate_batch(model, tok, settings, b)
                try:
                    write_cached(path, identity, {"ids": ids})
                except OSError as e:  # a read-only cache is not fatal
                    log.warning("could not cache sampled text: %s", e)
            bar.update(1)
            yield from ids[: min(left, settings.batch)].tolist()
            left -= settings.batch
    finally:
        bar.close()


__all__ = [
    "DEFAULT_SAMPLED_TOKENS",
    "OPENERS",
    "SamplerSettings",
    "model_sha256",
    "sampled_chunks",
    "sampler_identity",
]
