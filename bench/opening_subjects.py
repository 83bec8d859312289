"""Issue 15, point 3: can a rank-one edit reach a prompt that opens with its subject (no BOS)?

For each CounterFact record whose rewrite prompt opens with the subject, on a model without a BOS
token (SmolLM2-135M), this script measures:

- the default edit: its reach (u·k_bare)/(u·k*) at the bare prompt's subject key, ES/PS/NS, and
  whether its update sits at the size cap;
- a **second delta keyed at the opening position** (``rompatch.rome.opening_delta``, what ``create``
  adds when such a prompt misses; made here for every record): u₂ is the C-weighted minimum-norm
  direction with u₂·k_bare = 1 and u₂·k = 0 at the keys of the edit's context templates (so it adds
  nothing where the first delta already works; u₂·k* = 0 would not do: k* mixes k_bare with those
  keys, so u₂ would take the edit back from them), and v₂ is optimised on the bare prompt with the
  first delta applied. With both: ES/PS/NS;
- for a multi-token subject, three rank-one alternatives (``VARIANTS``): more weight on the bare
  prompt's own key in k* (0.8, 1.0), or twice the size cap;
- where u₂ fires: its reach over the keys of sentence openings from WikiText-2 (positions 0 to 3 of
  each sentence, as a text without BOS sees them) and over running text (positions 8 and later of
  the statistics chunks): the share of keys with |reach| ≥ 0.3 and ≥ 0.5, and the largest. For a
  one-token subject the share among openings that begin with the subject's own token is kept apart
  (those *should* change).

    ROMPATCH_DATA=... python -m bench.opening_subjects [--cases 12622,15574,...] [--model smollm2-135m]
    ROMPATCH_DATA=... python -m bench.opening_subjects --counterfact

The second re-runs, with today's engine (opening deltas on), the records of SmolLM2's CounterFact
run (bench/results/counterfact-L4.jsonl) whose prompt opens with a multi-token subject and whose
edit's P(new) was below ``RERUN_BELOW``: the only records the opening delta can change. With the
other records' results as they are, that is the whole run with today's engine.

Writes bench/results/opening_subjects_entries.json and opening_counterfact.jsonl (rendered by
bench_opening_subjects).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from bench.data import data_file
from rompatch.opening import added

OUT = Path(__file__).resolve().parent / "results" / "opening_subjects_entries.json"
# The shared records whose rewrite prompt opens with the subject and whose edit missed at layer 4
# (bench/results/counterfact-L4.jsonl), then three that open with the subject and worked, as controls.
DEFAULT_CASES = (3561, 10214, 10756, 17674, 12622, 15574)
N_OPENINGS = 2000
OPENING_TOKENS = 6


def sentence_openings(tok, n: int = N_OPENINGS) -> list[list[int]]:
    from rompatch.stats import local_wikitext, text_lines
    from rompatch.tokens import encode

    seen, out = set(), []
    for path in local_wikitext() or []:
        for line in text_lines(path, detok=True):
            for s in re.split(r"(?<=[.!?])\s+", line.strip()):
                if len(s) < 20 or not s[:1].isupper():
                    continue
                ids = encode(tok, s)[:OPENING_TOKENS]
                if len(ids) == OPENING_TOKENS and tuple(ids) not in seen:
                    seen.add(tuple(ids))
                    out.append(ids)
                if len(out) >= n:
                    return out
    return out


@torch.no_grad()
def keys_of(model, spec, layer: int, seqs: list[list[int]], batch: int = 64) -> torch.Tensor:
    """(n, T, in) float64 keys at the edited matrix's input for equal-length ``seqs``."""
    from rompatch.hooks import Trace

    out = []
    for i in range(0, len(seqs), batch):
        ids = torch.tensor(seqs[i : i + batch])
        with Trace(
            model, spec.mlp_out_module(layer), retain_input=True, retain_output=False, stop=True
        ) as tr:
            model(input_ids=ids, use_cache=False)
        out.append(tr.input.double())
    return torch.cat(out)


@torch.no_grad()
def running_keys(model, tok, spec, layer: int, n_tokens: int = 20_000) -> torch.Tensor:
    """Keys at positions 8 and later of the statistics text's chunks (running text), float64."""
    from rompatch.stats import text_source, token_chunks

    src = text_source(None, model=model, tok=tok)
    keys = [
        keys_of(model, spec, layer, [c])[0, 8:] for c in token_chunks(tok, src, 256, n_tokens) if len(c) > 8
    ]
    return torch.cat(keys)


def reach_stats(r: torch.Tensor) -> dict:
    a = r.abs()
    return {
        "n": len(a),
        "ge_0.3": round(float((a >= 0.3).double().mean()) * 100, 3),
        "ge_0.5": round(float((a >= 0.5).double().mean()) * 100, 3),
        "max": round(float(a.max()), 3) if len(a) else 0.0,
    }


def case(model, tok, rec, *, stats, hp, spec, layer, openings, okeys, rkeys) -> dict:
    """One record: the edit without and with its opening delta (``rome.opening_delta``, made here for
    every record, also where ``create`` would not make it), and where that delta fires."""
    import dataclasses

    from rompatch.arch import EditTarget
    from rompatch.evaluation.evaluate import score_case
    from rompatch.request import EditRequest
    from rompatch.rome import compute_deltas, opening_delta, spectral_norm
    from rompatch.tokens import subject_span

    req = EditRequest.from_dict(rec)
    P = spec.mlp_out_param(layer)
    w_spec = spectral_norm(model.get_parameter(P))
    pre = score_case(model, tok, rec)
    t0 = time.perf_counter()
    hp1 = dataclasses.replace(hp, opening_delta=False)  # the first delta alone: the edit before issue 15
    d1 = compute_deltas(model, tok, [req], stats=stats, hparams=hp1, spec=spec)[0]
    d2 = opening_delta(model, tok, req, d1, stats=stats, hp=hp, target=EditTarget(spec, layer), w_spec=w_spec)
    k_star, k_bare, u1, u2 = d1.key.double(), d2.key.double(), d1.u.double(), d2.u.double()
    _, _, last = subject_span(tok, req.prompt, req.subject)
    reach1_bare = float(u1 @ k_bare / (u1 @ k_star))
    den2 = float(u2 @ k_bare)
    with added(model, P, d1.v, d1.u, spec.layout):
        one = score_case(model, tok, rec)
        with added(model, P, d2.v, d2.u, spec.layout):
            two = score_case(model, tok, rec)
    seconds = time.perf_counter() - t0
    # Where u₂ fires, per opening position, and in running text.
    r_open = (okeys @ u2) / den2  # (n, T)
    subj_ids = tok(req.prompt.replace("{}", req.subject), add_special_tokens=False)["input_ids"][: last + 1]
    same = torch.tensor([o[: last + 1] == subj_ids for o in openings])
    by_pos = {str(p): reach_stats(r_open[~same, p]) for p in range(min(4, r_open.shape[1]))}
    running = reach_stats((rkeys @ u2) / den2)
    running1 = reach_stats((rkeys @ u1) / float(u1 @ k_star))
    variants = rank_one_variants(model, tok, rec, stats=stats, hp=hp, spec=spec) if last > 0 else []
    return {
        "case_id": rec["case_id"],
        "subject": req.subject,
        "prompt": req.prompt,
        "target_new": req.target_new,
        "subject_last_position": last,
        "reach1_at_bare": round(reach1_bare, 4),
        "cos_bare_kstar": round(float(k_bare @ k_star / (k_bare.norm() * k_star.norm())), 4),
        "pre": pre,
        "one_delta": one,
        "two_deltas": two,
        "p_prompt_after_opt_one": d1.metrics.get("p_prompt_after_opt"),
        "p_prompt_after_opt_two": d2.metrics["p_target_mean_after_opt"],
        "update1_ratio": round(float(d1.v.norm() * d1.u.norm()) / w_spec, 3),
        "u2_reach_at_context_keys": d2.metrics["reach_contexts_max"],
        "update2_ratio": round(float(d2.v.norm() * d2.u.norm()) / w_spec, 3),
        "delta2_capped": d2.metrics["delta_capped"],
        "u2_reach_openings_by_position": by_pos,
        "u2_openings_same_start": int(same.sum()),
        "u2_reach_same_start": reach_stats(r_open[same, last]) if bool(same.any()) else None,
        "u2_reach_running_text": running,
        "u1_reach_running_text": running1,
        "rank_one_variants": variants,
        "seconds": round(seconds, 1),
    }


# One rank-one delta, made to reach the bare prompt more: its own key weighs more in k*, or the size
# cap is doubled (does the cap hold the edit back?).
VARIANTS = ({"key_prompt_weight": 0.8}, {"key_prompt_weight": 1.0}, {"max_update_ratio": 2.0})


def rank_one_variants(model, tok, rec, *, stats, hp, spec) -> list[dict]:
    import dataclasses

    from rompatch.evaluation.evaluate import score_case
    from rompatch.request import EditRequest
    from rompatch.rome import compute_deltas

    hp = dataclasses.replace(hp, opening_delta=False)
    P = spec.mlp_out_param(hp.layer)
    out = []
    for change in VARIANTS:
        d = compute_deltas(model, tok, [EditRequest.from_dict(rec)], stats=stats,
                           hparams=dataclasses.replace(hp, **change), spec=spec)[0]  # fmt: skip
        with added(model, P, d.v, d.u, spec.layout):
            scores = score_case(model, tok, rec)
        out.append({"change": change, "scores": scores, "delta_capped": d.metrics["delta_capped"],
                    "v_steps_run": d.metrics["v_steps_run"], "p_target_mean_after_opt":
                    d.metrics["p_target_mean_after_opt"]})  # fmt: skip
    return out


# The records of the default engine's CounterFact run (bench_counterfact) that the opening delta can
# change: their prompt opens with a multi-token subject and the edit's P(new) at that prompt was
# below this (the delta is added below 0.5 of the optimisation's per-token P(target); the margin
# catches the difference between the two measures, and the re-run reports how many of those got one).
RERUN_BELOW = 0.7
BASELINE = OUT.parent / "counterfact-L4.jsonl"
RERUN = OUT.parent / "opening_counterfact.jsonl"


def rerun_ids(tok, baseline: list[dict]) -> list[int]:
    from rompatch.opening import opens_with_subject
    from rompatch.request import EditRequest

    return [
        c["case_id"]
        for c in baseline
        if c["edit"]["p_new_after"] < RERUN_BELOW
        and opens_with_subject(tok, EditRequest(c["prompt"], c["subject"], c["target_new"]))
    ]


def counterfact_rerun(model, tok, recs: dict, *, stats, hp) -> None:
    """Today's engine (opening deltas on) on the baseline records it can change; resumable."""
    from rompatch.evaluation.evaluate import evaluate_counterfact

    baseline = [json.loads(x) for x in BASELINE.read_text().splitlines()]
    done = {json.loads(x)["case_id"] for x in RERUN.read_text().splitlines()} if RERUN.is_file() else set()
    todo = [recs[i] for i in rerun_ids(tok, baseline) if i not in done]
    with open(RERUN, "a") as f:
        for c in evaluate_counterfact(model, tok, todo, hparams=hp, stats=stats):
            f.write(json.dumps(c) + "\n")
            f.flush()
            print(c["case_id"], c["subject"], c["edit"].get("opening_delta"), c["post"], flush=True)


def main(argv=None) -> None:
    from rompatch.arch import default_layer, get_spec
    from rompatch.evaluation.evaluate import load_counterfact
    from rompatch.models import load_model
    from rompatch.rome import ROMEHyperParams
    from rompatch.stats import DEFAULT_STATS_TOKENS, get_second_moment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(map(str, DEFAULT_CASES)))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--counterfact", action="store_true", help="the CounterFact re-run (counterfact_rerun)")
    a = ap.parse_args(argv)
    ids = [int(x) for x in a.cases.split(",")]
    recs = {r["case_id"]: r for r in load_counterfact(str(data_file("counterfact/counterfact_subset.json")))}
    model, tok = load_model(a.model, device="cpu")
    spec = get_spec(model)
    layer = default_layer(model)
    hp = ROMEHyperParams(layer=layer)
    stats = get_second_moment(model, tok, layer, n_tokens=DEFAULT_STATS_TOKENS)
    if a.counterfact:
        counterfact_rerun(model, tok, recs, stats=stats, hp=hp)
        return
    openings = sentence_openings(tok)
    okeys = keys_of(model, spec, layer, openings)
    rkeys = running_keys(model, tok, spec, layer)
    done = json.loads(OUT.read_text()) if OUT.is_file() else {"cases": []}
    have = {c["case_id"] for c in done["cases"]}
    done.update(model=a.model, layer=layer, openings=len(openings), running_tokens=len(rkeys))
    for i in ids:
        if i in have:
            continue
        c = case(model, tok, recs[i], stats=stats, hp=hp, spec=spec, layer=layer, openings=openings,
                 okeys=okeys, rkeys=rkeys)  # fmt: skip
        done["cases"].append(c)
        OUT.write_text(json.dumps(done, indent=1, ensure_ascii=False) + "\n")
        print(json.dumps({k: c[k] for k in ("case_id", "subject", "reach1_at_bare", "one_delta", "two_deltas",
                                            "update2_ratio", "u2_reach_openings_by_position")}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
