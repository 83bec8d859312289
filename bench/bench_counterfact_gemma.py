"""Issue 15, point 4: Gemma-3-270m over all CounterFact records in $ROMPATCH_DATA, at its default
layer (long; resumable like bench_counterfact, into bench/results/counterfact-gemma3-270m-L<layer>.jsonl).
``ROMPATCH_BENCH_NEIGHBOURS=N`` runs it with ``ROMEHyperParams.neighbours`` (file suffix ``-nbN``)."""

from __future__ import annotations

import json
import statistics

from bench import bench_counterfact

TITLE = "Edit quality: Gemma-3-270m on CounterFact (all records in shared data)"
FULL_ONLY = True
skip_reason = bench_counterfact.skip_reason


# The runs beside each other: label, file in bench/results (a missing or partial file is left out).
BESIDE = (
    ("Gemma-3-270m, layer 3", "counterfact-gemma3-270m-L3.jsonl"),
    ("Gemma-3-270m, layer 3, `--neighbours 64` (its default)", "counterfact-gemma3-270m-L3-nb64.jsonl"),
    ("SmolLM2-135M, layer 4 (its default)", "counterfact-L4.jsonl"),
    ("SmolLM2-135M, layer 4, `--neighbours 64`", "counterfact-L4-nb64.jsonl"),
)


def beside_smollm2(cases: list[dict]) -> str:
    """Gemma's scores next to SmolLM2's (layer 4), plain and with neighbours, on the records every run
    holds, from the runs' files."""
    runs = []
    for label, name in BESIDE:
        path = bench_counterfact.WORK / name
        if path.is_file():
            runs.append((label, {c["case_id"]: c for c in map(json.loads, path.read_text().splitlines())}))
    ids = [c["case_id"] for c in cases if all(c["case_id"] in r for _, r in runs)]
    if len(runs) < 2 or not ids:
        return ""

    def pct(cs: list[dict], when: str, k: str) -> float:
        return 100 * statistics.fmean(c[when][k] for c in cs)

    def capped(cs: list[dict]) -> int:
        return sum(map(bench_counterfact.at_size_cap, cs))

    rows = [
        "",
        f"Beside SmolLM2-135M (layer 4) on the same {len(ids)} records:",
        "",
        "| model | ES | PS | NS unedited → edited | NS change | updates at the cap ‖ΔW‖₂ = ‖W‖₂ |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for label, r in runs:
        cs = [r[i] for i in ids]
        pre, post = pct(cs, "pre", "NS"), pct(cs, "post", "NS")
        rows.append(
            f"| {label} | {pct(cs, 'post', 'ES'):.1f} | {pct(cs, 'post', 'PS'):.1f} | {pre:.1f} → {post:.1f} | "
            f"{post - pre:+.1f} | {capped(cs)} of {len(cs)} |"
        )
    return "\n".join(rows)


def run() -> dict:
    res = bench_counterfact.run(model_name="gemma3-270m")
    cases = [
        json.loads(x)
        for x in (bench_counterfact.WORK / "counterfact-gemma3-270m-L3.jsonl").read_text().splitlines()
    ]
    from bench.data import data_file
    from rompatch.evaluation.evaluate import load_counterfact

    total = len(load_counterfact(str(data_file("counterfact/counterfact_subset.json"))))
    if len(cases) < total:
        res["setup"] += (
            f" **{len(cases)} of the {total} records so far** (in file order; the run resumes: "
            '`ROMPATCH_BENCH_MODEL=gemma3-270m python -c "from bench import bench_counterfact; '
            'bench_counterfact.run()"`, with `ROMPATCH_BENCH_NEIGHBOURS=64` for the neighbours run).'
        )
    res["markdown"] += "\n" + beside_smollm2(cases)
    return res
