"""zsRE evaluation (efficacy, paraphrase, specificity as token-level accuracy), as in the ROME paper.

Records are MEND's zsRE format: ``subject, src, pred, rephrase, alt, answers, loc, loc_ans``.
What the ROME reference code does with them (``dsets/zsre.py`` and
``experiments/py/eval_utils_zsre.py`` in kmeng01/rome), and what we do:

- the edit request is ``prompt = src.replace(subject, "{}")`` (``src`` is a question), the subject,
  and ``target_new = answers[0]``. Note: ROME edits toward ``answers[0]``, not ``alt`` (MEND and
  EasyEdit use ``alt``); ``target="alt"`` selects that convention instead. The default follows the
  ROME reference so the numbers are comparable with the paper's Table 1;
- efficacy: on the question ``src``, each token of ``" " + target`` is predicted by argmax given the
  question and the previous target tokens (teacher forcing); the case's score is the fraction of
  tokens right;
- paraphrase: the same on ``rephrase``;
- specificity: the same on ``loc + "?"`` with ``" " + loc_ans`` (a Natural Questions question that
  is unrelated to the edit), i.e. how often the model still gives the NQ answer's tokens.
Differences from the reference, on purpose: token ids are used directly (the reference decodes the
target prefix to text and re-tokenises it, and compares against the *first* token of the re-encoded
target token, which on tokenizers that add BOS compares against BOS); each prompt is scored with
one forward pass over prompt + target.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ..create import Editor
from ..errors import EvalError
from ..placement import input_device
from ..request import EditRequest
from ..rome import ROMEHyperParams
from ..stats import SecondMoment
from ..tokens import encode, pad_id, pad_right, target_ids
from .edits import edit_summary, measured_edit
from .records import read_json

ZSRE_FIELDS = ("subject", "src", "rephrase", "answers", "loc", "loc_ans")
ZSRE_TARGETS = ("answers", "alt")


def is_zsre(record: Any) -> bool:
    return isinstance(record, Mapping) and all(k in record for k in ("src", "subject", "loc", "loc_ans"))


def load_zsre(path: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a MEND-format zsRE JSON list; records get ``case_id`` = their index in the file."""
    return prepare_zsre(read_json(path), where=path, limit=limit)


def prepare_zsre(data: Any, *, where: str = "zsRE data", limit: int | None = None) -> list[dict[str, Any]]:
    if not isinstance(data, list) or not data:
        raise EvalError(f"{where} is not a zsRE file (a JSON list of records with src, subject, loc, ...)")
    out = []
    for i, rec in enumerate(data[:limit] if limit else data):
        missing = [k for k in ZSRE_FIELDS if not isinstance(rec, Mapping) or k not in rec]
        if missing:
            raise EvalError(f"{where}: record {i} lacks {', '.join(missing)}; expected MEND's zsRE format")
        if rec["subject"] not in rec["src"]:
            raise EvalError(
                f"{where}: record {i}: subject {rec['subject']!r} does not occur in src {rec['src']!r}"
            )
        out.append({"case_id": rec.get("case_id", i), **rec})
    return out


def zsre_request(record: Mapping[str, Any], *, target: str = "answers") -> EditRequest:
    """The edit ROME makes for a zsRE record (``target``: ``answers`` = answers[0], or ``alt``)."""
    if target not in ZSRE_TARGETS:
        raise EvalError(f"zsRE target must be one of {', '.join(ZSRE_TARGETS)}, not {target!r}")
    new = record["answers"][0] if target == "answers" else record["alt"]
    prompt = record["src"].replace("{", "{{").replace("}", "}}").replace(record["subject"], "{}", 1)
    return EditRequest(prompt, record["subject"], new, case_id=str(record.get("case_id")))


@torch.no_grad()
def teacher_forced_correct(
    model: Any, tok: Any, items: Sequence[tuple[str, str]], *, batch_size: int = 64
) -> list[list[bool]]:
    """For each (prompt, answer): is each answer token the argmax given prompt + previous answer tokens?"""
    device = input_device(model)
    enc = []
    for prompt, answer in items:
        pids = encode(tok, prompt)
        tids, _ = target_ids(tok, prompt, answer)
        enc.append((pids, tids))
    out: list[list[bool]] = []
    for start in range(0, len(enc), batch_size):
        chunk = enc[start : start + batch_size]
        batch = pad_right([p + t for p, t in chunk], pad_id(tok)).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        for r, (p, t) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=device)
            pred = logits[r, pos].argmax(-1).tolist()
            out.append([a == b for a, b in zip(pred, t)])
    return out


def measure_zsre(
    model: Any, tok: Any, record: Mapping[str, Any], *, target: str = "answers", batch_size: int = 64
) -> dict[str, list[bool]]:
    """Per-token correctness on the question, its paraphrase, and the unrelated NQ question."""
    req = zsre_request(record, target=target)
    items = [
        (record["src"], req.target_new),
        (record["rephrase"], req.target_new),
        (record["loc"] + "?", record["loc_ans"]),
    ]
    rw, para, loc = teacher_forced_correct(model, tok, items, batch_size=batch_size)
    return {"rewrite": rw, "paraphrase": para, "neighborhood": loc}


def zsre_scores(m: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """Token accuracies (fractions) from ``measure_zsre`` output."""

    def acc(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "efficacy": acc(m["rewrite"]),
        "paraphrase": acc(m["paraphrase"]),
        "specificity": acc(m["neighborhood"]),
    }


def score_zsre(
    model: Any, tok: Any, record: Mapping[str, Any], *, target: str = "answers", batch_size: int = 64
) -> dict[str, float]:
    """Token accuracies of the model as it is now on one record (``zsre_scores`` of ``measure_zsre``)."""
    return zsre_scores(measure_zsre(model, tok, record, target=target, batch_size=batch_size))


def evaluate_zsre(
    model: Any,
    tok: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
    target: str = "answers",
    batch_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """For each record: measure, create the edit on the base, measure with it applied, revert."""
    editor = Editor(model, tok, hparams=hparams, stats=stats)
    for rec in records:
        req = zsre_request(rec, target=target)
        d, pre, post = measured_edit(
            editor, req, lambda rec=rec: score_zsre(model, tok, rec, target=target, batch_size=batch_size)
        )
        yield {
            "kind": "zsre",
            "case_id": rec.get("case_id"),
            "subject": req.subject,
            "prompt": req.prompt,
            "target_new": req.target_new,
            "zsre_target": target,
            "pre": pre,
            "post": post,
            "edit": edit_summary(d),
        }


__all__ = [
    "load_zsre",
    "zsre_request",
    "measure_zsre",
    "zsre_scores",
    "score_zsre",
    "evaluate_zsre",
    "teacher_forced_correct",
]
