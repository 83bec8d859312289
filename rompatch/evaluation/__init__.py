"""The paper's evaluation: CounterFact and zsRE metrics, fluency, sequential edits, plots.

- ``evaluate``: records, per-case metrics and their summary (``run_evaluation``);
- ``zsre``: zsRE records and metrics;
- ``metrics``: the metric definitions shared by both;
- ``fluency``: generation entropy and consistency;
- ``sequential``: many edits one after another;
- ``plot``: the figures.
"""

from .evaluate import evaluate_counterfact, load_records, run_evaluation, summarize
from .fluency import GenerationSettings
from .sequential import run_sequential

__all__ = [
    "GenerationSettings",
    "evaluate_counterfact",
    "load_records",
    "run_evaluation",
    "run_sequential",
    "summarize",
]
