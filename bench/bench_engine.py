"""Issue 3: edit speed, statistics throughput, and how few statistics tokens give full quality."""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench.data import data_file, missing_data

TITLE = "Edit engine speed and statistics budget (SmolLM2-135M, CPU)"
FULL_ONLY = False


def skip_reason() -> str | None:
    return missing_data("counterfact/counterfact_subset.json", "wikitext-2/raw/wiki.test.raw")


# Layer 6, not the default 4: the reference ROME timings this is compared with (29.5 s per edit,
# 2,082 tok/s) were taken at layer 6. At layer 4 each optimisation step replays 26 blocks instead
# of 24, and statistics run 5 layers instead of 7.
LAYER = 6
BUDGETS = (10_000, 20_000, 50_000, 100_000, 200_000, 500_000)


def _load():
    from rompatch.evaluation.evaluate import load_counterfact
    from rompatch.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    records = load_counterfact(str(data_file("counterfact/counterfact_subset.json")))
    return model, tok, records


def _fwd_bwd_seconds(model, tok, req, templates) -> float:
    """One full forward + backward (w.r.t. an MLP-output offset) of the same batch an edit optimises."""
    from rompatch.hooks import Trace
    from rompatch.rome import ROMEHyperParams, _build_prompts, _frozen
    from rompatch.tokens import pad_id, pad_right

    pr = _build_prompts(tok, req, templates, ROMEHyperParams())
    batch = pad_right(pr.seqs, pad_id(tok))
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    times = []
    with (
        _frozen(model),
        Trace(
            model,
            f"model.layers.{LAYER}.mlp.down_proj",
            retain_output=False,
            edit_output=lambda o, n: o + delta,
        ),
    ):
        for _ in range(4):
            t = time.perf_counter()
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            out.logits.float().logsumexp(-1).mean().backward()
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def run() -> dict:
    from rompatch.apply import patched
    from rompatch.context import context_templates
    from rompatch.create import create_patch
    from rompatch.evaluation.evaluate import case_scores, measure_case
    from rompatch.request import EditRequest
    from rompatch.rome import ROMEHyperParams, compute_delta
    from rompatch.stats import DEFAULT_STATS_TOKENS, collect_second_moment, get_second_moment, text_source

    n_edits = int(os.environ.get("ROMPATCH_BENCH_EDITS", "12"))
    n_budget_cases = int(os.environ.get("ROMPATCH_BENCH_BUDGET_CASES", "16"))
    model, tok, records = _load()
    load = os.getloadavg()[0]

    # --- statistics throughput and budget snapshots (one pass) ---------------------------------
    snaps = {}
    source = text_source(None)
    t0 = time.perf_counter()
    full = collect_second_moment(
        model,
        tok,
        LAYER,
        source=source,
        n_tokens=max(BUDGETS),
        snapshots=BUDGETS[:-1],
        on_snapshot=lambda sm: snaps.__setitem__(sm.count, sm),
    )
    full_secs = time.perf_counter() - t0
    snaps[full.count] = full
    tok_s = full.count / full.identity["seconds"]

    # --- speed: median seconds per edit with cached statistics ---------------------------------
    stats = get_second_moment(model, tok, LAYER, n_tokens=DEFAULT_STATS_TOKENS)
    templates = context_templates(model, tok)
    reqs = [EditRequest.from_dict(r) for r in records[-n_edits:]]
    rows_speed = {}
    for label, hp in (
        ("float32", ROMEHyperParams(layer=LAYER)),
        ("bf16 autocast (--fast)", ROMEHyperParams(layer=LAYER, optim_autocast="bfloat16")),
    ):
        secs, steps = [], []
        for r in reqs:
            t = time.perf_counter()
            res = compute_delta(model, tok, r, stats=stats, hparams=hp, templates=templates)
            secs.append(time.perf_counter() - t)
            steps.append(res.metrics["v_steps_run"])
        rows_speed[label] = (statistics.median(secs), min(secs), max(secs), statistics.mean(steps))
    fb = _fwd_bwd_seconds(model, tok, reqs[0], templates)

    # --- quality against the statistics budget: the same cases edited with each snapshot's C ------
    hp = ROMEHyperParams(layer=LAYER)
    budget_scores = {b: [] for b in sorted(snaps)}
    cos = {b: [] for b in sorted(snaps)}
    for rec in records[:n_budget_cases]:
        req = EditRequest.from_dict(rec)
        u_full = None
        for b, sm in sorted(snaps.items(), reverse=True):
            p = create_patch(model, tok, req, hparams=hp, stats=sm)
            u = p.deltas[0].u
            u_full = u if u_full is None else u_full
            with patched(model, p):
                budget_scores[b].append(case_scores(measure_case(model, tok, rec)))
            cos[b].append(float(u @ u_full))

    def mean(b, key):
        return 100 * statistics.fmean(s[key] for s in budget_scores[b])

    md = [
        "Edit quality against the statistics budget (each case edited once per budget with that budget's C; "
        f"{n_budget_cases} CounterFact cases; stats from WikiText-2, one streaming pass):",
        "",
        "| tokens | stats time (s) | ES | PS | NS | mean cos(u, u_500k) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in sorted(snaps):
        md.append(
            f"| {b:,} | {snaps[b].identity['seconds']:.0f} | {mean(b, 'ES'):.1f} | {mean(b, 'PS'):.1f} | "
            f"{mean(b, 'NS'):.1f} | {statistics.fmean(cos[b]):.4f} |"
        )
    rows = [
        {
            "metric": f"median seconds per edit, {label}",
            "value": med,
            "unit": "s",
            "target": "≤ 10",
            "note": f"{len(reqs)} edits; min {lo:.1f}, max {hi:.1f}; mean {st:.1f} optimisation steps",
        }
        for label, (med, lo, hi, st) in rows_speed.items()
    ]
    rows += [
        {
            "metric": "passes per edit (float32 edit time / one fwd+bwd of the same batch)",
            "value": rows_speed["float32"][0] / fb,
            "unit": "×",
            "note": f"one full fwd+bwd = {fb:.2f} s",
        },
        {
            "metric": "statistics throughput (layers 0..6 only)",
            "value": tok_s,
            "unit": "tok/s",
            "note": f"{full.count:,} tokens in {full.identity['seconds']:.0f} s; reference ROME: 2,082 tok/s",
        },
        {
            "metric": f"statistics at the default budget ({DEFAULT_STATS_TOKENS:,} tokens)",
            "value": snaps[min(snaps, key=lambda b: abs(b - DEFAULT_STATS_TOKENS))].identity["seconds"],
            "unit": "s",
            "target": "≤ 30",
            "note": "same quality as 500k tokens: see the table below",
        },
    ]
    return {
        "setup": f"SmolLM2-135M float32 on CPU, layer {LAYER}, statistics cached. Load average at start "
        f"{load:.1f} on {os.cpu_count()} cores"
        + (" (other jobs were running: times are upper bounds). " if load > 1.5 else ". ")
        + f"One-pass statistics run: {full_secs:.0f} s.",
        "rows": rows,
        "markdown": "\n".join(md),
    }
