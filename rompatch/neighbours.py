"""An edit's neighbours: other subjects the model relates to the edit's subject, and their keys.

A rank-one edit reaches every key with a component along its ``u``. The keys that matter most are
those of other subjects in the edit's own prompt ("Kobe Bryant plays the sport of" for an edit of
Michael Jordan): they share the prompt's context and the subject's type. This module finds such
subjects without evaluation data, from the model itself: it samples short texts after the subject
("Michael Jordan and", "Like Michael Jordan, other", ...) and keeps the names in them. The audit
probes them (``rompatch.audit``); ``create`` can keep an edit's update away from their keys
(``ROMEHyperParams.neighbours``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from .errors import RequestError
from .generate import sample_topk_ids, sample_topk_rounds
from .request import EditRequest
from .tokens import encode, subject_span

# Texts the model continues after the subject, to find the names it puts next to it.
NEAR_PROMPTS = ("{} and", "Like {}, other", "{}, together with", "People often compare {} with")
# Put before a prompt that opens with its subject, as in running text (see ``neighbour_template``).
NEUTRAL_PREFIX = "Here is a fact. "

# Capitalised words that start sentences rather than name things.
_NOT_NAMES = frozenset(
    "a an and as at but by for from he her his i if in it its many most my no not of on one or our "
    "she so some that the their then there these they this those to we what when where which who "
    "with you your other others like people together although however after before while since "
    "because during also today yesterday now then yet still even just".split()
)
_NAME = re.compile(r"[A-Z][\w'’-]*(?:[ \t]+[A-Z][\w'’-]*){0,3}")


def names_in(text: str, subject: str) -> list[str]:
    """The names (runs of up to four capitalised words) in ``text``, in order, without repeats, that
    are not the subject, without sentence-openers like 'The' or 'He' in front, and not a single word
    that only opens a sentence ('Although', 'Today')."""
    out: list[str] = []
    for m in _NAME.finditer(text):
        words = m.group(0).rstrip(".'’-").split()
        while words and _opener(words[0]):
            words = words[1:]
        if len(words) == 1 and len(m.group(0).split()) == 1 and _starts_sentence(text, m.start()):
            continue
        name = re.sub(r"['’]s$", "", " ".join(words))  # "Dwyane Wade's" names Dwyane Wade
        if name and is_name_like(name, subject) and name not in out:
            out.append(name)
    return out


def _opener(word: str) -> bool:
    w = word.lower()
    return w in _NOT_NAMES or w.removesuffix("'s").removesuffix("’s") in _NOT_NAMES


def _starts_sentence(text: str, i: int) -> bool:
    before = text[:i].rstrip()
    return not before or before[-1] in ".!?:;\n\"“”'’("


def is_name_like(word: str, subject: str) -> bool:
    """A leak candidate: a capitalised word or name that is not (part of) the edit's subject."""
    w = word.strip()
    if len(w) < 2 or not w[:1].isupper() or not any(c.isalpha() for c in w):
        return False
    a, b = w.lower(), subject.lower()
    return a not in b and b not in a


def candidate_subject(text: str) -> str:
    """The name that ``text`` ends with: its last run of capitalised words (up to four, not across
    punctuation), else its last word. 'The match between Kobe Bryant' → 'Kobe Bryant';
    'Kobe Bryant, LeBron' → 'LeBron'; 'played basketball' → 'basketball'."""
    raw = text.replace("\n", " ").split()
    strip = ".,;:!?()[]\"“”'’"
    words = [w.strip(strip) for w in raw]
    if not any(words):
        return ""
    name: list[str] = []
    for i in range(len(words) - 1, -1, -1):
        w = words[i]
        if not w:
            break
        if name and raw[i][-1] in ',.;:!?)]"”':  # punctuation ends the name before it
            break
        if w[:1].isupper() and len(name) < 4:
            name.insert(0, w)
        else:
            break
    return " ".join(name) if name else next(w for w in reversed(words) if w)


def neighbour_template(req: EditRequest) -> str:
    """The edit's prompt as neighbours are asked it. A prompt that opens with its subject gets a
    neutral sentence first: without a BOS token a subject at the very start sits on the attention
    sink, where no edit acts specifically, while in running text the same prompt follows other words."""
    return NEUTRAL_PREFIX + req.prompt if req.prompt.startswith("{}") else req.prompt


def _near_prompts(subject: str, samples: int) -> list[str]:
    return [p.format(subject) for p in NEAR_PROMPTS for _ in range(samples)]


def _near_length(tok: Any, prompts: Sequence[str], new_tokens: int) -> int:
    return max(len(encode(tok, p)) for p in prompts) + new_tokens


@torch.no_grad()
def near_subject_texts(
    model: Any, tok: Any, subject: str, *, samples: int, new_tokens: int, seed: int
) -> list[list[int]]:
    """Token sequences the model writes after ``NEAR_PROMPTS`` filled with ``subject`` (top-40
    sampling, seeded): where the model puts other names next to the subject's."""
    prompts = _near_prompts(subject, samples)
    return sample_topk_ids(
        model, tok, prompts, max_out_len=_near_length(tok, prompts, new_tokens), top_k=40, seed=seed
    )


# Rounds of ``near_names`` sampled in one batch: all 8 rounds of 8 prompts, 64 rows (64 names took
# 5 or more rounds for both models on CounterFact subjects; one batch of 64 rows was the fastest).
ROUNDS_PER_BATCH = 8


def near_names(
    model: Any,
    tok: Any,
    subject: str,
    *,
    limit: int = 24,
    new_tokens: int = 32,
    seed: int = 0,
    rounds: int = 8,
) -> list[str]:
    """Up to ``limit`` names the model writes next to ``subject``, in the order found: rounds of
    ``near_subject_texts`` (two samples of each prompt, seeds ``seed``, ``seed + 1``, ...) until
    ``limit`` names are found or ``rounds`` rounds are done. The rounds are sampled
    ``ROUNDS_PER_BATCH`` at a time (``sample_topk_rounds``: the same texts, one batch)."""
    prompts = _near_prompts(subject, 2)
    length = _near_length(tok, prompts, new_tokens)
    names: list[str] = []
    for first in range(0, rounds, ROUNDS_PER_BATCH):
        seeds = range(seed + first, seed + min(first + ROUNDS_PER_BATCH, rounds))
        for texts in sample_topk_rounds(model, tok, prompts, seeds=seeds, max_out_len=length, top_k=40):
            for seq in texts:
                text = tok.decode(seq, skip_special_tokens=True)
                names += [n for n in names_in(text, subject) if n not in names]
            if len(names) >= limit:
                return names[:limit]
    return names[:limit]


def neighbour_pairs(req: EditRequest, names: Sequence[str]) -> list[tuple[str, str]]:
    """(template, subject) pairs for each name: the edit's prompt and ``neighbour_template`` of it."""
    templates = list(dict.fromkeys([req.prompt, neighbour_template(req)]))
    return [(t, n) for n in names for t in templates]


def fits(tok: Any, template: str, name: str) -> bool:
    """Whether ``name`` in ``template`` covers whole tokens (a key can be read at its last token).
    A name the tokenizer merges with its neighbouring text has no token of its own to key on."""
    try:
        subject_span(tok, template, name)
    except RequestError:
        return False
    return True
