"""Prompts that open with their subject (issue 15, point 3): `python -m bench.run --only
opening_subjects` renders bench/results/opening_subjects_entries.json, which the script writes (about a
minute a record on a CPU; it resumes):

    ROMPATCH_DATA=... python -m bench.opening_subjects
"""

from __future__ import annotations

import json
import statistics

from bench import opening_subjects

TITLE = "Prompts that open with their subject (issue 15): can a rank-one edit reach them without BOS?"
FULL_ONLY = True
OUT = opening_subjects.OUT

FINDINGS = """
What the numbers say:

- **A one-token subject at position 0 cannot be edited specifically.** The default edit reaches the
  bare prompt at 0.7 to 2.9% of its strength (its key is the attention sink's, cosine 0.05 to 0.13
  with k*), so the prompt keeps its answer while every paraphrase changes (PS 1.0). A delta keyed
  there does make the prompt work (Egypt), but it fires at reach ≥ 0.5 on **every one** of 2,000
  other sentence openings at position 0, and on 0.2 to 0.4% of running-text tokens: it would change
  the first token of any text. No specific edit exists there; `create` leaves the bare prompt out
  (`templates_dropped_position0`) and says so.
- **A multi-token subject is reachable.** Bill Gates and Peter Jason end at position 1, where the
  default edit reaches the bare prompt at 0.66 and 0.81 of its strength. The update is held at the
  size cap, but the cap is not what stops it: with the cap doubled the update stops at ROME's own
  clamp on ‖δ‖ (4 ‖W k*‖) after all 25 steps, and the prompt still misses while the optimisation's
  prompts average P(target) 0.88 and 0.69. The value is optimised on 21 prompts, the requested one and
  20 context templates; the templates take the update, and the requested prompt is one voice of 21. Two ways reach it:
  - one rank-one delta with more weight on the prompt's own key (key_prompt_weight 0.8 instead of
    0.5): ES 1 on both, but the paraphrase margin of one falls from 0.27 to 0.03 (1.0: 0.00);
  - a second delta keyed at the opening position, orthogonal to the context templates' keys: ES 1
    on both with the paraphrase margins kept (0.92 → 0.92, 0.27 → 0.27) and NS unchanged, at
    0.34 to 0.58 ‖W‖₂; it reaches none of 2,000 other sentence openings and none of 19,368
    running-text tokens at 0.3 (largest 0.27). A specific edit exists; it is rank two. `create`
    now makes it (`opening_delta`, on by default) when such a prompt misses: below 0.5 P(target)
    after the optimisation.
- **On by default, because it wins and costs nothing measurable.** Over SmolLM2's 357 CounterFact
  records, 13 edits get an opening delta: both misses become hits (ES 98.3 → 98.9), the prompt's own
  margin rises on all 13 (EM −0.03 to 0.50 → 0.91 to 0.99), and PS and NS stay as they were, on those 13
  and overall. The other 344 edits are the same as before.
"""


def skip_reason() -> str | None:
    return (
        None if OUT.is_file() else f"no measurements yet: run python -m bench.opening_subjects ({OUT.name})"
    )


def _pos(c: dict) -> str:
    return ", ".join(
        f"{p}: {v['ge_0.5']:.1f}% (max {v['max']:.2f})" for p, v in c["u2_reach_openings_by_position"].items()
    )


def markdown(d: dict) -> str:
    lines = [
        f"{d['model']}, layer {d['layer']}; {d['openings']:,} WikiText-2 sentence openings, "
        f"{d['running_tokens']:,} running-text tokens. Scores: ES / PS (paraphrase margin PM) / NS; "
        "'second delta' = both deltas applied.",
        "",
        "| case | subject (last token at) | prompt | default reach at the bare prompt | default ES / PS (PM) / NS "
        "| with the second delta | second delta ‖ΔW‖₂/‖W‖₂ | second delta at reach ≥ 0.5, openings by position "
        "| running text ≥ 0.5 (max) |",
        "| --- | --- | --- | ---: | --- | --- | ---: | --- | --- |",
    ]
    for c in d["cases"]:
        one, two = c["one_delta"], c["two_deltas"]
        lines.append(
            f"| {c['case_id']} | {c['subject']} ({c['subject_last_position']}) | {c['prompt']} → {c['target_new']} "
            f"| {c['reach1_at_bare']:.3f} | {one['ES']:.0f} / {one['PS']:.1f} ({one['PM']:.2f}) / {one['NS']:.1f} "
            f"| {two['ES']:.0f} / {two['PS']:.1f} ({two['PM']:.2f}) / {two['NS']:.1f} | {c['update2_ratio']:.2f} "
            f"| {_pos(c)} | {c['u2_reach_running_text']['ge_0.5']:.2f}% ({c['u2_reach_running_text']['max']:.2f}) |"
        )
    var = [
        f"- {c['case_id']} {c['subject']}, {', '.join(f'{k} {v}' for k, v in x['change'].items())}: ES "
        f"{x['scores']['ES']:.0f}, PS {x['scores']['PS']:.1f} (PM {x['scores']['PM']:.2f}), NS {x['scores']['NS']:.1f}; "
        f"capped {x['delta_capped']}, {x['v_steps_run']} steps"
        for c in d["cases"]
        for x in c.get("rank_one_variants", [])
    ]
    return "\n".join(
        lines + (["", "One rank-one delta, changed to reach the bare prompt more:", *var] if var else [])
    )


def rerun_markdown() -> list[str]:
    """The CounterFact run with today's engine: the re-run records in place of their baseline."""
    if not opening_subjects.RERUN.is_file():
        return []
    base = {c["case_id"]: c for c in map(json.loads, opening_subjects.BASELINE.read_text().splitlines())}
    new = {c["case_id"]: c for c in map(json.loads, opening_subjects.RERUN.read_text().splitlines())}
    both = {**base, **new}
    got = [c for c in new.values() if c["edit"].get("opening_delta")]
    high = [c for c in got if base[c["case_id"]]["edit"]["p_new_after"] >= 0.5]

    def row(name: str, cases: list[dict], when: str = "post") -> str:
        es, ps, ns = (100 * statistics.fmean(c[when][k] for c in cases) for k in ("ES", "PS", "NS"))
        s = 3 / (1 / es + 1 / ps + 1 / ns) if min(es, ps, ns) > 0 else 0.0
        return f"| {name} | {len(cases)} | {es:.1f} | {ps:.1f} | {ns:.1f} | {s:.1f} |"

    changed = [base[c["case_id"]] for c in got]
    rest = [c for c in new.values() if not c["edit"].get("opening_delta")]
    same = sum(
        max(abs(c["post"][k] - base[c["case_id"]]["post"][k]) for k in ("ES", "EM", "PS", "PM", "NS", "NM"))
        < 1e-4
        for c in rest
    )
    lines = [
        "",
        f"SmolLM2's CounterFact run with opening deltas (on by default): {len(new)} records re-run (prompt opens "
        f"with a multi-token subject, P(new) below {opening_subjects.RERUN_BELOW} in bench/results/counterfact-L4.jsonl), "
        f"{len(got)} of them got an opening delta ({len(high)} whose old P(new) was 0.5 or more); the other "
        f"{len(base) - len(new)} records are computed exactly as before. Of the {len(rest)} re-run records "
        f"without one, {same} reproduce their old scores to 1e-4 (the rest differ by float rounding between "
        "runs, in the v norm's fourth digit).",
        "",
        "| run | records | ES | PS | NS | S |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        row("unedited", list(base.values()), "pre"),
        row("before opening deltas (counterfact-L4)", list(base.values())),
        row("with opening deltas", list(both.values())),
    ]
    if got:
        lines += [
            row("the records that got one, before", changed),
            row("the records that got one, with it", got),
        ]
    lines += [
        "",
        "Records that got an opening delta: "
        + "; ".join(
            f"{c['case_id']} {c['subject']!r} ES {base[c['case_id']]['post']['ES']:.0f}→{c['post']['ES']:.0f}, "
            f"PS {base[c['case_id']]['post']['PS']:.2f}→{c['post']['PS']:.2f}, "
            f"NS {base[c['case_id']]['post']['NS']:.1f}→{c['post']['NS']:.1f}"
            for c in got
        ),
    ]
    return lines


def run() -> dict:
    d = json.loads(OUT.read_text())
    rows = [
        {
            "metric": f"case {c['case_id']} {c['subject']}: ES default → with a second delta at the opening",
            "value": f"{c['one_delta']['ES']:.0f} → {c['two_deltas']['ES']:.0f}",
            "unit": "",
            "target": "",
            "note": f"second delta fires at reach ≥ 0.5 on {c['u2_reach_openings_by_position']['0']['ge_0.5']:.1f}% of "
            "other openings at position 0",
        }
        for c in d["cases"]
    ]
    md = "\n".join([markdown(d), *rerun_markdown()])
    return {"rows": rows, "markdown": md + "\n" + FINDINGS, "setup": " ".join(__doc__.split())}
