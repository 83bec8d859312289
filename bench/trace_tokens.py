"""Issue 13: tracing tokenizes targets and subjects with ``rompatch.tokens`` (editing's rules) instead
of its own copy. Does the known-facts average trace move?

Run once per code version, on the same facts, seed and settings:

    PYTHONPATH=<main's checkout> python bench/trace_tokens.py --label before
    PYTHONPATH=.                 python bench/trace_tokens.py --label after [--seed 1 --label after-seed1]

Each run adds its entry to ``bench/results/trace_tokens.json``; the comparison (facts whose target
ids or subject range changed, peak AIE per kind at the last subject token, largest difference of
the AIE arrays, and the noise scale: the 95% band over facts and, with a second seed, the
seed-to-seed difference) is written once ``before`` and ``after`` are both there.
Only public functions and the tokenization tracing uses under the code being run are called.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "trace_tokens.json"
KNOWN = Path(os.environ.get("ROMPATCH_DATA", "ROMPATCH_DATA-is-not-set")) / "known_1000.json"
LAST_SUBJECT = 2  # index of "last subject token" in CATEGORIES


def _tracing_tokenization():
    """(target ids, subject range [start, end)) as tracing computes them under the code being run."""
    from rompatch.tracing import trace

    if hasattr(trace, "_target_tokens"):  # before: tracing's own copy

        def target(tok, prompt, attr):
            return trace._target_tokens(tok, prompt, attr)[1]

        def subject(tok, prompt, subj):
            return trace._find_subject_span(tok, prompt, subj)

    else:  # after: editing's functions in rompatch.tokens
        from rompatch import tokens

        def target(tok, prompt, attr):
            return tokens.target_ids(tok, prompt, attr)[0]

        def subject(tok, prompt, subj):
            first, last = tokens.find_subject(tok, prompt, subj)
            return first, last + 1

    return target, subject


def _ids(target: list[int], subject: tuple[int, int]) -> str:
    """One fact's tokenization, compactly: ``"target 489 421 | subject 0 3"``."""
    return f"target {' '.join(map(str, target))} | subject {subject[0]} {subject[1]}"


def run(label: str, *, limit: int, samples: int, seed: int) -> dict:
    from rompatch.models import load_model
    from rompatch.tracing.known_facts import load_known, trace_known

    model, tok = load_model("smollm2-135m", device="cpu")
    target, subject = _tracing_tokenization()
    facts = load_known(KNOWN)
    tokenization = {
        f.key: _ids(target(tok, f.prompt, f.attribute), subject(tok, f.prompt, f.subject)) for f in facts
    }
    t0 = time.perf_counter()
    avg = trace_known(model, tok, KNOWN, limit=limit, samples=samples, seed=seed)
    seconds = time.perf_counter() - t0
    kinds = {}
    for k in avg.kinds:
        row = avg.effect(k)[LAST_SUBJECT]
        band = avg.ci95(k)[LAST_SUBJECT]
        peak = int(np.nanargmax(row))
        kinds[k] = {
            "peak_layer": peak,
            "peak_aie": float(row[peak]),
            "peak_ci95": float(band[peak]),
            "aie_last_subject": [float(x) for x in row],
            "ci95_last_subject": [float(x) for x in band],
            "aie": np.nan_to_num(avg.effect(k)).tolist(),
        }
    return {
        "label": label,
        "seed": seed,
        "samples": samples,
        "limit": limit,
        "n_facts": avg.n_facts,
        "considered": avg.considered,
        "skipped": avg.skipped,
        "traced_keys": [f["key"] for f in avg.facts],
        "mean_clean_prob": avg.mean_clean_prob,
        "mean_corrupted_prob": avg.mean_corrupted_prob,
        "noise": avg.settings["noise"],
        "seconds": round(seconds, 1),
        "kinds": kinds,
        "tokenization": tokenization,
    }


def compare(before: dict, after: dict, other_seed: dict | None) -> dict:
    tb, ta = before["tokenization"], after["tokenization"]
    changed_target = [k for k in tb if tb[k].split(" | ")[0] != ta[k].split(" | ")[0]]
    changed_subject = [k for k in tb if tb[k].split(" | ")[1] != ta[k].split(" | ")[1]]
    out = {
        "facts_tokenized": len(tb),
        "target_ids_changed": len(changed_target),
        "subject_range_changed": len(changed_subject),
        "changed_keys": sorted(set(changed_target) | set(changed_subject)),
        "same_traced_facts": before["traced_keys"] == after["traced_keys"],
        "n_facts": [before["n_facts"], after["n_facts"]],
        "embedding_std": [before["noise"]["embedding_std"], after["noise"]["embedding_std"]],
        "kinds": {},
    }
    for k, b in before["kinds"].items():
        a = after["kinds"][k]
        row = {
            "peak_layer": [b["peak_layer"], a["peak_layer"]],
            "peak_aie": [b["peak_aie"], a["peak_aie"]],
            "peak_ci95_over_facts": b["peak_ci95"],
            "max_abs_aie_difference": float(np.max(np.abs(np.array(b["aie"]) - np.array(a["aie"])))),
        }
        if other_seed is not None:
            s = other_seed["kinds"][k]
            row["seed_difference"] = {
                "seed": other_seed["seed"],
                "peak_layer": s["peak_layer"],
                "peak_aie": s["peak_aie"],
                "max_abs_aie_difference": float(np.max(np.abs(np.array(a["aie"]) - np.array(s["aie"])))),
            }
        out["kinds"][k] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    runs.pop("comparison", None)
    runs[args.label] = run(args.label, limit=args.limit, samples=args.samples, seed=args.seed)
    if "before" in runs and "after" in runs:
        seeds = [r for r in runs.values() if r["seed"] != runs["after"]["seed"]]
        runs["comparison"] = compare(runs["before"], runs["after"], seeds[0] if seeds else None)
        print(json.dumps(runs["comparison"], indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(runs, indent=1) + "\n")
    r = runs[args.label]
    print(
        args.label,
        r["n_facts"],
        "facts",
        r["seconds"],
        "s",
        {k: (v["peak_layer"], round(v["peak_aie"], 4)) for k, v in r["kinds"].items()},
    )


if __name__ == "__main__":
    main()
