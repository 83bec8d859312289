"""Behavioural probes of an edit, before and after: does it work, does it leak, what survives.

Three kinds, all derived from the patch and the model itself (no evaluation data):

- ``edit``: the edit's own prompt, alone and after a few neutral sentences (and any paraphrases the
  user gives). Does the target come out?
- ``leak``: the edit's prompt with other subjects, the names found where the patch fires most. Does
  the target come out for them too?
- ``subject``: the edit's subject with other relations (``RELATIONS``). The reference answer is the
  model's own greedy answer before the patch. Does it survive?

Each probe records the top answer (greedy, a few tokens) and P(target) before and after, and for
``subject`` probes P(reference answer) too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..generate import sample_topk_ids
from ..neighbours import NEUTRAL_PREFIX, neighbour_template
from ..request import EditRequest
from ..scoring import target_logprobs
from ..tokens import encode, target_ids

# Sentences put before the edit's prompt: the same fact asked after unrelated text.
PREFIXES = ("", NEUTRAL_PREFIX, "I read about this yesterday. ", "Everyone agrees on this: ")
# Other relations of the same subject; the model's own greedy answer is each one's reference.
RELATIONS = (
    "{} is a",
    "{} is known for",
    "{} was born in the city of",
    "{} is a citizen of",
    "{} works in the field of",
    "{} is located in the country of",
    "The first language of {} is",
    "{} was created by",
)
ANSWER_TOKENS = 4


@dataclass
class Probe:
    """One prompt, measured before and after the patch."""

    kind: str  # "edit", "leak" or "subject"
    delta: int
    prompt: str  # the full text
    subject: str
    target: str  # the edit's new object
    reference: str | None = None  # subject probes: the model's answer before; edit probes: target_true
    reach: float | None = None  # the delta's reach at the probe's subject key
    answer_before: str = ""
    answer_after: str = ""
    first_before: int = -1  # first token of each answer
    first_after: int = -1
    p_target_before: float = math.nan
    p_target_after: float = math.nan
    p_reference_before: float | None = None
    p_reference_after: float | None = None
    target_first: int = -1  # first token of the target after this prompt

    @property
    def says_target_before(self) -> bool:
        return self.first_before == self.target_first

    @property
    def says_target_after(self) -> bool:
        return self.first_after == self.target_first

    @property
    def flipped(self) -> bool:
        """The answer became the edit's target (a leak, for another subject)."""
        return self.says_target_after and not self.says_target_before

    @property
    def kept(self) -> bool:
        """The answer's first token is the same before and after."""
        return self.first_before == self.first_after

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "delta": self.delta,
            "prompt": self.prompt,
            "subject": self.subject,
            "target": self.target,
            "answer_before": self.answer_before,
            "answer_after": self.answer_after,
            "p_target_before": _r(self.p_target_before),
            "p_target_after": _r(self.p_target_after),
        }
        if self.reach is not None:
            out["reach"] = round(self.reach, 4)
        if self.reference is not None:
            out.update(
                reference=self.reference,
                p_reference_before=_r(self.p_reference_before),
                p_reference_after=_r(self.p_reference_after),
            )
        if self.kind == "leak":
            out["flipped"] = self.flipped
        if self.kind == "subject":
            out["kept"] = self.kept
        if self.kind == "edit":
            out["says_target"] = self.says_target_after
        return out


def _r(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(f"{x:.4g}")


def edit_probes(i: int, req: EditRequest, paraphrases: Sequence[str] = ()) -> list[Probe]:
    """The edit's prompt after each of ``PREFIXES``, then each paraphrase (a prompt with ``{}``, or a
    full text)."""
    texts = [p + req.text for p in PREFIXES]
    texts += [p.format(req.subject) if "{}" in p else p for p in paraphrases]
    return [Probe("edit", i, t, req.subject, req.target_new, reference=req.target_true) for t in texts]


def leak_probes(i: int, req: EditRequest, names: Sequence[str]) -> list[Probe]:
    """The edit's prompt (``neighbour_template``) with each of ``names`` as its subject."""
    t = neighbour_template(req)
    return [Probe("leak", i, t.format(n), n, req.target_new) for n in names]


def subject_probes(i: int, req: EditRequest) -> list[Probe]:
    """The subject with each of ``RELATIONS`` other than the edit's own prompt."""
    own = _norm(req.prompt)
    return [
        Probe("subject", i, r.format(req.subject), req.subject, req.target_new)
        for r in RELATIONS
        if _norm(r) != own
    ]


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


# ------------------------------------------------------------------------------- measurement


@torch.no_grad()
def greedy_answers(
    model: Any, tok: Any, prompts: Sequence[str], n: int = ANSWER_TOKENS
) -> list[tuple[str, int]]:
    """Each prompt's greedy continuation of ``n`` tokens (cut at the first sentence mark) and its
    first token id."""
    if not prompts:
        return []
    longest = max(len(encode(tok, p)) for p in prompts)
    out = []
    greedy = sample_topk_ids(model, tok, list(prompts), max_out_len=longest + n, top_k=1)  # top-1: greedy
    for p, ids in zip(prompts, greedy):
        new = ids[len(encode(tok, p)) :][:n]
        text = tok.decode(new, skip_special_tokens=True)
        out.append((clean_answer(text), new[0] if new else -1))
    return out


def clean_answer(text: str) -> str:
    """A continuation cut to its answer: up to the first newline or sentence mark, at most 3 words."""
    text = re.split(r"[\n.,;:!?()\"]", text, maxsplit=1)[0]
    return " ".join(text.split()[:3])


def measure(model: Any, tok: Any, probes: Sequence[Probe], when: str) -> None:
    """Fill each probe's answer and probabilities for ``when`` ("before" or "after")."""
    if not probes:
        return
    answers = greedy_answers(model, tok, [p.prompt for p in probes])
    targets = sorted({p.target for p in probes} | {p.reference for p in probes if p.reference})
    col = {t: j for j, t in enumerate(targets)}
    lp = target_logprobs(model, tok, [p.prompt for p in probes], targets)
    for r, (p, (text, first)) in enumerate(zip(probes, answers)):
        setattr(p, f"answer_{when}", text)
        setattr(p, f"first_{when}", first)
        setattr(p, f"p_target_{when}", math.exp(float(lp[r, col[p.target]])))
        if p.reference:
            setattr(p, f"p_reference_{when}", math.exp(float(lp[r, col[p.reference]])))
        if p.target_first < 0:
            p.target_first = target_ids(tok, p.prompt, p.target)[0][0]


def set_references(model: Any, tok: Any, probes: Sequence[Probe]) -> list[Probe]:
    """Subject probes get the model's own greedy answer as reference; those without one are dropped."""
    answers = greedy_answers(model, tok, [p.prompt for p in probes])
    keep = []
    for p, (text, _) in zip(probes, answers):
        if text and any(c.isalnum() for c in text):
            p.reference = text
            keep.append(p)
    return keep
