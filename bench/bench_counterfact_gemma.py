"""Issue 15, point 4: Gemma-3-270m over all CounterFact records in $ROMPATCH_DATA, at its default
layer (long; resumable like bench_counterfact, into bench/results/counterfact-gemma3-270m-L<layer>.jsonl).
``ROMPATCH_BENCH_NEIGHBOURS=N`` runs it with ``ROMEHyperParams.neighbours`` (file suffix ``-nbN``)."""

from __future__ import annotations

from bench import bench_counterfact

TITLE = "Edit quality: Gemma-3-270m on CounterFact (all records in shared data)"
FULL_ONLY = True
skip_reason = bench_counterfact.skip_reason


def run() -> dict:
    return bench_counterfact.run(model_name="gemma3-270m")
