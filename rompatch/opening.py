"""A second delta for a prompt that opens with its subject, on a tokenizer without BOS.

Without a BOS token, a prompt that opens with its subject ("{}, who is employed by") puts the
subject's tokens next to the attention sink at position 0, and the subject's key there is far from
its key after any context (cosine 0.73 to 0.81 for two-token subjects on SmolLM2-135M). The edit's
k* mixes both (``key_prompt_weight``), and its value is optimised on 21 prompts, 20 of them context
templates: those take the update and the requested prompt can still miss, the edit coming back
unedited on the very prompt the user gave (bench/RESULTS.md, "Prompts that open with their
subject").

When that happens, ``create`` adds a second rank-one delta keyed at the requested prompt's subject
token: u₂ is the C-weighted minimum-norm direction with u₂·k_prompt = 1 and u₂·k = 0 at the keys of
every context template (so it adds nothing where the first delta already works), and its value is
optimised on the requested prompt alone with the first delta applied. Measured on SmolLM2: it makes
the prompt work with the paraphrases' margins kept, and reaches none of 2,000 other sentence
openings at 0.3 of its strength.

A one-token subject at position 0 gets no second delta: its key is the attention sink's, shared by
every text's first token, and no delta keyed there is specific (``rome.usable_templates``).

The pair is one edit. The second delta records ``hparams["opening"] = True`` and follows its first
in the patch; ``edit_groups`` finds the pairs, and merging and batch solves take the pair's sum as
each key's target (``rompatch.merge``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from .placement import param_value, write_param
from .request import EditRequest
from .tokens import bos_prefix, subject_span

if TYPE_CHECKING:
    from .patch import RankOneDelta

# The requested prompt's P(target) after the value optimisation (geometric mean over the target's
# tokens) below which the second delta is added.
OPENING_MIN_P = 0.5
OPENING = "opening"  # the hparams key that marks a second delta


def opens_with_subject(tok: Any, req: EditRequest) -> bool:
    """Whether ``req``'s prompt opens with its subject on a tokenizer without BOS, the subject
    ending after position 0 (a one-token subject at position 0 has no specific key)."""
    if not req.prompt.startswith("{}") or bos_prefix(tok):
        return False
    _, _, last = subject_span(tok, req.prompt, req.subject)
    return last > 0


def is_opening(d: RankOneDelta) -> bool:
    """A second delta, completing the delta before it (module docstring)."""
    return bool(d.hparams.get(OPENING))


def edit_groups(deltas: Sequence[RankOneDelta]) -> list[list[int]]:
    """Indices of ``deltas`` by edit: a delta, then the opening delta that follows it, if any."""
    groups: list[list[int]] = []
    for i, d in enumerate(deltas):
        if is_opening(d) and groups and deltas[groups[-1][-1]].request == d.request:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@contextmanager
def added(model: Any, parameter: str, v: torch.Tensor, u: torch.Tensor, layout: str) -> Iterator[None]:
    """Parameter ``parameter`` with v uᵀ added (in its own orientation and dtype, where it lives:
    ``rompatch.placement``), restored exactly afterwards."""
    saved = param_value(model, parameter).detach().clone()
    d = torch.outer(v.to(saved.device, torch.float32), u.to(saved.device, torch.float32))
    write_param(model, parameter, saved + (d.T if layout == "conv1d" else d).to(saved.dtype))
    try:
        yield
    finally:
        write_param(model, parameter, saved)
