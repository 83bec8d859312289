"""CounterFact evaluation (efficacy, paraphrase, neighborhood, magnitudes, S), as in the ROME paper.

For each record the edit is created on the base model, then measured before and after:
- efficacy ES: P(new) > P(true) on the rewrite prompt; magnitude EM = P(new) − P(true);
- paraphrase PS / PM: the same on ``paraphrase_prompts``;
- neighborhood NS / NM: P(true) > P(new) on ``neighborhood_prompts``; NM = P(true) − P(new);
- S: harmonic mean of ES, PS and NS.
P(·) is the full-sequence probability of the target after the prompt (multi-token targets summed
in log space). Scores are percentages over cases (each case's score is the mean over its prompts).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .apply import patched
from .errors import RequestError
from .models import model_identity
from .patch import ParamInfo, new_patch
from .request import EditRequest
from .rome import ROMEHyperParams
from .scoring import target_logprobs
from .stats import SecondMoment


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


def _prompt_scores(
    model: Any, tok: Any, prompts: Sequence[str], new: str, true: str
) -> dict[str, list[float]]:
    lp = target_logprobs(model, tok, prompts, [new, true])
    return {"logp_new": lp[:, 0].tolist(), "logp_true": lp[:, 1].tolist()}


def measure_case(model: Any, tok: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """Log-probabilities of both targets on the rewrite, paraphrase and neighborhood prompts."""
    rr = record["requested_rewrite"]
    new, true = rr["target_new"]["str"], rr["target_true"]["str"]
    groups = {
        "rewrite": [rr["prompt"].format(rr["subject"])],
        "paraphrase": list(record.get("paraphrase_prompts", [])),
        "neighborhood": list(record.get("neighborhood_prompts", [])),
    }
    flat = [p for ps in groups.values() for p in ps]
    lp = _prompt_scores(model, tok, flat, new, true)
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
    xs = [x for x in xs if not math.isnan(x)]
    if not xs or min(xs) <= 0:
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def summarize(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean scores (percent) before and after, with S, over ``cases`` (each with 'pre' and 'post')."""
    out: dict[str, Any] = {"n": len(cases)}
    for phase in ("pre", "post"):
        if not all(phase in c for c in cases):
            continue
        per = [c[phase] for c in cases]
        s = {k: 100 * statistics.fmean(x[k] for x in per if not math.isnan(x[k])) for k in per[0]}
        s["S"] = harmonic([s["ES"], s["PS"], s["NS"]])
        out[phase] = {k: round(v, 2) for k, v in s.items()}
    return out


def evaluate_counterfact(
    model: Any,
    tok: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
) -> Iterator[dict[str, Any]]:
    """For each record: measure, create the edit on the base, measure with it applied, revert."""
    from .create import edit_to_delta

    for rec in records:
        req = EditRequest.from_dict(rec)
        pre_raw = measure_case(model, tok, rec)
        d = edit_to_delta(model, tok, req, stats=stats, hparams=hparams)
        patch = new_patch(
            [d],
            base=model_identity(model),
            parameters={d.parameter: ParamInfo.of(model.get_parameter(d.parameter).data)},
        )
        with patched(model, patch):
            post_raw = measure_case(model, tok, rec)
        yield {
            "case_id": rec.get("case_id"),
            "subject": req.subject,
            "prompt": req.prompt,
            "target_new": req.target_new,
            "target_true": req.target_true,
            "pre": case_scores(pre_raw),
            "post": case_scores(post_raw),
            "edit": {
                k: d.metrics.get(k)
                for k in (
                    "seconds",
                    "v_norm",
                    "update_spectral_norm",
                    "weight_spectral_norm",
                    "v_steps_run",
                    "p_new_before",
                    "p_new_after",
                )
            },
            "templates_dropped_position0": bool(d.hparams.get("templates_dropped_position0")),
        }


def update_too_large(case: Mapping[str, Any]) -> bool:
    e = case["edit"]
    return e["update_spectral_norm"] > e["weight_spectral_norm"]


__all__ = ["evaluate_counterfact", "summarize", "measure_case", "case_scores", "load_counterfact"]
