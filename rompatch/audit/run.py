"""``audit_patch``: what a patch changes beyond its own fact, measured on the model it edits."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..apply import patched
from ..arch import get_spec
from ..errors import AuditError
from ..models import model_identity
from ..neighbours import fits, is_name_like, names_in, near_subject_texts, neighbour_template
from ..opening import is_opening
from ..patch import Patch
from ..placement import input_device
from ..refs import PatchesLike, PatchLike, resolve_patch
from ..rome import filled_keys
from ..stats import DEFAULT_SEQ_LEN, max_positions, text_source, token_chunks
from ..tokens import pad_id
from .probes import (
    Probe,
    edit_probes,
    leak_probes,
    measure,
    set_references,
    subject_probes,
)
from .reach import DeltaKey, ReachScan, batched, delta_keys, module_of, scan
from .report import AuditReport, Thresholds

DEFAULT_AUDIT_TOKENS = 50_000
PPL_SEQUENCES = 4  # the corpus sequences (of up to 512 tokens) perplexity is measured on
MAX_CANDIDATES = 64  # names tried in the edit's prompt, per delta


def audit_patch(
    model: Any,
    tok: Any,
    patch: PatchLike,
    *,
    on: PatchesLike = (),
    stats_data: str | None = None,
    tokens: int = DEFAULT_AUDIT_TOKENS,
    top: int = 20,
    leaks: int = 10,
    near_samples: int = 4,
    paraphrases: Sequence[str] = (),
    thresholds: Thresholds | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    notify: Callable[[str], None] | None = None,
) -> AuditReport:
    """Audit ``patch`` on ``model`` (its base; ``on``: patches to apply first, e.g. its lineage).

    1. Where it fires: ``tokens`` tokens of the statistics text (``stats_data``, as ``create``
       resolves it) and text the model writes next to each edit's subject are run to the edited
       layers; each delta's reach (u·k)/(u·k*) is measured at every token. Reports the fraction of
       corpus tokens above 0.1, 0.3 and 0.5 and the ``top`` contexts.
    2. What changes: the edit's own prompts, the same prompt with up to ``leaks`` other names found
       in the top contexts, and the subject with other relations; top answer and P(target) before
       and after.
    3. Perplexity on the first corpus sequences, before and after.

    The model is left as it was. The verdict compares the numbers with ``thresholds``.
    """
    t0 = time.perf_counter()
    p = resolve_patch(patch)
    thresholds = thresholds or Thresholds()
    if tokens < 1:
        raise AuditError(f"the audit needs a positive number of tokens, not {tokens}")
    if leaks < 0 or top < 1:
        raise AuditError("--top must be >= 1 and --leaks >= 0")
    get_spec(model)  # an unsupported architecture fails here, before any work
    source = text_source(stats_data, model=model, tok=tok)
    say = notify or (lambda s: None)
    say(f"audit text: {source.describe()}; {tokens:,} tokens")
    pad = pad_id(tok)
    with patched(model, on):
        keys, notes = delta_keys(model, tok, p)
        reqs = {dk.index: p.deltas[dk.index].request for dk in keys}
        subjects = [reqs[dk.index].subject if reqs[dk.index] else None for dk in keys]
        near = _near_texts(model, tok, keys, reqs, near_samples, seed)
        seq_len = min(DEFAULT_SEQ_LEN, max_positions(model))
        ppl_seqs: list[list[int]] = []

        def corpus() -> Iterator[list[int]]:
            for s in token_chunks(tok, source, seq_len, tokens, progress):
                if len(ppl_seqs) < PPL_SEQUENCES:
                    ppl_seqs.append(s)
                yield s

        reach = ReachScan(keys, [module_of(p.deltas[dk.index].parameter) for dk in keys], top=top)
        with patched(model, p):
            scan(model, tok, reach, batched(corpus(), batch_size, "corpus"))
            for seqs in {id(x): x for x in near.values()}.values():  # each subject's texts once
                scan(model, tok, reach, batched(iter(seqs), batch_size, "near the subject"))
        if reach.tokens == 0:
            raise AuditError(
                f"the audit text ({source.name}) produced no tokens; pass a non-empty --stats-data"
            )
        firing = reach.result(tok, subjects, pad)
        probes, candidates = _probes(model, tok, p, keys, reqs, firing, near, leaks, paraphrases)
        ppl_before = perplexity(model, ppl_seqs)
        with patched(model, p):
            measure(model, tok, probes, "after")
            ppl_after = perplexity(model, ppl_seqs)
    report = AuditReport(
        patch_id=p.id,
        model=str(model_identity(model).get("model", "?")),
        corpus=source.name,
        tokens=reach.tokens,
        firing=[f.to_dict() for f in firing],
        probes=[pr.to_dict() for pr in probes],
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        ppl_tokens=sum(len(s) - 1 for s in ppl_seqs),
        thresholds=thresholds,
        notes=notes,
        keys={str(dk.index): dk.source for dk in keys},
        candidates={str(i): c for i, c in candidates.items()},
    )
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def _near_texts(
    model, tok, keys: Sequence[DeltaKey], reqs, samples: int, seed: int
) -> dict[int, list[list[int]]]:
    """Per delta with a request, what the unpatched model writes next to its subject."""
    if samples <= 0:
        return {}
    out: dict[int, list[list[int]]] = {}
    seen: dict[str, list[list[int]]] = {}
    for dk in keys:
        req = reqs[dk.index]
        if req is None:
            continue
        if req.subject not in seen:
            seen[req.subject] = near_subject_texts(
                model, tok, req.subject, samples=samples, new_tokens=40, seed=seed
            )
        out[dk.index] = seen[req.subject]
    return out


def _probes(
    model, tok, p: Patch, keys: Sequence[DeltaKey], reqs, firing, near, leaks: int, paraphrases
) -> tuple[list[Probe], dict[int, list[dict]]]:
    """Every delta's probes, measured before (the model as it is now, without ``p``), and each
    delta's leak candidates with their reach in the edit's prompt.

    Leak candidates are the names in the top-firing contexts and in the text the model wrote next
    to the subject; each goes into the edit's prompt, and the ``leaks`` with the highest reach there
    become behavioural probes."""
    probes: list[Probe] = []
    candidates: dict[int, list[dict]] = {}
    with patched(model, p):
        for dk, f in zip(keys, firing):
            req = reqs[dk.index]
            if req is None:
                continue
            names: list[str] = []
            for c in f.top:
                if not c.on_subject and is_name_like(c.word, req.subject) and c.word not in names:
                    names.append(c.word)
            for seq in near.get(dk.index, []):
                names += [
                    n
                    for n in names_in(tok.decode(seq, skip_special_tokens=True), req.subject)
                    if n not in names
                ]
            names = [n for n in names if fits(tok, neighbour_template(req), n)][:MAX_CANDIDATES]
            ranked = sorted(
                zip(
                    names,
                    _reach_in(
                        model,
                        tok,
                        dk,
                        p.deltas[dk.index].layer,
                        [(neighbour_template(req), n) for n in names],
                    ),
                ),
                key=lambda x: -abs(x[1]),
            )
            candidates[dk.index] = [{"name": n, "reach": round(r, 4)} for n, r in ranked]
            if not is_opening(p.deltas[dk.index]):  # an opening delta's edit is probed with its first
                probes += edit_probes(dk.index, req, paraphrases)
            probes += leak_probes(dk.index, req, [n for n, _ in ranked[:leaks]])
    for dk in keys:
        if reqs[dk.index] is not None and not is_opening(p.deltas[dk.index]):
            probes += set_references(model, tok, subject_probes(dk.index, reqs[dk.index]))
    measure(model, tok, probes, "before")
    with patched(model, p):
        for dk in keys:
            mine = [
                pr
                for pr in probes
                if pr.delta == dk.index and pr.subject in pr.prompt and fits(tok, _template(pr), pr.subject)
            ]
            pairs = [(_template(pr), pr.subject) for pr in mine]
            for pr, r in zip(mine, _reach_in(model, tok, dk, p.deltas[dk.index].layer, pairs)):
                pr.reach = r
    return probes, candidates


def _template(pr: Probe) -> str:
    return pr.prompt.replace(pr.subject, "{}", 1)


def _reach_in(model, tok, dk: DeltaKey, layer: int, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """The delta's reach at the subject's last token of each (template, subject)."""
    out: list[float] = []
    for i in range(0, len(pairs), 32):
        k = filled_keys(model, tok, pairs[i : i + 32], layer).cpu().double()
        out += ((k @ dk.u.double()) / dk.denom).tolist()
    return out


@torch.no_grad()
def perplexity(model: Any, seqs: Sequence[Sequence[int]]) -> float:
    """exp(mean next-token NLL) over ``seqs`` (each predicted from its own start)."""
    if not seqs:
        return math.nan
    device = input_device(model)
    nll, count = 0.0, 0
    for s in seqs:
        ids = torch.tensor([list(s)], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))
