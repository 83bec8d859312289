"""Issue 15, point 4: Gemma-3-270m on the shared zsRE subset at its default layer (3).

The edits are computed by ``rompatch eval`` (long: resumable, and shared out under torchrun)::

    ROMPATCH_DATA=... python -m rompatch eval gemma3-270m \\
        --data $ROMPATCH_DATA/zsre/zsre_mend_eval_subset.json --out bench/results/zsre-gemma3-270m-L3 \\
        --no-plot --neighbours 0

Plain ROME (``--neighbours 0``), as SmolLM2-135M's zsRE run and the plain CounterFact runs. This
benchmark only reads that folder's per-record results (``cases.jsonl``) and tabulates what is there,
beside SmolLM2-135M's complete run (the evaluation suite, issue 6).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.data import missing_data

TITLE = "Edit quality: Gemma-3-270m on zsRE (the shared subset)"
FULL_ONLY = True

HERE = Path(__file__).resolve().parent
RUN = HERE / "results" / "zsre-gemma3-270m-L3"
TOTAL = 737  # records in zsre/zsre_mend_eval_subset.json
COMMAND = (
    "`python -m rompatch eval gemma3-270m --data $ROMPATCH_DATA/zsre/zsre_mend_eval_subset.json "
    "--out bench/results/zsre-gemma3-270m-L3 --no-plot --neighbours 0` (resumes; under torchrun the processes share the records)"
)


def skip_reason() -> str | None:
    if not (RUN / "cases.jsonl").is_file():
        return f"no Gemma zsRE run yet: {COMMAND}"
    return missing_data("zsre/zsre_mend_eval_subset.json")


def _smollm2() -> dict[str, str]:
    path = HERE / "results" / "eval_suite.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["metric"]: str(r["value"]) for r in rows if r["metric"].startswith("zsRE ")}


def _spans(ids: list[int]) -> str:
    """Case ids as ranges: [0, 1, 2, 5] -> '0-2, 5'; more than four ranges are summarised."""
    ids = sorted(ids)
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = [f"{a}-{b}" if a != b else f"{a}" for a, b in spans]
    if len(text) > 4:
        return f"ids {text[0]} and {len(ids) - (spans[0][1] - spans[0][0] + 1)} more up to {ids[-1]}"
    return "ids " + ", ".join(text)


def run() -> dict:
    cases = [json.loads(x) for x in (RUN / "cases.jsonl").read_text().splitlines() if x.strip()]
    n = len(cases)
    complete = n >= TOTAL

    def pct(when: str, k: str) -> float:
        return 100 * statistics.fmean(c[when][k] for c in cases)

    capped = sum(bool(c["edit"].get("delta_capped")) for c in cases)
    secs = [c["edit"]["seconds"] for c in cases if c["edit"].get("seconds") is not None]
    smol = _smollm2()
    rows = []
    for k in ("efficacy", "paraphrase", "specificity"):
        label = f"zsRE {k.capitalize()}"
        rows.append(
            {
                "metric": label,
                "value": f"{pct('pre', k):.1f} → {pct('post', k):.1f}",
                "unit": "%",
                "note": f"token accuracy, unedited → edited, {n} of {TOTAL} records; SmolLM2-135M (layer 4) "
                f"on all {TOTAL}: {smol.get(label, '?')}",
            }
        )
    rows += [
        {
            "metric": "records evaluated",
            "value": n,
            "unit": "records",
            "target": f"{TOTAL}",
            "note": f"{'reproduce' if complete else 'the run resumes'}: {COMMAND}",
        },
        {
            "metric": "updates at the size cap (‖ΔW‖₂ = ‖W‖₂)",
            "value": f"{capped} of {n}",
            "unit": "",
            "note": "as on CounterFact (334 of 357): Gemma's edits need the largest update the cap allows",
        },
        {
            "metric": "edit time, median",
            "value": statistics.median(secs) if secs else "?",
            "unit": "s",
            "note": "CPU, 2 cores: one process with 2 threads (records 0-125, niced beside other jobs), then "
            "two torchrun processes with 1 thread each",
        },
    ]
    return {
        "rows": rows,
        "setup": "Gemma-3-270m (base), default layer 3, statistics 100,000 WikiText-2 tokens, target answers[0] "
        "(ROME's reference code), metrics as `rompatch eval` defines them (docs/evaluation.md)."
        + (
            ""
            if complete
            else f" Partial: {n} of {TOTAL} records ({_spans([c['case_id'] for c in cases])}; torchrun deals out "
            "the rest in file order)."
        ),
    }
