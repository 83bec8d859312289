"""Issue 3: SmolLM2 over all CounterFact records in $ROMPATCH_DATA (long; `make bench-full`).

Per-case results are appended to bench/results/counterfact-<config>.jsonl as they finish (one
line per case, tracked in git), so an interrupted run, even in a later session, resumes where it
stopped. Under torchrun the processes share the pending cases (``rompatch.distributed``), each
appending whole lines to the same file::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m bench.bench_counterfact

Issue 15 runs the same records with other settings, each into its own file:
``ROMPATCH_BENCH_MODEL=gemma3-270m`` (default smollm2-135m; the file gets the model's name) and
``ROMPATCH_BENCH_NEIGHBOURS=N`` (``ROMEHyperParams.neighbours``; the file gets ``-nbN``).
``ROMPATCH_BENCH_DEVICE=cuda`` computes on a GPU (same files; torchrun processes each take their own).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path

from bench.data import data_file, missing_data

TITLE = "Edit quality: SmolLM2-135M on CounterFact (all records in shared data)"
FULL_ONLY = True


def skip_reason() -> str | None:
    return missing_data("counterfact/counterfact_subset.json")


WORK = Path(__file__).resolve().parent / "results"
# How each model's full run shared the machine (its per-record seconds depend on it).
TIMING_NOTES = {
    "smollm2-135m": "one torch thread (two workers shared the 2 cores)",
    "gemma3-270m": "2 torch threads; records 1-145 alone on the 2 cores for the most part, records 146-292 "
    "beside other jobs (tests, benchmarks), which inflates their seconds, 293-357 alone",
}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _pct(cases: list, key: str, when: str = "post") -> str:
    return f"{100 * statistics.fmean(c[when][key] for c in cases):.1f}" if cases else "—"


def run_model(name: str) -> str:
    """The model of a run's file name: 'gemma3-270m-L3-nb64' → 'gemma3-270m', 'L4' → SmolLM2's."""
    m = re.match(r"(?:(.+)-)?L\d+(?:-|$)", name)
    return (m.group(1) if m else None) or "smollm2-135m"


# The rule, set before the full runs, for turning neighbours on by default for a model
# (rompatch.arch.NEIGHBOUR_DEFAULTS): averaged over every record, NS at least this much above plain
# ROME at the same layer, with ES and PS each at most this much below (points).
DEFAULT_RULE = {"NS": 1.0, "ES": -0.5, "PS": -0.5}


def at_size_cap(case: dict) -> bool:
    """Whether the edit's update ends at the size cap ‖ΔW‖₂ = ‖W‖₂ (max_update_ratio 1)."""
    return case["edit"]["update_spectral_norm"] >= 0.999 * case["edit"]["weight_spectral_norm"]


def rule_check(run: dict[int, dict], plain: dict[int, dict]) -> tuple[dict[str, float], int, bool]:
    """A neighbours run against its plain run, on the records both hold: the mean change in points of
    each metric of ``DEFAULT_RULE``, how many records, and whether the rule holds on them."""
    common = set(run) & set(plain)
    if not common:
        return {}, 0, False
    gain = {
        k: 100 * statistics.fmean(run[i]["post"][k] - plain[i]["post"][k] for i in common)
        for k in DEFAULT_RULE
    }
    return gain, len(common), all(gain[k] >= DEFAULT_RULE[k] for k in DEFAULT_RULE)


def read_runs(model: str) -> dict[str, dict[int, dict]]:
    """Every counterfact-*.jsonl of ``model`` in bench/results: run name → case id → case."""
    runs = {}
    for f in sorted(WORK.glob("counterfact-*.jsonl")):
        name = f.stem.removeprefix("counterfact-")
        if run_model(name) == model:
            runs[name] = {c["case_id"]: c for c in map(json.loads, f.read_text().splitlines())}
    return runs


def neighbour_runs(runs: dict[str, dict[int, dict]]) -> list[tuple[str, str, int]]:
    """(run, its plain run, N) for each neighbours run ('...-nbN') whose plain run is there."""
    out = []
    for name in runs:
        m = re.fullmatch(r"(.+)-nb(\d+)", name)
        if m and m.group(1) in runs:
            out.append((name, m.group(1), int(m.group(2))))
    return out


def default_rule(runs: dict[str, dict[int, dict]], total: int) -> list[str]:
    """Markdown: each neighbours run ('...-nbN') against its plain run, and whether the rule holds."""
    out = []
    for name, plain, _ in neighbour_runs(runs):
        gain, n, holds = rule_check(runs[name], runs[plain])
        if not n:
            continue
        does = "holds" if holds else "does not hold"
        verdict = (
            f"{does} on all {total} records: {'on' if holds else 'off'} by default for this model"
            if n >= total
            else f"{does} so far, on {n} of {total} records; the full run decides"
        )
        common = set(runs[name]) & set(runs[plain])

        def mean(run: dict[int, dict], k: str, when: str = "post", ids: set = common) -> float:
            return 100 * statistics.fmean(run[i][when][k] for i in ids)

        levels = ", ".join(
            f"{k} {mean(runs[plain], k):.1f} → {mean(runs[name], k):.1f}" for k in ("ES", "PS", "NS")
        )
        out.append(
            f"- {name} against {plain} on their {n} common records: {levels} (unedited NS "
            f"{mean(runs[plain], 'NS', 'pre'):.1f}); "
            f"NS {gain['NS']:+.1f}, ES {gain['ES']:+.1f}, PS {gain['PS']:+.1f} "
            f"points. The default rule (NS ≥ +{DEFAULT_RULE['NS']:.0f}, ES and PS ≥ {DEFAULT_RULE['ES']:.1f}) "
            f"{verdict}."
        )
        capped = {i for i in common if at_size_cap(runs[name][i])}
        if capped and len(capped) < n:
            part = {
                k: 100 * sum(runs[name][i]["post"][k] - runs[plain][i]["post"][k] for i in capped) / n
                for k in DEFAULT_RULE
            }
            out.append(
                f"  Of these changes, the {len(capped)} edits whose update ends at the size cap with "
                f"neighbours bring NS {part['NS']:+.1f}, ES {part['ES']:+.1f}, PS {part['PS']:+.1f} points; "
                f"the other {n - len(capped)}, the rest."
            )
            estimates = [
                f"{t:g}: {k} edits, NS {g['NS']:+.1f}, ES {g['ES']:+.1f}, PS {g['PS']:+.1f} ({'holds' if ok else 'fails'})"
                for t, k, g, ok in let_go_estimate(runs[name], runs[plain])
            ]
            out.append(
                "  Estimate of a higher `neighbour_min_p` t (every edit at the cap whose P(target) on its prompt "
                "after the edit is below t takes its plain edit instead): " + "; ".join(estimates) + "."
            )
    return ["", *out] if out else []


LET_GO_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


def let_go_estimate(
    run: dict[int, dict], plain: dict[int, dict], thresholds: tuple[float, ...] = LET_GO_THRESHOLDS
) -> list[tuple[float, int, dict[str, float], bool]]:
    """What a higher ``neighbour_min_p`` would give, estimated from the two runs without new edits:
    each edit of ``run`` at the size cap whose P(target) on its prompt after the edit is below t is
    replaced by its ``plain`` edit (the edit that lets go of all its names). Per t: t, how many edits
    are replaced, the changes against ``plain`` (``rule_check``) and whether the rule holds."""
    out = []
    for t in thresholds:
        swap = {i for i in run if i in plain and at_size_cap(run[i]) and run[i]["edit"]["p_new_after"] < t}
        mixed = {i: plain[i] if i in swap else c for i, c in run.items()}
        gain, _, holds = rule_check(mixed, plain)
        out.append((t, len(swap), gain, holds))
    return out


def compare_runs(model: str = "smollm2-135m", total: int | None = None) -> list[str]:
    """Markdown: every counterfact-*.jsonl of ``model`` in bench/results, scored over the records all of
    them hold; with ``total`` (the records in the data), the neighbours default rule per neighbours run."""
    runs = read_runs(model)
    if len(runs) < 2:
        return []
    common = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not common:
        return []

    def s(es, ps, ns):
        return 3 / (1 / es + 1 / ps + 1 / ns) if min(es, ps, ns) > 0 else 0.0

    out = [
        "",
        f"{model}: configurations compared on the {len(common)} records every run holds (post-edit; "
        "'L4' = layer 4, 'nocap-ablation' = before max_update_ratio existed, 'nb64' = "
        "neighbours 64, with neighbour_min_p 0.5; 'let go': edits that let go of some or all of their "
        "neighbours to reach their fact):",
        "",
        "| run | ES | PS | NS (pre) | S | updates at or above ‖W‖₂ | let go |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        cs = [r[i] for i in common]
        es, ps, ns = (100 * statistics.fmean(c["post"][k] for c in cs) for k in ("ES", "PS", "NS"))
        pre = 100 * statistics.fmean(c["pre"]["NS"] for c in cs)
        big = sum(map(at_size_cap, cs))
        let_go = sum(bool(c["edit"].get("neighbours_released")) for c in cs) if "nb" in name else "—"
        out.append(
            f"| {name} | {es:.1f} | {ps:.1f} | {ns:.1f} ({pre:.1f}) | {s(es, ps, ns):.1f} | {big} | {let_go} |"
        )
    return out + (default_rule(runs, total) if total else [])


def run(
    limit: int | None = None,
    layer: int | None = None,
    fast: bool = False,
    model_name: str | None = None,
    neighbours: int | None = None,
) -> dict:
    from rompatch.arch import default_layer
    from rompatch.distributed import joining, rank_device
    from rompatch.evaluation.evaluate import (
        evaluate_counterfact,
        load_counterfact,
        summarize,
        update_too_large,
    )
    from rompatch.models import load_model
    from rompatch.rome import ROMEHyperParams
    from rompatch.stats import DEFAULT_STATS_TOKENS, get_second_moment

    limit = limit or int(os.environ.get("ROMPATCH_BENCH_LIMIT", "0")) or None
    model_name = model_name or os.environ.get("ROMPATCH_BENCH_MODEL", "smollm2-135m")
    if neighbours is None:
        neighbours = int(os.environ.get("ROMPATCH_BENCH_NEIGHBOURS", "0"))
    records = load_counterfact(str(data_file("counterfact/counterfact_subset.json")), limit=limit)
    device = os.environ.get("ROMPATCH_BENCH_DEVICE", "cpu")
    with joining(device) as group:  # one process, or torchrun's
        model, tok = load_model(model_name, device=rank_device(device))
        layer = default_layer(model) if layer is None else layer
        hp = ROMEHyperParams(
            layer=layer, optim_autocast="bfloat16" if fast else "none", neighbours=neighbours
        )
        t_stats = time.perf_counter()
        stats = get_second_moment(model, tok, layer, n_tokens=DEFAULT_STATS_TOKENS, group=group)
        t_stats = time.perf_counter() - t_stats
        WORK.mkdir(exist_ok=True)
        prefix = "" if model_name == "smollm2-135m" else f"{model_name}-"
        nb = f"-nb{neighbours}" if neighbours else ""
        out = WORK / f"counterfact-{prefix}L{layer}{'-fast' if fast else ''}{nb}.jsonl"
        done = {c["case_id"]: c for c in _read(out)}
        todo = [r for r in records if r["case_id"] not in done][group.rank :: group.world]
        t0 = time.perf_counter()
        with open(out, "a") as f:
            for c in evaluate_counterfact(model, tok, todo, hparams=hp, stats=stats):
                f.write(json.dumps(c) + "\n")  # one write per line: safe with concurrent processes
                f.flush()
        group.barrier()
        if not group.is_main:
            return {}
    done = {c["case_id"]: c for c in _read(out)}
    cases = [done[r["case_id"]] for r in records if r["case_id"] in done]
    s = summarize(cases)
    big = [c for c in cases if update_too_large(c)]
    at_cap = [c for c in cases if at_size_cap(c)]
    ratios = sorted(c["edit"]["update_spectral_norm"] / c["edit"]["weight_spectral_norm"] for c in cases)
    secs = [c["edit"]["seconds"] for c in cases]
    pos0 = [c for c in cases if c["templates_dropped_position0"]]
    rows = []
    for k in ("ES", "PS", "NS", "S", "EM", "PM", "NM"):
        rows.append(
            {
                "metric": k,
                "value": f"{s['pre'][k]:.1f} → {s['post'][k]:.1f}",
                "unit": "%",
                "target": {"ES": "≥ 99", "PS": "≥ 95", "NS": "≥ pre − 3", "S": "≥ 85"}.get(k, ""),
                "note": "pre-edit → post-edit",
            }
        )
    rows += [
        {
            "metric": "cases",
            "value": len(cases),
            "unit": "",
            "note": f"layer {layer}, stats {stats.count:,} tokens",
        },
        {
            "metric": "median seconds per edit",
            "value": statistics.median(secs),
            "unit": "s",
            "note": "k*, v* and delta only; "
            + TIMING_NOTES.get(model_name, "")
            + "; bench_engine has the 2-thread timing",
        },
        {
            "metric": "updates with spectral norm > matrix's",
            "value": len(big),
            "unit": "cases",
            "note": ", ".join(str(c["case_id"]) for c in big) or "none",
        },
        {
            "metric": "updates held at the cap ‖ΔW‖₂ = ‖W‖₂ (max_update_ratio 1)",
            "value": len(at_cap),
            "unit": "cases",
            "note": f"their ES {_pct(at_cap, 'ES')}, PS {_pct(at_cap, 'PS')}, NS {_pct(at_cap, 'NS')} "
            f"(pre {_pct(at_cap, 'NS', 'pre')}); ‖ΔW‖₂/‖W‖₂ median {statistics.median(ratios):.2f}, "
            f"90th percentile {ratios[int(0.9 * (len(ratios) - 1))]:.2f}",
        },
        {
            "metric": "subject at position 0 (bare prompt left out)",
            "value": len(pos0),
            "unit": "cases",
            "note": ", ".join(f"{c['case_id']} {c['subject']}: ES {100 * c['post']['ES']:.0f}" for c in pos0)
            or "none",
        },
    ]
    failures = [c for c in cases if c["post"]["ES"] < 1]
    md = ["Cases whose rewrite prompt still prefers the true target after the edit:", ""]
    md += [
        f"- case {c['case_id']}: {c['prompt'].replace('{}', c['subject'])!r} → {c['target_new']} "
        f"(P(new) after {c['edit']['p_new_after']:.3f})"
        for c in failures
    ] or ["- none"]
    md += compare_runs(model_name, total=len(records))
    return {
        "setup": f"Each record's edit is created on the unedited model and measured before and after "
        f"(full-sequence probabilities). Statistics: {t_stats:.0f} s to load or compute. "
        f"{len(cases)} cases in {time.perf_counter() - t0:.0f} s this run.",
        "rows": rows,
        "markdown": "\n".join(md),
        "summary": s,
    }


if __name__ == "__main__":  # torchrun --nproc-per-node N -m bench.bench_counterfact
    run()
