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

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..apply import patched
from ..arch import get_spec
from ..atomic import atomic_write
from ..errors import EvalError, RequestError
from ..models import model_identity
from ..patch import ParamInfo, Patch, RankOneDelta, new_patch
from ..request import EditRequest
from ..rome import ROMEHyperParams
from ..scoring import target_logprobs
from ..stats import SecondMoment
from .metrics import harmonic_mean

log = logging.getLogger(__name__)

KINDS = ("counterfact", "zsre")
CASES_FILE = "cases.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


# ------------------------------------------------------------------------------------ data


def load_counterfact(path: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise RequestError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list) or not data or "requested_rewrite" not in data[0]:
        raise RequestError(
            f"{path} is not a CounterFact file (a JSON list of records with 'requested_rewrite')"
        )
    return data[:limit] if limit else data


def detect_kind(records: Any) -> str:
    """'counterfact' or 'zsre' from the first record's fields."""
    from .zsre import is_zsre

    first = records[0] if isinstance(records, list) and records else None
    if isinstance(first, Mapping) and "requested_rewrite" in first:
        return "counterfact"
    if is_zsre(first):
        return "zsre"
    raise EvalError(
        "cannot tell the data kind: records have neither 'requested_rewrite' (CounterFact) nor "
        "'src'/'loc' (zsRE); pass --kind counterfact or --kind zsre with a file of that shape"
    )


def load_records(
    path: str, *, kind: str = "auto", limit: int | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Read a CounterFact or zsRE file; returns (kind, records). ``kind='auto'`` detects it."""
    from .zsre import prepare_zsre

    if kind not in ("auto", *KINDS):
        raise EvalError(f"kind must be auto, counterfact or zsre, not {kind!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror}; pass an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list) or not data:
        raise EvalError(f"{path} must be a non-empty JSON list of CounterFact or zsRE records")
    found = detect_kind(data)
    if kind != "auto" and kind != found:
        raise EvalError(f"{path} holds {found} records, not {kind}; pass --kind {found} or --kind auto")
    if found == "zsre":
        return found, prepare_zsre(data, where=path, limit=limit)
    return found, data[:limit] if limit else data


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


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


def harmonic(xs: Sequence[float]) -> float:
    """S: harmonic mean of the scores (NaNs ignored; 0 if any is ≤ 0)."""
    h = harmonic_mean(xs)
    return 0.0 if math.isnan(h) else h


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
            s["S"] = harmonic([s["ES"], s["PS"], s["NS"]])
        out[phase] = {k: (None if math.isnan(v) else round(v, 2)) for k, v in s.items()}
    return out


# ------------------------------------------------------------------------------- one edit

EDIT_METRICS = (
    "seconds",
    "v_norm",
    "update_spectral_norm",
    "weight_spectral_norm",
    "v_steps_run",
    "p_new_before",
    "p_new_after",
    "delta_capped",
)


def edit_patch(
    model: Any,
    tok: Any,
    req: EditRequest,
    *,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
    lineage: Sequence[str] = (),
) -> tuple[RankOneDelta, Patch]:
    """Compute one edit on the model as it is now and wrap it in a patch (not applied)."""
    from ..create import edit_to_delta

    spec = get_spec(model)
    d = edit_to_delta(model, tok, req, stats=stats, hparams=hparams)
    info = ParamInfo.of(model.get_parameter(d.parameter).data, spec.layout)
    patch = new_patch([d], base=model_identity(model), parameters={d.parameter: info}, lineage=list(lineage))
    return d, patch


def edit_summary(d: RankOneDelta) -> dict[str, Any]:
    return {k: d.seconds if k == "seconds" else d.metrics.get(k) for k in EDIT_METRICS}


def evaluate_counterfact(
    model: Any,
    tok: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
    generation: Any = None,
    consistency: Any = None,
    batch_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """For each record: measure, create the edit on the base, measure with it applied, revert.

    ``generation`` (a ``fluency.GenerationSettings``) adds fluency GE (and, with ``consistency``,
    a ``fluency.Consistency``, the reference score RS) to 'pre' and 'post', and the generated texts.
    """
    from .fluency import fluency

    def measure(rec):
        scores = case_scores(measure_case(model, tok, rec, batch_size=batch_size))
        texts = None
        prompts = list(rec.get("generation_prompts", []))
        if generation is not None and prompts:
            scores["GE"], texts = fluency(model, tok, prompts, settings=generation)
            if consistency is not None:
                scores["RS"] = consistency.score(rec, texts)
        return scores, texts

    for rec in records:
        req = EditRequest.from_dict(rec)
        pre, pre_texts = measure(rec)
        d, patch = edit_patch(model, tok, req, hparams=hparams, stats=stats)
        with patched(model, patch):
            post, post_texts = measure(rec)
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


def read_cases(path: Path) -> list[dict[str, Any]]:
    """Per-case records from a JSONL file; a truncated last line (interrupted write) is dropped."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping an incomplete last line (interrupted run)", path)
                with open(path, "r+", encoding="utf-8") as f:
                    f.truncate(len("".join(lines[:i]).encode("utf-8")))
                break
            raise EvalError(
                f"{path}: line {i + 1} is not valid JSON; delete the file to start over"
            ) from None
    else:
        if lines and not lines[-1].endswith("\n"):  # complete record, newline not yet written
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return out


def check_config(out_dir: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` on first use; refuse to mix results of another configuration."""
    path = out_dir / CONFIG_FILE
    want = json.loads(json.dumps(config, sort_keys=True))
    if path.is_file():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            have = None
        if have != want:
            diff = (
                sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                if isinstance(have, dict)
                else ["config.json unreadable"]
            )
            raise EvalError(
                f"{out_dir} holds results of a different evaluation (differs in: {', '.join(diff)}); "
                "use another --out folder or delete this one"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(want, indent=2, sort_keys=True)))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, ensure_ascii=False)))


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
    generation: Any = None,
    consistency: Any = None,
    zsre_target: str = "answers",
    batch_size: int = 64,
    progress: bool = False,
    model_label: str = "model",
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every record (resuming from ``out_dir/cases.jsonl``) and summarise.

    With ``out_dir``: per-case results are appended to ``cases.jsonl`` as they finish; cases already
    there are skipped (the folder's ``config.json`` must match ``config``); at the end
    ``results.json`` (summary + cases) and ``summary.md`` are written atomically.
    Returns {"summary", "cases", "config", "markdown", "seconds", "computed"}.
    """
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise EvalError(f"kind must be counterfact or zsre, not {kind!r}")
    config = dict(config or {})
    out = Path(out_dir) if out_dir is not None else None
    done: dict[str, dict[str, Any]] = {}
    if out is not None:
        check_config(out, config)
        for c in read_cases(out / CASES_FILE):
            done[str(c["case_id"])] = c
    todo = [r for r in records if str(r.get("case_id")) not in done]
    if done:
        log.info("resuming: %d of %d cases already done", len(records) - len(todo), len(records))
    if kind == "counterfact":
        gen = evaluate_counterfact(
            model,
            tok,
            todo,
            hparams=hparams,
            stats=stats,
            generation=generation,
            consistency=consistency,
            batch_size=batch_size,
        )
    else:
        from .zsre import evaluate_zsre

        gen = evaluate_zsre(
            model, tok, todo, hparams=hparams, stats=stats, target=zsre_target, batch_size=batch_size
        )
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(records), initial=len(records) - len(todo), desc=kind, unit="case", disable=not progress
    )
    sink = open(out / CASES_FILE, "a", encoding="utf-8") if out is not None else None
    computed = 0
    try:
        for c in gen:
            done[str(c["case_id"])] = c
            computed += 1
            if sink is not None:
                sink.write(json.dumps(c, ensure_ascii=False) + "\n")
                sink.flush()
            if on_case is not None:
                on_case(c)
            bar.update(1)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    seconds = time.perf_counter() - t0
    cases = [done[str(r.get("case_id"))] for r in records if str(r.get("case_id")) in done]
    summary = summarize(cases)
    secs = [c["edit"]["seconds"] for c in cases if c.get("edit", {}).get("seconds") is not None]
    summary["median_edit_seconds"] = statistics.median(secs) if secs else None
    summary["updates_larger_than_matrix"] = [
        c["case_id"]
        for c in cases
        if c.get("edit", {}).get("update_spectral_norm") is not None and update_too_large(c)
    ]
    edit_label = f"ROME (layer {hparams.layer})"
    md = markdown_table(
        summary_rows(summary, model_label=model_label, edit_label=edit_label),
        kind=kind,
        notes=summary_notes(
            kind,
            {
                **config,
                "zsre_target": zsre_target,
                "generation": None if generation is None else generation.to_dict(),
            },
            summary,
        ),
    )
    result = {
        "kind": kind,
        "summary": summary,
        "config": config,
        "cases": cases,
        "markdown": md,
        "seconds": round(seconds, 1),
        "computed": computed,
    }
    if out is not None:
        write_json(out / RESULTS_FILE, {k: v for k, v in result.items() if k != "markdown"})
        atomic_write(out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(md + "\n", encoding="utf-8"))
    return result


__all__ = [
    "evaluate_counterfact",
    "summarize",
    "measure_case",
    "case_scores",
    "load_counterfact",
    "load_records",
    "detect_kind",
    "run_evaluation",
    "markdown_table",
    "edit_patch",
]
