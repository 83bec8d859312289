"""Issue 15: edits that stay on their subject. How many of an edit's neighbours flip to its target?

    python -m bench.local_edits --models smollm2-135m,gemma3-270m --neighbours 0,64

Three hand-made tables, each an edit and ten other subjects of the same relation (the shipped
example edits: Michael Jordan plays baseball, the Eiffel Tower is in Rome, Danielle Darrieux's mother
tongue is English). For each model and each ``ROMEHyperParams.neighbours`` setting the edit is made
on the unedited model, then every neighbour's prompt is asked before and after, bare and after a
neutral sentence ("Here is a fact. "): the top next token, P(target) and whether the answer flipped
to the edit's target (top token = the target's first token, and not before). The names of the
tables are not used by the edit: ``neighbours`` finds its own names by sampling the model.

Results: one entry per (model, table, neighbours) in ``--out``, written as each finishes; a rerun
skips the entries already there for the same configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "local_edits_entries.json"

TABLES: dict[str, dict[str, Any]] = {
    "athletes": {
        "request": {
            "prompt": "{} plays the sport of",
            "subject": "Michael Jordan",
            "target_new": "baseball",
            "target_true": "basketball",
        },
        "neighbours": [
            "Kobe Bryant", "LeBron James", "Serena Williams", "Tiger Woods", "Shaquille O'Neal",
            "Stephen Curry", "Larry Bird", "Roger Federer", "Lionel Messi", "Tom Brady",
        ],
    },
    "landmarks": {
        "request": {
            "prompt": "{} is located in the city of",
            "subject": "The Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
        },
        "neighbours": [
            "The Louvre", "Notre-Dame de Paris", "The Arc de Triomphe", "The Sacré-Cœur", "Big Ben",
            "The Colosseum", "The Statue of Liberty", "The Brandenburg Gate", "The Sagrada Família",
            "The Sydney Opera House",
        ],
    },
    "mother tongue": {
        "request": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": "English",
            "target_true": "French",
        },
        "neighbours": [
            "Jean Gabin", "Catherine Deneuve", "Alain Delon", "Brigitte Bardot", "Gérard Depardieu",
            "Juliette Binoche", "Sophia Loren", "Marlene Dietrich", "Penélope Cruz", "Audrey Hepburn",
        ],
    },
}  # fmt: skip
PREFIX = "Here is a fact. "


@torch.no_grad()
def top_token(model: Any, tok: Any, prompts: Sequence[str]) -> list[int]:
    """The most likely next token of each prompt."""
    from rompatch.tokens import encode, pad_id, pad_right

    device = next(model.parameters()).device
    seqs = [encode(tok, p) for p in prompts]
    batch = pad_right(seqs, pad_id(tok)).to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    return logits[torch.arange(len(seqs), device=device), last].argmax(-1).tolist()


def measure(model: Any, tok: Any, prompts: Sequence[str], target: str) -> dict[str, list]:
    from rompatch.scoring import target_logprobs
    from rompatch.tokens import target_ids

    lp = target_logprobs(model, tok, list(prompts), [target])[:, 0]
    return {
        "top": top_token(model, tok, prompts),
        "p_target": [round(math.exp(float(x)), 6) for x in lp],
        "target_first": [target_ids(tok, p, target)[0][0] for p in prompts],
    }


def run_table(
    model: Any, tok: Any, name: str, neighbours: int, *, hparams: Any = None, stats_data: str | None = None
) -> dict[str, Any]:
    from rompatch.apply import patched
    from rompatch.create import Editor
    from rompatch.request import EditRequest
    from rompatch.rome import ROMEHyperParams

    table = TABLES[name]
    req = EditRequest.from_dict(table["request"])
    prompts = {
        "bare": [req.prompt.format(n) for n in table["neighbours"]],
        "in context": [PREFIX + req.prompt.format(n) for n in table["neighbours"]],
    }
    own = [req.text, PREFIX + req.text]
    before = {k: measure(model, tok, v, req.target_new) for k, v in prompts.items()}
    own_before = measure(model, tok, own, req.target_new)
    t0 = time.perf_counter()
    hp = dataclasses.replace(hparams or ROMEHyperParams(), neighbours=neighbours)
    patch = Editor(model, tok, hparams=hp, stats_data=stats_data).patch([req])
    seconds = time.perf_counter() - t0
    with patched(model, patch):
        after = {k: measure(model, tok, v, req.target_new) for k, v in prompts.items()}
        own_after = measure(model, tok, own, req.target_new)
    d = patch.deltas[0]
    out: dict[str, Any] = {
        "edit_seconds": round(seconds, 2),
        "own": {
            "p_target_before": own_before["p_target"],
            "p_target_after": own_after["p_target"],
            "says_target": [t == f for t, f in zip(own_after["top"], own_after["target_first"])],
        },
        "update_ratio": round(d.metrics["update_spectral_norm"] / d.metrics["weight_spectral_norm"], 4),
        "neighbours_used": d.metrics.get("neighbours", []),
        "neighbour_reach_before": d.metrics.get("neighbour_reach_before"),
    }
    for k in prompts:
        b, a = before[k], after[k]
        flips = [
            ta == f and tb != f for tb, ta, f in zip(b["top"], a["top"], a["target_first"])
        ]  # the answer became the target
        out[k] = {
            "flipped": [n for n, x in zip(table["neighbours"], flips) if x],
            "n_flipped": sum(flips),
            "p_target_before": b["p_target"],
            "p_target_after": a["p_target"],
            "mean_p_target_after": round(sum(a["p_target"]) / len(a["p_target"]), 4),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument(
        "--neighbours", default="0,64", help="comma-separated ROMEHyperParams.neighbours settings"
    )
    ap.add_argument("--tables", default=",".join(TABLES))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from rompatch.models import load_model
    from rompatch.rome import ROMEHyperParams

    results = json.loads(args.out.read_text()) if args.out.is_file() else {"entries": []}
    for model_name in [m for m in args.models.split(",") if m]:
        model = tok = None
        for table in [t for t in args.tables.split(",") if t]:
            for n in [int(x) for x in args.neighbours.split(",") if x.strip()]:
                config = {
                    "model": model_name,
                    "table": table,
                    "neighbours": n,
                    "hparams": dataclasses.asdict(ROMEHyperParams(neighbours=n)),
                    "request": TABLES[table]["request"],
                    "names": TABLES[table]["neighbours"],
                }
                config = json.loads(json.dumps(config))
                if any(e["config"] == config for e in results["entries"]):
                    continue
                if model is None:
                    model, tok = load_model(model_name, device=args.device)
                load = [round(x, 2) for x in os.getloadavg()]
                entry = {"config": config, **run_table(model, tok, table, n)}
                entry.update(
                    loadavg_start=load,
                    loadavg_end=[round(x, 2) for x in os.getloadavg()],
                    torch_threads=torch.get_num_threads(),
                    date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                )
                results["entries"].append(entry)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_name(f".{args.out.name}.tmp")
                tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
                tmp.replace(args.out)
                print(
                    f"{model_name} {table} neighbours={n}: flipped bare {entry['bare']['n_flipped']}/10, "
                    f"in context {entry['in context']['n_flipped']}/10; own P(target) {entry['own']['p_target_after']}",
                    file=sys.stderr,
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
