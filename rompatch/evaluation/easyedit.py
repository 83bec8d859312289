"""CounterFact in EasyEdit's reduced schema, converted to the full CounterFact records
``evaluate.measure_case`` reads.

EasyEdit (zjunlp/EasyEdit) ships CounterFact as a JSON list of flat records::

    {"case_id", "prompt",            # filled in: the subject appears in it
     "subject", "target_new", "ground_truth",
     "rephrase_prompt", "locality_prompt", "locality_ground_truth"}

and ``from_easyedit`` turns each into::

    {"case_id",
     "requested_rewrite": {"prompt": <prompt, the subject's first occurrence replaced by "{}">,
                           "subject", "target_new": {"str"}, "target_true": {"str": ground_truth}},
     "paraphrase_prompts": [rephrase_prompt], "neighborhood_prompts": [locality_prompt]}

``rephrase_prompt`` and ``locality_prompt`` may also be lists of prompts (all are kept).

Neighborhood success NS compares P(target_true) > P(target_new) on the neighborhood prompts, as in
CounterFact, whose neighborhood prompts are other subjects with the same true object. EasyEdit's
``locality_ground_truth`` is that object; in the three EasyEdit CounterFact files (train 9,903,
val 1,903, edit 9,913 records) it equals ``ground_truth`` in every record. Where a record's differs,
the record keeps ``ground_truth`` as ``target_true`` (NS keeps its CounterFact definition), the
differing value is kept as ``locality_ground_truth`` in the converted record, and the count is
logged.

Records that cannot be converted are skipped, each reason counted and logged, never raised:
missing or empty fields, a prompt or subject with a brace (the prompt becomes a ``str.format``
template), and a subject that does not occur in its prompt.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import EvalError
from .records import read_json

log = logging.getLogger(__name__)

TEXT_FIELDS = ("prompt", "subject", "target_new", "ground_truth")
PROMPT_FIELDS = ("rephrase_prompt", "locality_prompt")
REQUIRED = ("case_id", *TEXT_FIELDS, *PROMPT_FIELDS)

# reasons a record is skipped (the keys of ``from_easyedit``'s ``skipped`` counter)
MISSING_FIELD = "missing or empty field"
BRACE = "brace in prompt or subject"
SUBJECT_NOT_IN_PROMPT = "subject not in prompt"


def is_easyedit_counterfact(record: Any) -> bool:
    """True for a record in EasyEdit's CounterFact schema (all its keys; not a full CounterFact
    record with ``requested_rewrite``)."""
    return (
        isinstance(record, Mapping)
        and "requested_rewrite" not in record
        and all(k in record for k in REQUIRED)
    )


def _prompts(value: Any) -> list[str] | None:
    """A prompt field as a list of non-empty strings, or None when it is not one."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        return None
    if not all(isinstance(p, str) and p.strip() for p in items):
        return None
    return list(items)


def _convert(rec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the full CounterFact record, None) or (None, the reason it is skipped)."""
    if not is_easyedit_counterfact(rec):
        return None, MISSING_FIELD
    if not all(isinstance(rec[k], str) and rec[k].strip() for k in TEXT_FIELDS):
        return None, MISSING_FIELD
    para, neigh = _prompts(rec["rephrase_prompt"]), _prompts(rec["locality_prompt"])
    if para is None or neigh is None:
        return None, MISSING_FIELD
    prompt, subject = rec["prompt"], rec["subject"]
    if any(c in s for c in "{}" for s in (prompt, subject)):
        return None, BRACE
    if subject not in prompt:
        return None, SUBJECT_NOT_IN_PROMPT
    out: dict[str, Any] = {
        "case_id": rec["case_id"],
        "requested_rewrite": {
            "prompt": prompt.replace(subject, "{}", 1),
            "subject": subject,
            "target_new": {"str": rec["target_new"]},
            "target_true": {"str": rec["ground_truth"]},
        },
        "paraphrase_prompts": para,
        "neighborhood_prompts": neigh,
    }
    loc = rec.get("locality_ground_truth")
    if isinstance(loc, str) and loc.strip() != rec["ground_truth"].strip():
        out["locality_ground_truth"] = loc
    return out, None


def from_easyedit(
    records: Iterable[Any], *, skipped: Counter | None = None, locality_differs: list | None = None
) -> list[dict[str, Any]]:
    """EasyEdit CounterFact records as full CounterFact records (see the module doc).

    Records that cannot be converted are skipped and logged; pass a ``Counter`` as ``skipped`` to
    get the count per reason, and a list as ``locality_differs`` to get the case ids whose
    ``locality_ground_truth`` differs from ``ground_truth`` (kept, with ``ground_truth`` as target_true).
    """
    reasons: Counter = Counter() if skipped is None else skipped
    differs: list = [] if locality_differs is None else locality_differs
    out = []
    for i, rec in enumerate(records):
        conv, why = _convert(rec)
        if conv is None:
            reasons[why] += 1
            cid = rec.get("case_id") if isinstance(rec, Mapping) else None
            log.debug("skipping EasyEdit record %d (case_id %s): %s", i, cid, why)
            continue
        if "locality_ground_truth" in conv:
            differs.append(conv["case_id"])
        out.append(conv)
    if reasons:
        log.warning(
            "skipped %d EasyEdit records: %s",
            sum(reasons.values()),
            ", ".join(f"{n} {why}" for why, n in reasons.most_common()),
        )
    if differs:
        log.warning(
            "%d records have a locality_ground_truth other than ground_truth; NS uses ground_truth",
            len(differs),
        )
    return out


def load_easyedit_counterfact(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` (all with None) convertible records of an EasyEdit CounterFact file, as full
    CounterFact records. An unreadable or wrongly shaped file raises a one-line ``EvalError``."""
    data = read_json(path, unreadable="cannot read {path}: {reason}; pass EasyEdit's counterfact-*.json")
    if not isinstance(data, list) or not data:
        raise EvalError(f"{path} must be a non-empty JSON list of EasyEdit CounterFact records")
    if not is_easyedit_counterfact(data[0]):
        raise EvalError(
            f"{path} is not EasyEdit CounterFact: its first record lacks some of {', '.join(REQUIRED)}"
        )
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be at least 1, not {limit}")
    out = from_easyedit(data)
    if not out:
        raise EvalError(f"{path}: none of its {len(data)} records could be converted (see the log)")
    return out[:limit] if limit else out


__all__ = ["is_easyedit_counterfact", "from_easyedit", "load_easyedit_counterfact"]
