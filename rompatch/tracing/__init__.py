"""Causal tracing (ROME §2): where in the network a fact is recalled.

- ``trace``: one fact, corrupted subject, restored states (``trace_fact``, ``CausalTracer``);
- ``known_facts``: the average over the known facts (``trace_known``);
- ``plotting``: the figures.
"""

from .known_facts import AverageTrace, trace_known
from .trace import CausalTracer, TraceResult, embedding_std, trace_fact

__all__ = ["AverageTrace", "CausalTracer", "TraceResult", "embedding_std", "trace_fact", "trace_known"]
