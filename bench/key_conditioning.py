"""Can N edits at one matrix be solved jointly? The condition number of UᵀK for the first N records.

    ROMPATCH_DATA=... python -m bench.key_conditioning --n 10,100,300,1000 [--out bench/results/key_conditioning.json]

A merge (``stack --merge``) and a batch (``create --mode batch``) solve ΔW = R (UᵀK)⁻¹ Uᵀ at one
matrix. This needs only each edit's key k* and direction u = C⁻¹k*/‖C⁻¹k*‖, no optimisation, so it
is cheap to measure how far N can go: it reads the keys of the first N records of EasyEdit's
CounterFact ``counterfact-train.json`` on SmolLM2 (default layer, default statistics, ROME's
averaged k*) and reports cond(UᵀK) with unit diagonal, as ``rompatch.merge.joint_solve`` does.
Past N = d_in (1,536 for SmolLM2's down_proj) UᵀK has rank ≤ d_in < N and is singular.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.data import data_file
from bench.many_edits import DATA

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from rompatch.create import Editor
    from rompatch.evaluation.easyedit import load_easyedit_counterfact
    from rompatch.models import load_model
    from rompatch.request import EditRequest
    from rompatch.rome import averaged_key, solve_key, subject_keys, usable_templates

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", default="10,100,300,1000")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "key_conditioning.json")
    args = ap.parse_args(argv)
    ns = sorted(int(x) for x in args.n.split(","))
    model, tok = load_model(args.model)
    ed = Editor(model, tok)
    hp, target = ed.hparams, ed.target
    reqs = [EditRequest.from_dict(r) for r in load_easyedit_counterfact(data_file(DATA), limit=max(ns))]
    t0 = time.perf_counter()
    K, U = [], []
    for r in reqs:
        kept, _ = usable_templates(tok, r, ed.templates)
        keys = subject_keys(model, tok, r.subject, target.layer, [t.replace("{}", r.prompt) for t in kept])
        k = averaged_key(keys, kept, hp.key_prompt_weight)
        K.append(k.double().cpu())
        U.append(solve_key(k, ed.stats, hp).double())
    seconds = time.perf_counter() - t0
    K, U = torch.stack(K), torch.stack(U)
    rows = []
    for n in ns:
        G = U[:n] @ K[:n].T
        G = G / G.diagonal()[None, :]
        s = torch.linalg.svdvals(G)
        rows.append({"n": n, "condition": float(s[0] / s[-1]), "smallest_singular_value": float(s[-1])})
        print(f"N = {n}: cond(UᵀK) = {rows[-1]['condition']:.4g}")
    out = {
        "model": args.model,
        "layer": target.layer,
        "d_in": int(K.shape[1]),
        "key_seconds": round(seconds, 1),
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
