"""Issue 15: the time `create --neighbours 64` spends finding the names near the subject.

``near_names`` samples up to 8 rounds of 8 short texts after the subject. Round after round, each
a batch of 8 rows, that was most of an edit's time (Gemma-3-270m: 34 of 52 s a CounterFact record).
``sample_topk_rounds`` samples the rounds as one batch, each round's rows with their own seeded
generator, so the names are the same; this measures both ways on the same subjects and checks that.
The subjects are hand-picked, not from the shared data.
"""

from __future__ import annotations

import statistics
import time

TITLE = "Finding an edit's neighbours: rounds one by one vs one batch (issue 15)"
FULL_ONLY = True

MODELS = ("smollm2-135m", "gemma3-270m")
SUBJECTS = ("Michael Jordan", "The Eiffel Tower", "Toko Yasuda")
LIMIT = 64


def _round_by_round(model, tok, subject: str, limit: int) -> tuple[list[str], int]:
    """The names as ``near_names`` defines them, one round per batch (the code before the change)."""
    from rompatch.neighbours import names_in, near_subject_texts

    names: list[str] = []
    for r in range(8):
        for seq in near_subject_texts(model, tok, subject, samples=2, new_tokens=32, seed=r):
            text = tok.decode(seq, skip_special_tokens=True)
            names += [n for n in names_in(text, subject) if n not in names]
        if len(names) >= limit:
            return names[:limit], r + 1
    return names[:limit], 8


def run() -> dict:
    import torch

    from rompatch.models import load_model
    from rompatch.neighbours import ROUNDS_PER_BATCH, near_names

    rows = []
    for name in MODELS:
        model, tok = load_model(name)
        old, new, used, same = [], [], [], 0
        for subject in SUBJECTS:
            t = time.perf_counter()
            a, rounds = _round_by_round(model, tok, subject, LIMIT)
            old.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = near_names(model, tok, subject, limit=LIMIT)
            new.append(time.perf_counter() - t)
            used.append(rounds)
            same += a == b
        rows.append(
            {
                "metric": f"{name}: seconds per subject, rounds one by one → one batch",
                "value": f"{statistics.fmean(old):.1f} → {statistics.fmean(new):.1f}",
                "unit": "s",
                "target": "",
                "note": f"{statistics.fmean(old) / statistics.fmean(new):.2f}× faster; rounds needed "
                f"{used}; the same names for {same} of {len(SUBJECTS)} subjects",
            }
        )
        del model
    return {
        "rows": rows,
        "setup": f"near_names(limit={LIMIT}) on {', '.join(SUBJECTS)}; {ROUNDS_PER_BATCH} rounds of 8 "
        f"prompts per batch; float32 on CPU, {torch.get_num_threads()} torch threads. Reproduce: "
        "`python -m bench.run --only neighbours`",
    }
