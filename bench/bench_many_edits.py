"""Many edits (issue 14): `python -m bench.run --only many_edits` puts the table and plot of the
measurements in RESULTS.md. The measurements themselves take hours on a CPU, so they are made by the
script, which resumes where it stopped:

    ROMPATCH_DATA=... python -m bench.many_edits --n 1,10,100     # all six modes
    ROMPATCH_DATA=... python -m bench.key_conditioning            # cond(UᵀK) against N

and this module only reads bench/results/many_edits_entries.json and key_conditioning.json."""

from __future__ import annotations

import json
from pathlib import Path

from bench import many_edits
from bench.data import missing_data

TITLE = "Many edits (issue 14): SmolLM2-135M on CounterFact"
FULL_ONLY = True
HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "many_edits_entries.json"
FIGURE = HERE / "figures" / "many_edits.png"
KEYS = HERE / "results" / "key_conditioning.json"  # python -m bench.key_conditioning


def skip_reason() -> str | None:
    return missing_data(many_edits.DATA, many_edits.WIKITEXT)


def run() -> dict:
    entries = [e for e in json.loads(OUT.read_text())["entries"] if "error" not in e]
    many_edits.plot(entries, FIGURE)
    rows = []
    for e in sorted(entries, key=lambda e: (many_edits.MODES.index(e["mode"]), e["n"])):
        if e["n"] == max(x["n"] for x in entries if x["mode"] == e["mode"]):
            rows.append(
                {
                    "metric": f"{e['mode']}, N = {e['n']}: ES / PS / NS",
                    "value": f"{e['ES']:.1f} / {e['PS']:.1f} / {e['NS']:.1f}",
                    "unit": "%",
                    "target": "N = 1,000: ES ≥ 95, PS ≥ 80, NS ≥ unedited − 5",
                    "note": f"NS unedited {e['NS_unedited']:.1f}; ppl {e['ppl']:.2f} vs {e['ppl_unedited']:.2f}; "
                    f"{e['edits_per_second']:.3g} edits/s",
                }
            )
    return {
        "rows": rows,
        "markdown": many_edits.markdown(json.loads(OUT.read_text())["entries"])
        + f"\n\n![ES, PS, NS and perplexity against N](figures/{FIGURE.name})"
        + key_conditioning(),
        "setup": many_edits.__doc__.split("\n\n")[1].strip(),
    }


def key_conditioning() -> str:
    """The joint system's condition number against N (bench/key_conditioning.py), as a table."""
    if not KEYS.exists():
        return ""
    k = json.loads(KEYS.read_text())
    lines = [
        "",
        "",
        f"Condition number of the joint system UᵀK (unit diagonal) for the first N records, {k['model']} "
        f"layer {k['layer']} (d_in = {k['d_in']:,}), from `python -m bench.key_conditioning` (keys only, "
        f"{k['key_seconds']:.0f} s for {max(r['n'] for r in k['rows']):,} records):",
        "",
        "| N | " + " | ".join(f"{r['n']:,}" for r in k["rows"]) + " |",
        "| --- | " + " | ".join("---:" for _ in k["rows"]) + " |",
        "| cond(UᵀK) | " + " | ".join(f"{r['condition']:.3g}" for r in k["rows"]) + " |",
    ]
    return "\n".join(lines)
