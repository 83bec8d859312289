"""Issue 6 (parts 1-2): causal tracing on SmolLM2-135M: the Eiffel Tower heatmaps, and the average
MLP indirect effect over the known facts it gets right, as evidence for its default edit layer."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.data import data_file, missing_data

TITLE = "Causal tracing: SmolLM2-135M (CPU), Eiffel Tower heatmaps and the average over known facts"
FULL_ONLY = True


def skip_reason() -> str | None:
    return missing_data("known_1000.json")


HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
SOURCES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (de-quantised Q4_1 GGUF, float32)",
    "gemma3-270m": "Gemma-3-270m (de-quantised Q4_K_M GGUF, float32)",
}
TOTAL_BUDGET_S = float(os.environ.get("ROMPATCH_BENCH_TRACE_BUDGET", 15 * 60))  # the whole benchmark
KNOWN_BUDGET_S = 8 * 60  # at most, for the known facts (window 10)
SINGLE_RESERVE_S = 150  # kept for the single-layer pass over the same facts
KNOWN_KINDS = ("mlp",)  # the question here is the MLP layer; one kind triples the facts that fit


def _load() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"{a:.1f}/{b:.1f}/{c:.1f}"
    except OSError:
        return "n/a"


def run(model_id: str = "smollm2-135m", label: str = "SmolLM2-135M", prefix: str = "trace") -> dict:
    """Trace ``model_id`` (figures named ``prefix``-...); bench_trace_gemma runs it for Gemma-3-270m."""
    # On a shared, oversubscribed CPU two OpenMP threads stall on each other at every small operation
    # (measured here: a 30-row forward pass took 8.3 s with 2 threads, 0.7 s with 1), so one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(model_id, label, prefix)
    finally:
        torch.set_num_threads(threads)


def _run(model_id: str, label: str, prefix: str) -> dict:
    from rompatch.arch import default_layer
    from rompatch.models import load_model
    from rompatch.tracing.known_facts import trace_known
    from rompatch.tracing.plotting import plot_average, plot_layer_curves, plot_trace_all
    from rompatch.tracing.trace import CATEGORIES, CausalTracer, embedding_std, trace_fact

    t_start = time.perf_counter()
    load_before = _load()
    model, tok = load_model(model_id, device="cpu")
    t = time.perf_counter()
    es = embedding_std(model, tok)
    std_s = time.perf_counter() - t

    # 1. one prompt, all three kinds, the paper's settings
    r = trace_fact(model, tok, PROMPT, SUBJECT, embed_std=es)  # samples 10, noise 3σ, window 10
    plot_trace_all(r, FIGURES, prefix=f"{prefix}-eiffel", model_name=label)
    last = r.last_subject_token
    mlp_ie = r.indirect_effect("mlp")
    t_best, l_best, ie_best = r.strongest("mlp")
    h_t, h_l, h_ie = r.strongest("hidden")
    a_t, a_l, a_ie = r.strongest("attn")
    n_cells = len(r.tokens) * r.n_layers

    # 2. the average over known facts, as many as fit in the budget
    budget = max(
        60.0, min(KNOWN_BUDGET_S, TOTAL_BUDGET_S - (time.perf_counter() - t_start) - 60 - SINGLE_RESERVE_S)
    )
    avg = trace_known(
        model,
        tok,
        data_file("known_1000.json"),
        kinds=KNOWN_KINDS,
        embed_std=es,
        time_budget=budget,
        progress=True,
    )
    plot_average(avg, FIGURES, prefix=f"{prefix}-known", model_name=label)
    aie = avg.effect("mlp")
    ci = avg.ci95("mlp")
    c_last = CATEGORIES.index("last subject token")
    c_tok = CATEGORIES.index("last token")
    peak = avg.peak_layer("mlp")
    top = avg.top_layers("mlp", k=5)
    current = default_layer(model)
    rank = int((aie[c_last] > aie[c_last, current]).sum()) + 1
    per_fact = Counter(f["suggested_layer"] for f in avg.facts)

    # 3. the same facts, one MLP layer at a time (window 1), at the last subject token only:
    #    the window-10 curve cannot tell which single layer inside a window carries the effect.
    t = time.perf_counter()
    single = []
    for f in avg.facts:
        tr = CausalTracer(
            model, tok, f["prompt"], f["subject"], noise_std=avg.settings["noise"]["std"], kinds=("mlp",)
        )
        last_subj = tr.subject_range[1] - 1
        sets = [tr.cell_set("mlp", last_subj, layer, window=1) for layer in range(tr.n_layers)]
        single.append(tr.probabilities(sets) - tr.corrupted_prob)
    single_s = time.perf_counter() - t
    single = np.asarray(single)  # (n_facts, n_layers)
    s_mean = single.mean(0)
    s_ci = 1.96 * single.std(0) / np.sqrt(len(single))
    s_peak = int(np.argmax(s_mean))
    s_top = [int(i) for i in np.argsort(-s_mean)[:5]]
    plot_layer_curves(
        {
            "window of 10 MLP layers (centre)": (aie[c_last], ci[c_last]),
            "single MLP layer": (s_mean, s_ci),
        },
        FIGURES / f"{prefix}-known-last-subject.png",
        title=f"MLP indirect effect at the last subject token, {avg.n_facts} facts",
        xlabel=f"Layer in {label}",
    )
    known_s = sum(f["seconds"] for f in avg.facts)
    load_after = _load()

    # recommendation, from the data
    near = [i for i in range(len(aie[c_last])) if aie[c_last, i] >= 0.9 * aie[c_last, peak]]
    if current in near:
        rec = (
            f"keep layer {current}: its MLP AIE at the last subject token ({aie[c_last, current]:.4f}) is within "
            f"10% of the peak (layer {peak}, {aie[c_last, peak]:.4f})"
        )
    else:
        rec = (
            f"layer {peak}: the MLP AIE at the last subject token peaks there ({aie[c_last, peak]:.4f} ± "
            f"{ci[c_last, peak]:.4f}); the current default {current} has {aie[c_last, current]:.4f} "
            f"(rank {rank} of {avg.n_layers}); layers within 10% of the peak: {near}"
        )

    rows = [
        {
            "metric": "Eiffel Tower: clean p(' Paris') / corrupted",
            "value": round(r.clean_prob, 4),
            "unit": "p",
            "note": f"corrupted {r.corrupted_prob:.4f}; noise 3 × {es.value:.4f} (embedding std, {es.n_tokens} WikiText-2 tokens)",
        },
        {
            "metric": "Eiffel Tower: time for all three heatmaps",
            "value": round(r.seconds, 1),
            "unit": "s",
            "note": ", ".join(f"{k} {v:.1f} s" for k, v in r.timings.items())
            + f"; {n_cells} cells × {r.samples} samples per kind; embedding std {std_s:.1f} s",
        },
        {
            "metric": "Eiffel Tower: suggested layer (MLP peak at last subject token ' Tower')",
            "value": r.suggested_layer,
            "unit": "layer",
            "note": f"IE there {mlp_ie[last, r.suggested_layer]:.4f} of a total effect {r.total_effect:.4f}; "
            f"strongest MLP IE {ie_best:.4f} at token {r.tokens[t_best]!r} layer {l_best}",
        },
        {
            "metric": "Eiffel Tower: strongest hidden / attn restoration",
            "value": round(h_ie, 4),
            "unit": "IE",
            "note": f"hidden at {r.tokens[h_t]!r} layer {h_l}; attn {a_ie:.4f} at {r.tokens[a_t]!r} layer {a_l}",
        },
        {
            "metric": "known facts traced (MLP kind)",
            "value": avg.n_facts,
            "unit": "facts",
            "note": f"of {avg.considered} checked in file order ({', '.join(f'{v} {k}' for k, v in avg.skipped.items())}); "
            f"{avg.stopped or 'list exhausted'}",
        },
        {
            "metric": "known facts: time per traced fact",
            "value": round(known_s / max(avg.n_facts, 1), 1),
            "unit": "s",
            "note": f"whole --known phase {avg.seconds:.0f} s",
        },
        {
            "metric": "known facts: mean p clean / corrupted",
            "value": round(avg.mean_clean_prob, 4),
            "unit": "p",
            "note": f"corrupted {avg.mean_corrupted_prob:.4f}; total effect {avg.total_effect:.4f}",
        },
        {
            "metric": "MLP AIE peak layer at the last subject token",
            "value": peak,
            "unit": "layer",
            "note": "top 5: " + ", ".join(f"{i} ({v:.4f})" for i, v in top),
        },
        {
            "metric": "MLP AIE peak layer at the last token",
            "value": avg.peak_layer("mlp", "last token"),
            "unit": "layer",
            "note": f"AIE {aie[c_tok].max():.4f}",
        },
        {
            "metric": "single MLP layer (window 1) IE peak at the last subject token",
            "value": s_peak,
            "unit": "layer",
            "note": "top 5: "
            + ", ".join(f"{i} ({s_mean[i]:.4f} ± {s_ci[i]:.4f})" for i in s_top)
            + f"; layer {current}: {s_mean[current]:.4f}; {single_s:.0f} s for {avg.n_facts} facts",
        },
        {
            "metric": f"current default layer {current}: MLP AIE at the last subject token",
            "value": round(float(aie[c_last, current]), 4),
            "unit": "AIE",
            "note": f"rank {rank} of {avg.n_layers}; 95% CI ± {ci[c_last, current]:.4f}",
        },
    ]
    table = ["| layer | " + " | ".join(str(i) for i in range(avg.n_layers)) + " |"]
    table.append("| --- " * (avg.n_layers + 1) + "|")
    for c, name in enumerate(CATEGORIES):
        if avg.counts[c]:
            table.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in aie[c]) + " |")
    fig = "figures"
    markdown = "\n".join(
        [
            f"Machine load (1/5/15 min) before {load_before}, after {load_after}: the machine is shared, so the "
            "times are wall-clock under that load. Paper settings throughout: 10 noise samples, noise 3× the "
            "embedding std, windows of 10 layers, probability of the answer's first token.",
            "",
            f"**Eiffel Tower** (`{PROMPT}` → ' Paris'; subject tokens marked *):",
            "",
            f"![hidden]({fig}/{prefix}-eiffel-hidden.png) ![mlp]({fig}/{prefix}-eiffel-mlp.png) "
            f"![attn]({fig}/{prefix}-eiffel-attn.png)",
            "",
            f"**Known facts** ({avg.n_facts} facts {label} reproduces exactly, out of {avg.considered} checked "
            f"from known_1000.json in file order; {', '.join(KNOWN_KINDS)} only, to fit the time budget). "
            "Average indirect effect of restoring a window of 10 MLP layers, per token category "
            "(columns: centre layer):",
            "",
            *table,
            "",
            f"![known mlp]({fig}/{prefix}-known-mlp.png) ![known lines]({fig}/{prefix}-known-lines.png)",
            "",
            "One MLP layer at a time (window 1), same facts, last subject token (indirect effect, mean ± 95%):",
            "",
            "| layer | " + " | ".join(str(i) for i in range(avg.n_layers)) + " |",
            "| --- " * (avg.n_layers + 1) + "|",
            "| mean | " + " | ".join(f"{x:.3f}" for x in s_mean) + " |",
            "| ± | " + " | ".join(f"{x:.3f}" for x in s_ci) + " |",
            "",
            f"![last subject token]({fig}/{prefix}-known-last-subject.png)",
            "",
            "Per-fact suggested layers (MLP peak at each fact's last subject token): "
            + ", ".join(
                f"{k}: {v}" for k, v in sorted(per_fact.items(), key=lambda kv: (kv[0] is None, kv[0]))
            ),
            "",
            f"**Default edit layer for {label} (from the window-10 curve, the paper's criterion):** {rec}. "
            f"Single MLP layers: the effect peaks at layer {s_peak} (top: {', '.join(map(str, s_top))}).",
        ]
    )
    return {
        "setup": f"{SOURCES.get(model_id, model_id)} on CPU with 1 torch thread (the machine "
        "is shared; see the note below); rompatch.tracing.trace defaults (prefix reuse, up to 128 corrupted rows per "
        "forward pass).",
        "rows": rows,
        "markdown": markdown,
    }
