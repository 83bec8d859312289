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


# What the measurements of 2026-12-01 show (the table above is the data; this is its reading).
FINDINGS = """
What the numbers say (runs of 2026-12-01 on 2 CPU cores, often shared with another job: the seconds
are upper bounds, the load average is in each entry):

- **Merging removes the cross-talk.** At N = 100 the plain stack of independent edits loses 3 NS
  points (71 against 74 unedited) and its ‖ΣΔ‖₂/‖W‖₂ is 1.72; merged, NS is back to 74, the norm
  is 1.35, ES and PS are unchanged (99 / 92). The merge of 100 edits takes 0.06 s and needs no
  statistics.
- **Batch equals merged**, score for score, as the algebra says (the same targets and the same
  joint solve); its value is one command instead of N plus a merge. On this CPU, shared δ passes
  were not faster than one edit at a time (padding prompts of different lengths costs more than
  the larger matrix products save), so rompatch shares passes only on CUDA.
- **Sequential editing does not collapse by N = 100 here**: ES 99, PS 93, NS 74 (= unedited).
  **Protection** (each edit orthogonal to the earlier edits' keys and C's 32 top directions) keeps
  NS at or above the unedited value at every N (76 against 74 at N = 100) with ES 99 and PS 94.
- **Perplexity is where ROME modes fall short.** +7.3 to +7.8% at N = 100 for every ROME mode
  (merged, batch, sequential, protected), over the +5% goal for N = 1,000 already at N = 100: every
  ROME update may reach ‖W‖₂ (max_update_ratio 1), and a hundred of them add up to ‖ΣΔ‖₂/‖W‖₂
  1.35 to 1.75 at one matrix. MEMIT spreads each edit over five layers; its updates are a third of
  that (‖ΣΔ‖₂/‖W‖₂ 0.41 at N = 30) and its perplexity moves by 1.1% at N = 30.
- **MEMIT holds every goal at N = 100**: ES 100, PS 91, NS 74 (= unedited), perplexity 36.90 (+2.3%), GE unchanged, ‖ΣΔ‖₂/‖W‖₂ 0.50 at the largest of its five matrices. It is the mode to take
  towards 1,000 edits.
- **N = 1,000 is not measured: it does not fit on this machine.** One ROME edit took 11.8 s here
  alone (100 independent edits in 1,180 s) and 25 to 30 s beside another job, so 1,000 edits are
  3.3 hours for one mode and about 16 hours for the six (independent and merged share their edits;
  sequential, protected, batch and MEMIT each need their own), against a 3-hour session; N = 10,000
  for batch and MEMIT is another 65 hours. No GPU was lent to these sessions. What can be measured
  cheaply is whether the joint solve of merge and batch holds at N = 1,000, and it does: cond(UᵀK)
  is 1,167 (below the 10⁴ limit). From N = 1,536 (= d_in) UᵀK is singular (rank bound), so merge
  and batch stop there at one matrix and only MEMIT (least squares over layers) can take 10,000
  edits.
"""


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
        + key_conditioning()
        + "\n"
        + FINDINGS,
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
