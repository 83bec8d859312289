"""Edits that stay on their subject (issue 15): `python -m bench.run --only local_edits` puts the
neighbour tables of bench/results/local_edits_entries.json in RESULTS.md. The measurements are made
by the script (minutes per model on a CPU; it resumes where it stopped):

    ROMPATCH_DATA=... python -m bench.local_edits --models smollm2-135m,gemma3-270m --neighbours 0,64
"""

from __future__ import annotations

import json

from bench import local_edits

TITLE = "Edits that stay on their subject (issue 15): neighbours that flip"
FULL_ONLY = True
OUT = local_edits.OUT


# What the run of 2026-12-01 shows (the tables are the data; this is their reading).
FINDINGS = """
What the numbers say (2 CPU cores shared with another benchmark: the seconds are upper bounds):

- **Gemma-3-270m's edits leak; `neighbours 64` stops most of it.** Plain ROME flips 7 of 10 other
  athletes to baseball (mean P(baseball) 0.45), 3 of 10 landmarks to Rome and 1 of 10 French-speaking
  actors to English. With the update kept orthogonal to the keys of 64 names the model itself writes
  next to the subject, 1, 1 and 0 flip (mean P(target) 0.10, 0.25, 0.05), and the edit's own prompts
  keep P(target) 0.97 to 0.99. The table's names are not given to the edit, but the model's own search
  finds some of them (listed above: for Michael Jordan it names Kobe Bryant, LeBron James and
  Shaquille O'Neal). On the names it did not find, the flips go from 4 to 1 (Serena Williams, Stephen
  Curry and Tom Brady stop; Larry Bird still flips) and from 2 to 1 landmarks (the Arc de Triomphe
  stops; the Statue of Liberty, which it found only as "Statue" and "Liberty", still flips).
- **SmolLM2-135M's edits do not leak on these tables**, with or without neighbours (0 of 10
  everywhere): its updates at layer 4 are smaller (‖ΔW‖₂/‖W‖₂ 0.28 to 0.85, against Gemma's 1.0 at
  the cap) and reach other subjects less.
- **Cost:** finding the names (sampling up to eight rounds of short texts) and their keys made an
  edit 2 to 3 times slower on this CPU in this run (Gemma 20-30 s → 70-100 s); the update's norm does
  not grow (Gemma stays at the cap, SmolLM2 +0 to +9%). The rounds are now sampled as one batch, with
  the same names and so the same tables: 2.5× faster on Gemma, 1.7× on SmolLM2 ("Finding an edit's
  neighbours", further down).
- These edits end with P(target) 0.70 to 0.99 on their own prompts, so none lets go of its neighbours
  (`neighbour_min_p`, added after this run, changes only edits that end at the size cap below
  P(target) 0.5).
- CounterFact's neighbourhood score over the 357 shared records (the issue's measure; CounterFact
  sections above, `ROMPATCH_BENCH_NEIGHBOURS=64`), plain → `--neighbours 64`:
  - Gemma-3-270m: NS 62.1 → 72.2 (unedited 76.3), ES 100 → 100, PS 98.0 → 97.6. The rule set
    before the runs (NS at least +1 point, ES and PS at most 0.5 down) holds: 64 by default.
  - SmolLM2-135M: NS 65.9 → 67.1 (unedited 67.9), ES 98.3 → 98.9, PS 97.6 → 95.9. NS comes within
    a point of the unedited model's, but PS falls 1.7 points, so the rule fails: off by default.
"""


def skip_reason() -> str | None:
    return (
        None if OUT.is_file() else f"no measurements yet: run python -m bench.local_edits (writes {OUT.name})"
    )


def _cell(e: dict, k: str) -> str:
    return f"{e[k]['n_flipped']}/{len(e['config']['names'])} ({e[k]['mean_p_target_after']:.2f})"


def _key(name: str) -> str:
    n = name.lower().replace("’", "'")
    return n[4:] if n.startswith("the ") else n


def also_named(e: dict) -> list[str]:
    """The table's names that the edit's own neighbour search found too: the same name, a longer one
    holding it, or a name of two or more words inside it ('Opera House' in 'The Sydney Opera House')."""
    used = [_key(u) for u in e.get("neighbours_used", [])]
    return [
        n
        for n in e["config"]["names"]
        if any(_key(n) in u or (len(u.split()) > 1 and u in _key(n)) for u in used)
    ]


def markdown(entries: list[dict]) -> str:
    lines = [
        "| model | edit | neighbours | flipped, bare prompt (mean P(target)) | flipped, in context | own P(target) "
        "bare / in context | ‖ΔW‖₂/‖W‖₂ | names used | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in sorted(
        entries, key=lambda e: (e["config"]["model"], e["config"]["table"], e["config"]["neighbours"])
    ):
        c = e["config"]
        own = " / ".join(f"{p:.2f}" for p in e["own"]["p_target_after"])
        lines.append(
            f"| {c['model']} | {c['table']} | {c['neighbours']} | {_cell(e, 'bare')} | {_cell(e, 'in context')} | "
            f"{own} | {e['update_ratio']:.3f} | {len(e['neighbours_used'])} | {e['edit_seconds']:.0f} |"
        )
    flipped = [
        f"- {e['config']['model']}, {e['config']['table']}, neighbours {e['config']['neighbours']}: "
        + ", ".join(e["bare"]["flipped"])
        for e in entries
        if e["bare"]["flipped"]
    ]
    overlap = [
        f"- {e['config']['model']}, {e['config']['table']}: {', '.join(also_named(e)) or 'none'}"
        for e in entries
        if e["config"]["neighbours"]
    ]
    return "\n".join(
        lines
        + (["", "Who flipped (bare prompt):", *flipped] if flipped else [])
        + ["", "Table names that the edit's neighbour search also found (so not held out):", *overlap]
    )


def run() -> dict:
    entries = json.loads(OUT.read_text())["entries"]
    rows = []
    for e in entries:
        c = e["config"]
        rows.append(
            {
                "metric": f"{c['model']}, {c['table']}, neighbours {c['neighbours']}: neighbours flipped",
                "value": e["bare"]["n_flipped"],
                "unit": f"of {len(c['names'])}",
                "target": "0",
                "note": f"in context {e['in context']['n_flipped']}; own P(target) {e['own']['p_target_after'][0]:.2f}",
            }
        )
    return {
        "rows": rows,
        "markdown": markdown(entries) + "\n" + FINDINGS,
        "setup": local_edits.__doc__.split("\n\n")[1].strip(),
    }
