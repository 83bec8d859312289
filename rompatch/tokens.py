"""Tokenizer handling shared by editing, evaluation and tracing.

Everything is done on token ids built by us, never by re-tokenising decoded strings:
- prompts are encoded exactly as the tokenizer does for a user (BOS included when it adds one);
- the subject's tokens are found by character offsets, so BOS, SentencePiece "▁" pieces and
  byte-level "Ġ" pieces all work;
- a target's ids are the tokens that follow the prompt in ``prompt + " " + target`` (the leading
  space belongs to the target, as in running text); if the tokenizer merges across that boundary we
  fall back to encoding ``" " + target`` alone, and say so in the hyperparameters;
- batches are right-padded by us with the attention mask, whatever the tokenizer's padding side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RequestError


def bos_prefix(tok: Any) -> list[int]:
    """The special tokens the tokenizer puts before text (``[bos]`` for Gemma and Llama-2, else [])."""
    bos = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return list(bos[: len(bos) - len(plain)]) if bos[len(bos) - len(plain) :] == plain else []


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees a prompt (special tokens such as BOS included)."""
    return list(tok(text, add_special_tokens=True)["input_ids"])


def token_spans(tok: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` as the model sees a prompt (special tokens included) and each token's
    character span in ``text``; special tokens (BOS, EOS) get the empty span ``(0, 0)``."""
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    special = set(tok.all_special_ids)
    spans = [(0, 0) if i in special else (int(s), int(e)) for i, (s, e) in zip(ids, enc["offset_mapping"])]
    return ids, spans


def subject_token_span(tok: Any, text: str, char_start: int, char_end: int) -> tuple[int, int]:
    """Token indices [first, last] covering characters [char_start, char_end) of ``text``."""
    _, spans = token_spans(tok, text)
    covering = [i for i, (s, e) in enumerate(spans) if e > s and s < char_end and e > char_start]
    if not covering:
        raise RequestError(
            f"subject {text[char_start:char_end]!r} is not found in the prompt's tokens of {text!r}; "
            "check the prompt and subject"
        )
    return covering[0], covering[-1]


def subject_span(tok: Any, template: str, subject: str) -> tuple[str, int, int]:
    """Fill ``template`` ('... {} ...') with ``subject``; return (text, first_token, last_token)."""
    if template.count("{}") != 1:
        raise RequestError(f"prompt {template!r} must contain exactly one '{{}}' where the subject goes")
    start = template.index("{}")
    text = template.replace("{}", subject)
    first, last = subject_token_span(tok, text, start, start + len(subject))
    return text, first, last


def find_subject(tok: Any, text: str, subject: str) -> tuple[int, int]:
    """Token indices [first, last] of the first occurrence of ``subject`` in ``text`` (a prompt with
    the subject written in it, as tracing takes it; ``subject_span`` takes a '{}' template)."""
    if not subject or not subject.strip():
        raise RequestError("the subject is empty; pass the subject exactly as it appears in the prompt")
    start = text.find(subject)
    if start < 0:
        raise RequestError(
            f"subject {subject!r} does not occur in prompt {text!r}; pass it exactly as written in the prompt"
        )
    return subject_token_span(tok, text, start, start + len(subject))


def target_ids(tok: Any, prompt_text: str, target: str) -> tuple[list[int], str]:
    """Ids of ``target`` as the continuation of ``prompt_text``, and how they were found.

    The target is placed after one space (``"... in" + " Rome"``), which is how it appears in
    running text for byte-level BPE (GPT-2, Llama 3, SmolLM) and SentencePiece (Llama 2, Gemma)
    tokenizers alike. Trailing EOS added by a tokenizer is dropped.
    """
    if not target.strip():
        raise RequestError("target is empty; pass the new object of the fact, e.g. 'Rome'")
    prompt_ids = encode(tok, prompt_text)
    full = encode(tok, prompt_text.rstrip(" ") + " " + target.strip())
    eos = tok.eos_token_id
    if eos is not None and full and full[-1] == eos and (not prompt_ids or prompt_ids[-1] != eos):
        full = full[:-1]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        ids, how = full[len(prompt_ids) :], "continuation"
    else:
        ids, how = list(tok(" " + target.strip(), add_special_tokens=False)["input_ids"]), "separate"
    special = set(tok.all_special_ids)
    if (
        not [i for i in ids if i not in special]
        or not tok.decode([i for i in ids if i not in special]).strip()
    ):
        raise RequestError(
            f"target {target!r} tokenizes to nothing but special tokens or spaces; pass a real word"
        )
    return ids, how


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    lengths: list[int]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Right-pad id lists into a batch (positions of real tokens stay 0..len-1)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids, mask, [len(s) for s in seqs])


def pad_id(tok: Any) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0
