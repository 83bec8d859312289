"""Issue 12: statistics from text the model samples itself against WikiText-2, at the same budget.

On a fixed 100 shared CounterFact records (the first 100 of counterfact_subset.json), each record
is edited twice on the unedited SmolLM2-135M at its default layer: once with C from
``DEFAULT_SAMPLED_TOKENS`` tokens of sampled text (the always-available source) and once with C
from the same number of WikiText-2 tokens. Reported: ES/PS/NS/S for both, and the mean cosine
between the two edits' u. Per-case lines go to bench/results/stats-source.jsonl (resumable);
the sampling and statistics times are taken from their own cold runs.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from bench.data import data_file, missing_data

TITLE = "Statistics without a data folder: sampled text vs WikiText-2 (SmolLM2-135M, 100 CounterFact records)"
FULL_ONLY = True


def skip_reason() -> str | None:
    return missing_data("counterfact/counterfact_subset.json", "wikitext-2/raw/wiki.test.raw")


OUT = Path(__file__).resolve().parent / "results" / "stats-source.jsonl"
SOURCES = ("sampled", "wikitext")


def _s(es: float, ps: float, ns: float) -> float:
    return 3 / (1 / es + 1 / ps + 1 / ns) if min(es, ps, ns) > 0 else 0.0


def run(limit: int = 100) -> dict:
    import torch

    from rompatch.apply import patched
    from rompatch.arch import default_layer
    from rompatch.create import Editor
    from rompatch.evaluation.edits import edit_patch
    from rompatch.evaluation.evaluate import case_scores, load_counterfact, measure_case
    from rompatch.models import load_model
    from rompatch.request import EditRequest
    from rompatch.rome import ROMEHyperParams
    from rompatch.sampled import DEFAULT_SAMPLED_TOKENS
    from rompatch.stats import get_second_moment, local_wikitext

    limit = int(os.environ.get("ROMPATCH_BENCH_LIMIT", "0")) or limit
    records = load_counterfact(str(data_file("counterfact/counterfact_subset.json")), limit=limit)
    model, tok = load_model("smollm2-135m", device="cpu")
    layer = default_layer(model)
    hp = ROMEHyperParams(layer=layer)
    n = DEFAULT_SAMPLED_TOKENS
    wiki = ",".join(str(p) for p in local_wikitext() or [])
    assert wiki, "WikiText-2 missing"
    stats, secs = {}, {}
    for name, spec in (("sampled", "sampled"), ("wikitext", None)):
        t = time.perf_counter()
        stats[name] = get_second_moment(model, tok, layer, stats_data=spec, n_tokens=n)
        secs[name] = stats[name].identity.get("seconds", round(time.perf_counter() - t, 1))
    editors = {name: Editor(model, tok, hparams=hp, stats=stats[name]) for name in stats}
    done = {}
    if OUT.is_file():
        done = {c["case_id"]: c for c in map(json.loads, OUT.read_text().splitlines())}
    OUT.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    computed = 0
    with open(OUT, "a") as f:
        for rec in records:
            if rec["case_id"] in done:
                continue
            req = EditRequest.from_dict(rec)
            c = {
                "case_id": rec["case_id"],
                "subject": req.subject,
                "pre": case_scores(measure_case(model, tok, rec)),
            }
            us = {}
            for name in SOURCES:
                d, patch = edit_patch(editors[name], req)
                us[name] = d.u
                with patched(model, patch):
                    c[name] = case_scores(measure_case(model, tok, rec))
                c[f"{name}_update_ratio"] = (
                    d.metrics["update_spectral_norm"] / d.metrics["weight_spectral_norm"]
                )
            c["cos_u"] = float(torch.nn.functional.cosine_similarity(us["sampled"], us["wikitext"], dim=0))
            f.write(json.dumps(c) + "\n")
            f.flush()
            done[c["case_id"]] = c
            computed += 1
    cases = [done[r["case_id"]] for r in records if r["case_id"] in done]

    def mean(key: str, metric: str) -> float:
        return 100 * statistics.fmean(c[key][metric] for c in cases)

    rows = []
    scores = {}
    for key in ("pre", *SOURCES):
        es, ps, ns = (mean(key, m) for m in ("ES", "PS", "NS"))
        scores[key] = (es, ps, ns, _s(es, ps, ns))
    label = {
        "pre": "unedited",
        "sampled": f"sampled text, {n:,} tokens",
        "wikitext": f"WikiText-2, {n:,} tokens",
    }
    for key, (es, ps, ns, s) in scores.items():
        rows.append(
            {
                "metric": f"{label[key]}: ES / PS / NS / S",
                "value": f"{es:.1f} / {ps:.1f} / {ns:.1f} / {s:.1f}",
                "unit": "%",
            }
        )
    ref = OUT.parent / "counterfact-L4.jsonl"  # the same records edited with 100,000 WikiText tokens
    if ref.is_file():
        full = {c["case_id"]: c for c in map(json.loads, ref.read_text().splitlines())}
        same = [full[c["case_id"]] for c in cases if c["case_id"] in full]
        if len(same) == len(cases):
            es, ps, ns = (100 * statistics.fmean(c["post"][m] for c in same) for m in ("ES", "PS", "NS"))
            rows.append(
                {
                    "metric": "WikiText-2, 100,000 tokens (the corpus default): ES / PS / NS / S",
                    "value": f"{es:.1f} / {ps:.1f} / {ns:.1f} / {_s(es, ps, ns):.1f}",
                    "unit": "%",
                    "note": "same records, from bench/results/counterfact-L4.jsonl",
                }
            )
    gap = scores["wikitext"][3] - scores["sampled"][3]
    cos = [c["cos_u"] for c in cases]
    rows += [
        {
            "metric": "S gap (WikiText-2 − sampled)",
            "value": round(gap, 2),
            "unit": "points",
            "target": "≤ 1",
            "note": f"{len(cases)} records, layer {layer}",
        },
        {
            "metric": "mean cos(u_sampled, u_wikitext)",
            "value": round(statistics.fmean(cos), 4),
            "unit": "",
            "note": f"min {min(cos):.3f}, median {statistics.median(cos):.3f}",
        },
        {
            "metric": "statistics time, sampled text (cold: sampling + one pass)",
            "value": secs["sampled"],
            "unit": "s",
            "note": "as recorded when the statistics were computed (cached afterwards)",
        },
        {"metric": "statistics time, WikiText-2 (cold)", "value": secs["wikitext"], "unit": "s", "note": ""},
    ]
    return {
        "setup": f"SmolLM2-135M float32 on CPU, layer {layer}; each record edited on the unedited model "
        f"with each statistics source; {len(cases)} records, {computed} of them computed in this run "
        f"({time.perf_counter() - t0:.0f} s; the rest resumed from bench/results/stats-source.jsonl). "
        "The first full run took about 37 s per record on one torch thread while other jobs shared the 2 cores. "
        "Reproduce: `ROMPATCH_DATA=../shared/data .venv/bin/python -m bench.run --only stats_source`.",
        "rows": rows,
    }
