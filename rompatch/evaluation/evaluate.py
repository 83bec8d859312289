"""The ROME paper's evaluation suite: CounterFact and zsRE, before and after each edit.

CounterFact (per record, the edit created on the base model, measured before and after):
- efficacy ES: P(new) > P(true) on the rewrite prompt; magnitude EM = P(new) − P(true);
- paraphrase PS / PM: the same on ``paraphrase_prompts``;
- neighborhood NS / NM: P(true) > P(new) on ``neighborhood_prompts``; NM = P(true) − P(new);
- S: harmonic mean of ES, PS and NS;
- fluency GE (optional): weighted bi/tri-gram entropy of top-k generations from
  ``generation_prompts`` (see ``rompatch.evaluation.fluency``), reported ×100 like the paper;
- consistency RS (optional, needs ROME's attribute snippets): TF-IDF cosine of the generations
  with Wikipedia texts about ``target_new``.
P(·) is the full-sequence probability of the target after the prompt (multi-token targets summed
in log space). Scores are percentages over cases (each case's score is the mean over its prompts).

zsRE: see ``rompatch.evaluation.zsre`` (token-level accuracy).

``run_evaluation`` drives either suite with resume: per-case results are appended to
``OUT/cases.jsonl`` as they finish and skipped on a rerun with the same configuration.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..create import Editor
from ..distributed import SINGLE, Group
from ..errors import EvalError, RequestError
from ..request import EditRequest
from ..rome import ROMEHyperParams
from ..scoring import target_logprobs
from ..stats import SecondMoment
from .edits import edit_summary, measured_edit
from .fluency import Consistency, GenerationSettings, fluency
from .metrics import harmonic_mean
from .records import CASES_FILE, PART_FILE, append_record, check_config, read_cases, read_json, write_results
from .zsre import evaluate_zsre, is_zsre, prepare_zsre

log = logging.getLogger(__name__)

KINDS = ("counterfact", "zsre")


# ------------------------------------------------------------------------------------ data


def load_counterfact(path: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    data = read_json(path, error=RequestError)
    if not isinstance(data, list) or not data or "requested_rewrite" not in data[0]:
        raise RequestError(
            f"{path} is not a CounterFact file (a JSON list of records with 'requested_rewrite')"
        )
    return data[:limit] if limit else data


def detect_kind(records: Any) -> str:
    """'counterfact' or 'zsre' from the first record's fields."""
    first = records[0] if isinstance(records, list) and records else None
    if isinstance(first, Mapping) and "requested_rewrite" in first:
        return "counterfact"
    if is_zsre(first):
        return "zsre"
    raise EvalError(
        "cannot tell the data kind: records have neither 'requested_rewrite' (CounterFact) nor "
        "'src'/'loc' (zsRE); pass --kind counterfact or --kind zsre with a file of that shape"
    )


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise EvalError(f"kind must be counterfact or zsre, not {kind!r}")


def load_records(
    path: str, *, kind: str = "auto", limit: int | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Read a CounterFact or zsRE file; returns (kind, records). ``kind='auto'`` detects it."""
    if kind not in ("auto", *KINDS):
        raise EvalError(f"kind must be auto, counterfact or zsre, not {kind!r}")
    data = read_json(path, unreadable="cannot read {path}: {reason}; pass an existing JSON file")
    if not isinstance(data, list) or not data:
        raise EvalError(f"{path} must be a non-empty JSON list of CounterFact or zsRE records")
    found = detect_kind(data)
    if kind != "auto" and kind != found:
        raise EvalError(f"{path} holds {found} records, not {kind}; pass --kind {found} or --kind auto")
    if found == "zsre":
        return found, prepare_zsre(data, where=path, limit=limit)
    return found, data[:limit] if limit else data


# -------------------------------------------------------------------------------- measure


def _prompt_scores(
    model: Any, tok: Any, prompts: Sequence[str], new: str, true: str, *, batch_size: int = 64
) -> dict[str, list[float]]:
    lp = target_logprobs(model, tok, prompts, [new, true], batch_size=batch_size)
    return {"logp_new": lp[:, 0].tolist(), "logp_true": lp[:, 1].tolist()}


def measure_case(model: Any, tok: Any, record: Mapping[str, Any], *, batch_size: int = 64) -> dict[str, Any]:
    """Log-probabilities of both targets on the rewrite, paraphrase and neighborhood prompts."""
    rr = record["requested_rewrite"]
    new, true = rr["target_new"]["str"], rr["target_true"]["str"]
    groups = {
        "rewrite": [rr["prompt"].format(rr["subject"])],
        "paraphrase": list(record.get("paraphrase_prompts", [])),
        "neighborhood": list(record.get("neighborhood_prompts", [])),
    }
    flat = [p for ps in groups.values() for p in ps]
    lp = _prompt_scores(model, tok, flat, new, true, batch_size=batch_size)
    out, i = {}, 0
    for g, ps in groups.items():
        out[g] = {"logp_new": lp["logp_new"][i : i + len(ps)], "logp_true": lp["logp_true"][i : i + len(ps)]}
        i += len(ps)
    return out


def case_scores(m: Mapping[str, Any]) -> dict[str, float]:
    """Per-case ES/EM, PS/PM, NS/NM from ``measure_case`` output (fractions and probability gaps)."""

    def frac(g, sign):
        pairs = list(zip(m[g]["logp_new"], m[g]["logp_true"]))
        if not pairs:
            return float("nan"), float("nan")
        wins = [(a > b) if sign > 0 else (b > a) for a, b in pairs]
        mags = [sign * (math.exp(a) - math.exp(b)) for a, b in pairs]
        return sum(wins) / len(wins), sum(mags) / len(mags)

    es, em = frac("rewrite", +1)
    ps, pm = frac("paraphrase", +1)
    ns, nm = frac("neighborhood", -1)
    return {"ES": es, "EM": em, "PS": ps, "PM": pm, "NS": ns, "NM": nm}


def score_case(model: Any, tok: Any, record: Mapping[str, Any], *, batch_size: int = 64) -> dict[str, float]:
    """ES/EM, PS/PM, NS/NM of the model as it is now on one record (``case_scores`` of ``measure_case``)."""
    return case_scores(measure_case(model, tok, record, batch_size=batch_size))


# ------------------------------------------------------------------------------- summarize

PERCENT_KEYS = ("ES", "EM", "PS", "PM", "NS", "NM", "GE", "RS", "efficacy", "paraphrase", "specificity")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def summarize(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean scores (×100, percent for rates) before and after over ``cases`` (each with 'pre' and
    'post'); S for CounterFact. Works on records with or without fluency/consistency keys."""
    out: dict[str, Any] = {"n": len(cases)}
    for phase in ("pre", "post"):
        per = [c[phase] for c in cases if phase in c]
        if not per or len(per) != len(cases):
            continue
        keys = [k for k in PERCENT_KEYS if any(k in x for x in per)]
        keys += sorted({k for x in per for k in x} - set(keys))
        s = {k: 100 * _mean([x[k] for x in per if k in x]) for k in keys}
        if all(k in s for k in ("ES", "PS", "NS")):
            h = harmonic_mean([s["ES"], s["PS"], s["NS"]])
            s["S"] = 0.0 if math.isnan(h) else h  # S is 0 when none of ES, PS, NS was measured
        out[phase] = {k: (None if math.isnan(v) else round(v, 2)) for k, v in s.items()}
    return out


# ------------------------------------------------------------------------------- one edit


def _scores_and_texts(
    model: Any,
    tok: Any,
    rec: Mapping[str, Any],
    *,
    generation: GenerationSettings | None,
    consistency: Consistency | None,
    batch_size: int,
) -> tuple[dict[str, float], list[str] | None]:
    """A record's scores on the model as it is now, with GE (and RS) and the generated texts."""
    scores = score_case(model, tok, rec, batch_size=batch_size)
    texts = None
    prompts = list(rec.get("generation_prompts", []))
    if generation is not None and prompts:
        scores["GE"], texts = fluency(model, tok, prompts, settings=generation)
        if consistency is not None:
            scores["RS"] = consistency.score(rec, texts)
    return scores, texts


def evaluate_counterfact(
    model: Any,
    tok: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
    generation: GenerationSettings | None = None,
    consistency: Consistency | None = None,
    batch_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """For each record: measure, create the edit on the base, measure with it applied, revert.

    ``generation`` (a ``fluency.GenerationSettings``) adds fluency GE (and, with ``consistency``,
    a ``fluency.Consistency``, the reference score RS) to 'pre' and 'post', and the generated texts.
    """
    editor = Editor(model, tok, hparams=hparams, stats=stats)
    for rec in records:
        req = EditRequest.from_dict(rec)
        d, (pre, pre_texts), (post, post_texts) = measured_edit(
            editor,
            req,
            lambda rec=rec: _scores_and_texts(
                model, tok, rec, generation=generation, consistency=consistency, batch_size=batch_size
            ),
        )
        out = {
            "case_id": rec.get("case_id"),
            "subject": req.subject,
            "prompt": req.prompt,
            "target_new": req.target_new,
            "target_true": req.target_true,
            "pre": pre,
            "post": post,
            "edit": edit_summary(d),
            "templates_dropped_position0": bool(d.hparams.get("templates_dropped_position0")),
        }
        if pre_texts is not None:
            out["generations"] = {"pre": pre_texts, "post": post_texts}
        yield out


def update_too_large(case: Mapping[str, Any]) -> bool:
    e = case["edit"]
    return e["update_spectral_norm"] > e["weight_spectral_norm"]


# ------------------------------------------------------------------------------- tables

CF_COLUMNS = [
    ("S", "Score S"),
    ("ES", "Efficacy ES"),
    ("EM", "EM"),
    ("PS", "Generalization PS"),
    ("PM", "PM"),
    ("NS", "Specificity NS"),
    ("NM", "NM"),
    ("GE", "Fluency GE"),
    ("RS", "Consistency RS"),
]
ZSRE_COLUMNS = [("efficacy", "Efficacy"), ("paraphrase", "Paraphrase"), ("specificity", "Specificity")]


def _cell(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def summary_rows(summary: Mapping[str, Any], *, model_label: str, edit_label: str) -> list[tuple[str, dict]]:
    rows = []
    if "pre" in summary:
        rows.append((f"{model_label} (unedited)", summary["pre"]))
    if "post" in summary:
        rows.append((f"{model_label} + {edit_label}", summary["post"]))
    return rows


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, Any]]], *, kind: str, notes: Sequence[str] = ()
) -> str:
    """A results table shaped like the paper's (Table 4 for CounterFact, Table 1 for zsRE)."""
    cols = CF_COLUMNS if kind == "counterfact" else ZSRE_COLUMNS
    lines = [
        "| Editor | " + " | ".join(name for _, name in cols) + " |",
        "| --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for label, vals in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(vals.get(k)) for k, _ in cols) + " |")
    if notes:
        lines.append("")
        lines += [f"{n}" for n in notes]
    return "\n".join(lines)


def summary_notes(kind: str, config: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    notes = [f"n = {summary.get('n')} cases; all values are means over cases in percent (GE: entropy ×100)."]
    if kind == "counterfact":
        gen = config.get("generation")
        if gen:
            notes.append(
                f"GE: top-{gen['top_k']} sampling, {gen['max_out_len']} tokens per generation including the "
                f"prompt (the paper uses 100), seed {gen['seed']}, weighted bi/tri-gram entropy as in ROME."
            )
        else:
            notes.append("GE: not measured (generation disabled).")
        if summary.get("post", {}).get("RS") is not None:
            notes.append(
                "RS: TF-IDF cosine between the generations and the reference texts about target_new "
                "(ROME's attribute snippets), as in ROME."
            )
        else:
            notes.append(
                "RS: not reported. It needs ROME's attribute_snippets.json (Wikipedia texts per relation and "
                "target) and its TF-IDF statistics (idf.npy, tfidf_vocab.json); neither is in the data used here. "
                "Pass --snippets (and --tfidf) to report it."
            )
    else:
        notes.append(
            f"zsRE token accuracy; edit target: {config.get('zsre_target', 'answers')} "
            "(answers = answers[0], as in the ROME reference code)."
        )
    return notes


# ------------------------------------------------------------------------- resumable runs


def _done_cases(out: Path | None, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The cases an earlier run of ``config`` finished in ``out`` (by case id); checks the config."""
    if out is None:
        return {}
    check_config(out, config)
    return {str(c["case_id"]): c for c in read_cases(out / CASES_FILE)}


def _merge_parts(out: Path) -> None:
    """Add the cases in torchrun processes' part files that ``cases.jsonl`` lacks, then remove the
    parts (a run that was stopped before rank 0 gathered them leaves them behind)."""
    parts = sorted(out.glob(PART_FILE.format(rank="*")))
    if not parts:
        return
    have = {str(c["case_id"]) for c in read_cases(out / CASES_FILE)}
    for part in parts:
        for c in read_cases(part):
            if str(c["case_id"]) not in have:
                append_record(out / CASES_FILE, c)
                have.add(str(c["case_id"]))
    for part in parts:
        part.unlink()


def _collect(
    cases: Iterator[dict[str, Any]],
    done: dict[str, dict[str, Any]],
    *,
    path: Path | None,
    on_case: Callable[[dict[str, Any]], None] | None,
    bar: Any,
) -> tuple[list[dict[str, Any]], float]:
    """Add each case to ``done`` (and append it to ``path``) as it finishes.
    Returns (the cases computed, seconds taken)."""
    t0 = time.perf_counter()
    computed: list[dict[str, Any]] = []
    try:
        for c in cases:
            done[str(c["case_id"])] = c
            computed.append(c)
            if path is not None:
                append_record(path, c)
            if on_case is not None:
                on_case(c)
            bar.update(1)
    finally:
        bar.close()
    return computed, time.perf_counter() - t0


def run_summary(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summarize`` plus the median edit time and the cases whose update outgrew the matrix."""
    summary = summarize(cases)
    secs = [c["edit"]["seconds"] for c in cases if c.get("edit", {}).get("seconds") is not None]
    summary["median_edit_seconds"] = statistics.median(secs) if secs else None
    summary["updates_larger_than_matrix"] = [
        c["case_id"]
        for c in cases
        if c.get("edit", {}).get("update_spectral_norm") is not None and update_too_large(c)
    ]
    return summary


def run_evaluation(
    model: Any,
    tok: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    kind: str,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
    config: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    generation: GenerationSettings | None = None,
    consistency: Consistency | None = None,
    zsre_target: str = "answers",
    batch_size: int = 64,
    progress: bool = False,
    model_label: str = "model",
    on_case: Callable[[dict[str, Any]], None] | None = None,
    group: Group = SINGLE,
) -> dict[str, Any]:
    """Evaluate every record (resuming from ``out_dir/cases.jsonl``) and summarise.

    With ``out_dir``: per-case results are appended to ``cases.jsonl`` as they finish; cases already
    there are skipped (the folder's ``config.json`` must match ``config``); at the end
    ``results.json`` (summary + cases) and ``summary.md`` are written atomically.
    Returns {"summary", "cases", "config", "markdown", "seconds", "computed"}.

    ``group`` (torchrun, ``rompatch.distributed``): the records still to do are dealt out
    round-robin; each process appends its cases to its own part file, and at the end every process
    gets all cases while rank 0 adds them to ``cases.jsonl`` and writes the results. A stopped
    run resumes with any number of processes.
    """
    from tqdm.auto import tqdm

    check_kind(kind)
    config = dict(config or {})
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and group.is_main:
        check_config(out, config)  # rank 0 writes config.json before the others read it
        _merge_parts(out)
    group.barrier()
    done = _done_cases(out, config)
    todo = [r for r in records if str(r.get("case_id")) not in done]
    if done and group.is_main:
        log.info("resuming: %d of %d cases already done", len(records) - len(todo), len(records))
    todo = todo[group.rank :: group.world]
    if kind == "counterfact":
        cases = evaluate_counterfact(
            model, tok, todo, hparams=hparams, stats=stats, generation=generation, consistency=consistency,
            batch_size=batch_size,
        )  # fmt: skip
    else:
        cases = evaluate_zsre(
            model, tok, todo, hparams=hparams, stats=stats, target=zsre_target, batch_size=batch_size
        )
    if group.world == 1:
        bar = tqdm(
            total=len(records), initial=len(records) - len(todo), desc=kind, unit="case", disable=not progress
        )
    else:  # rank 0's own share
        desc = f"{kind} (rank 0 of {group.world})"
        bar = tqdm(total=len(todo), desc=desc, unit="case", disable=not progress or not group.is_main)
    path = (
        None if out is None else out / (CASES_FILE if group.world == 1 else PART_FILE.format(rank=group.rank))
    )
    mine, seconds = _collect(cases, done, path=path, on_case=on_case, bar=bar)
    computed = len(mine)
    if group.world > 1:
        shares = group.all_gather(mine)
        computed = sum(len(x) for x in shares)
        for share in shares:
            for c in share:
                done[str(c["case_id"])] = c
        if out is not None and group.is_main:
            _merge_parts(out)
        group.barrier()
    finished = [done[str(r.get("case_id"))] for r in records if str(r.get("case_id")) in done]
    summary = run_summary(finished)
    generation_dict = None if generation is None else generation.to_dict()
    notes = summary_notes(
        kind, {**config, "zsre_target": zsre_target, "generation": generation_dict}, summary
    )
    rows = summary_rows(summary, model_label=model_label, edit_label=f"ROME (layer {hparams.layer})")
    result = {
        "kind": kind,
        "summary": summary,
        "config": config,
        "cases": finished,
        "markdown": markdown_table(rows, kind=kind, notes=notes),
        "seconds": round(seconds, 1),
        "computed": computed,
    }
    if out is not None and group.is_main:
        write_results(out, result)
    return result


__all__ = [
    "KINDS",
    "evaluate_counterfact",
    "summarize",
    "measure_case",
    "case_scores",
    "score_case",
    "load_counterfact",
    "load_records",
    "detect_kind",
    "run_evaluation",
    "markdown_table",
]
