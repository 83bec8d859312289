"""Issue 15, point 4: causal tracing on Gemma-3-270m, as bench_trace does for SmolLM2-135M: is its
default edit layer (3, from the architecture's 0.2·(n−1) rule) where the MLP effect at the last
subject token peaks?"""

from __future__ import annotations

from bench import bench_trace

TITLE = "Causal tracing: Gemma-3-270m (CPU), Eiffel Tower heatmaps and the average over known facts"
FULL_ONLY = True
skip_reason = bench_trace.skip_reason


def run() -> dict:
    return bench_trace.run("gemma3-270m", "Gemma-3-270m", prefix="trace-gemma3-270m")
