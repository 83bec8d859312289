"""Where a patch fires: each delta's reach (u·k)/(u·k*) at every token of a text.

A delta ``v uᵀ`` adds ``v (u·k)`` to the MLP output wherever the edited matrix sees the key ``k``.
At its own key ``k*`` that is the whole edit (reach 1); at a key orthogonal to ``u`` it is nothing
(reach 0). Reach is the share of the edit a token receives, so the fraction of tokens above a
threshold, and the tokens that reach highest, say how far an edit spreads beyond its subject.

Keys come from the model with the patch applied: a delta at layer L cannot change its own matrix's
input, and deltas of lower layers (a MEMIT patch) change it exactly as they will in use.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AuditError
from ..hooks import TraceDict
from ..neighbours import candidate_subject
from ..patch import Patch, RankOneDelta
from ..placement import input_device
from ..rome import compute_key
from ..tokens import pad_id, pad_right

log = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.3, 0.5)
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3
# A recomputed key must give the recorded u·k* to this relative tolerance, or the model is not
# the one the patch was computed on.
KEY_RTOL = 1e-3


def module_of(parameter: str) -> str:
    """The module whose input is the delta's key: the parameter name without ``.weight``."""
    return parameter.rsplit(".", 1)[0]


@dataclass
class DeltaKey:
    """A delta's direction ``u`` and its key ``k*``, with where the key came from."""

    index: int
    u: torch.Tensor  # float32, CPU
    key: torch.Tensor  # float32, CPU
    source: str  # "stored" (format 1.2) or "recomputed" (from the recorded request and hparams)

    @property
    def denom(self) -> float:
        return float(self.u.double() @ self.key.double())


def delta_keys(model: Any, tok: Any, patch: Patch) -> tuple[list[DeltaKey], list[str]]:
    """Each delta's (u, k*), and one note per delta whose reach cannot be computed.

    The key is the stored one when the patch carries it (format 1.2). A ROME delta without one
    (format 1.0/1.1) gets its k* recomputed on ``model`` (which must be the model the patch was
    computed on, without the patch) from its recorded request, context templates and prompt weight;
    the recorded ``u·k*`` checks the result; a manual delta with a request gets the key at the
    subject's last token of its prompt. Deltas with neither a key nor a request (extracted,
    SVD-compressed) are left out with a note.
    """
    out, notes = [], []
    for i, d in enumerate(patch.deltas):
        if d.key is not None:
            out.append(DeltaKey(i, d.u.float(), d.key.float(), "stored"))
            continue
        key, how = _recomputed_key(model, tok, d)
        if key is None:
            notes.append(f"delta {i}: {how}; its reach is not computed")
            continue
        out.append(DeltaKey(i, d.u.float(), key, "recomputed" + (f" {how}" if how else "")))
    if not out:
        raise AuditError(
            f"patch {patch.short_id}: no delta has a key or a request to recompute one "
            f"({'; '.join(notes)}); audit a patch made by 'rompatch create'"
        )
    return out, notes


def _recomputed_key(model: Any, tok: Any, d: RankOneDelta) -> tuple[torch.Tensor | None, str]:
    hp = d.hparams or {}
    if d.request is None or d.kind not in ("rome", "manual"):
        return None, f"a {d.kind} delta without a stored key or a request to recompute it from"
    # a ROME delta's k* averages its recorded context templates; another delta's is taken at its prompt
    templates = hp.get("context_templates") or ["{}"]
    weight = hp.get("key_prompt_weight") if hp.get("context_templates") else None
    key = compute_key(model, tok, d.request, d.layer, templates, prompt_weight=weight)
    key = key.detach().to("cpu", torch.float32)
    recorded = d.metrics.get("u_dot_k")
    if isinstance(recorded, (int, float)) and recorded:
        got = float(d.u.double() @ key.double())
        if abs(got - recorded) > KEY_RTOL * abs(recorded):
            raise AuditError(
                f"the recomputed key of delta {d.layer}/{d.request.subject!r} gives u·k* = {got:.6g}, but the "
                f"patch recorded {recorded:.6g}: this model is not the one the patch was computed on; "
                "load the patch's base model (and apply its lineage with --on)"
            )
    return key, "" if hp.get("context_templates") else "at its prompt"


# ----------------------------------------------------------------------------------- the scan


@dataclass(order=True)
class _Hit:
    score: float
    reach: float = field(compare=False)
    ids: list[int] = field(compare=False)
    at: int = field(compare=False)  # the firing token's index in ``ids``
    source: str = field(compare=False)


@dataclass
class Context:
    """One token where a delta fires, with the text around it."""

    reach: float
    token: str  # the firing token, decoded
    text: str  # the context, the firing token marked as [[token]]
    word: str  # the whole word (or name) the token ends: what a leak probe puts in the prompt
    source: str  # "corpus" or "near the subject"
    on_subject: bool  # the context is the edit's own subject

    def to_dict(self) -> dict[str, Any]:
        return {
            "reach": round(self.reach, 4),
            "token": self.token,
            "text": self.text,
            "word": self.word,
            "source": self.source,
            "on_subject": self.on_subject,
        }


@dataclass
class Firing:
    """One delta's reach over a text: fractions above thresholds and the highest-reaching tokens."""

    delta: int
    tokens: int
    above: dict[float, float]  # threshold -> fraction of tokens with |reach| >= threshold
    max_reach: float
    top: list[Context]

    def to_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "tokens": self.tokens,
            "above": {str(t): round(f, 6) for t, f in self.above.items()},
            "max_reach": round(self.max_reach, 4),
            "top": [c.to_dict() for c in self.top],
        }


class ReachScan:
    """Accumulates the reach of several deltas over batches of token sequences.

    ``add(ids, mask, keys_by_module, source)`` takes one batch's keys at each edited module;
    ``result(tok, subjects)`` gives one ``Firing`` per delta. Fractions count the ``corpus``
    source only (general text); the top contexts come from every source, one per distinct token,
    so a name that recurs is listed once.
    """

    def __init__(self, keys: Sequence[DeltaKey], modules: Sequence[str], *, top: int = 20,
                 thresholds: Sequence[float] = THRESHOLDS) -> None:  # fmt: skip
        self.keys, self.modules = list(keys), list(modules)
        self.thresholds = tuple(thresholds)
        self.top = top
        self.counts = [[0] * len(self.thresholds) for _ in self.keys]
        self.max = [0.0] * len(self.keys)
        self.tokens = 0
        self.best: list[dict[int, _Hit]] = [{} for _ in self.keys]  # token id -> best hit
        by_module: dict[str, list[int]] = {}
        for j, m in enumerate(self.modules):
            by_module.setdefault(m, []).append(j)
        self.by_module = by_module
        self._U = {m: torch.stack([self.keys[j].u for j in js]).T.double() for m, js in by_module.items()}
        self._den = {m: torch.tensor([self.keys[j].denom for j in js], dtype=torch.float64)
                     for m, js in by_module.items()}  # fmt: skip

    def add(self, ids: torch.Tensor, mask: torch.Tensor, keys: dict[str, torch.Tensor], source: str) -> None:
        """``ids``/``mask`` (B, T) on the CPU; ``keys[module]`` (B, T, in)."""
        live = mask.bool()
        if source == "corpus":
            self.tokens += int(live.sum())
        for m, js in self.by_module.items():
            k = keys[m].detach().to("cpu", torch.float64)
            reach = (k @ self._U[m]) / self._den[m]  # (B, T, n)
            reach[~live] = 0.0
            for c, j in enumerate(js):
                r = reach[..., c]
                a = r.abs()
                if source == "corpus":
                    for t, th in enumerate(self.thresholds):
                        self.counts[j][t] += int((a >= th).sum())
                self.max[j] = max(self.max[j], float(a.max()))
                self._keep_top(j, ids, r, a, source)

    def _keep_top(self, j: int, ids: torch.Tensor, r: torch.Tensor, a: torch.Tensor, source: str) -> None:
        best = self.best[j]
        k = min(a.numel(), 4 * self.top)
        vals, flat = a.flatten().topk(k)
        floor = heapq.nsmallest(1, best.values())[0].score if len(best) >= 4 * self.top else -math.inf
        T = a.shape[1]
        for v, f in zip(vals.tolist(), flat.tolist()):
            if v <= floor or v == 0.0:
                break
            b, t = divmod(f, T)
            tid = int(ids[b, t])
            old = best.get(tid)
            if old is not None and old.score >= v:
                continue
            lo, hi = max(0, t - CONTEXT_BEFORE), t + CONTEXT_AFTER + 1
            best[tid] = _Hit(v, float(r[b, t]), ids[b, lo:hi].tolist(), t - lo, source)
        if len(best) > 8 * self.top:  # keep memory bounded: drop the weakest half
            for tid, _ in sorted(best.items(), key=lambda kv: kv[1].score)[: len(best) - 4 * self.top]:
                del best[tid]

    def result(self, tok: Any, subjects: Sequence[str | None], pad: int) -> list[Firing]:
        out = []
        for j, dk in enumerate(self.keys):
            hits = sorted(self.best[j].values(), reverse=True)[: self.top]
            subject = subjects[j]
            out.append(
                Firing(
                    delta=dk.index,
                    tokens=self.tokens,
                    above={
                        th: (self.counts[j][t] / self.tokens if self.tokens else 0.0)
                        for t, th in enumerate(self.thresholds)
                    },
                    max_reach=self.max[j],
                    top=[_context(tok, h, subject, pad) for h in hits],
                )
            )
        return out


def _context(tok: Any, h: _Hit, subject: str | None, pad: int) -> Context:
    ids = h.ids
    special = set(getattr(tok, "all_special_ids", []) or []) | {pad}
    before = tok.decode([i for i in ids[: h.at] if i not in special])
    token = tok.decode([ids[h.at]]) if ids[h.at] not in special else tok.convert_ids_to_tokens(ids[h.at])
    after_ids = [i for i in ids[h.at + 1 :] if i not in special]
    after = tok.decode(after_ids)
    # the word the token is part of: the token plus the following characters that continue it
    cont = "" if not after or after[0].isspace() else _word_start(after)
    word = candidate_subject(before + token + cont)
    text = (before + "[[" + token + "]]" + after).replace("\n", " ")
    on_subject = bool(subject) and subject.lower() in (before + token + cont).lower()[-(len(subject) + 2) :]
    return Context(h.reach, token, text.strip(), word, h.source, on_subject)


def _word_start(text: str) -> str:
    out = []
    for ch in text:
        if ch.isalnum() or ch in "'’-":
            out.append(ch)
        else:
            break
    return "".join(out)


@torch.no_grad()
def scan(
    model: Any,
    tok: Any,
    reach: ReachScan,
    batches: Iterable[tuple[list[list[int]], str]],
) -> None:
    """Run each batch of token sequences to the highest edited module and add its keys to ``reach``."""
    device = input_device(model)
    modules = sorted(set(reach.modules), key=_layer_order(model))
    pad = pad_id(tok)
    for seqs, source in batches:
        batch = pad_right(seqs, pad)
        ids, mask = batch.input_ids, batch.attention_mask
        with TraceDict(model, modules, retain_input=True, retain_output=False, stop=True) as td:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        reach.add(ids, mask, {m: td[m].input for m in modules}, source)


def _layer_order(model: Any):
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda m: order.get(m, 0)


def batched(seqs: Iterator[list[int]], size: int, source: str) -> Iterator[tuple[list[list[int]], str]]:
    while True:
        batch = [s for _, s in zip(range(size), seqs)]
        if not batch:
            return
        yield batch, source
