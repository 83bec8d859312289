"""Issue 16, point 5 without a GPU: ``bench_gpu`` run on CPU with every shape shrunk 16× (the 30B
class offloaded to disk instead of CPU memory), so the GPU script is known to work. Its numbers say
nothing about a GPU; the GPU figures come from ``bench_gpu`` on a machine with CUDA
(``bench/gpu_check.sh`` runs it with the CUDA tests in one call).
"""

from __future__ import annotations

import os

TITLE = "The GPU benchmark's code, checked on CPU with shrunk shapes (issue 16; GPU figures owed)"
FULL_ONLY = True


def run() -> dict:
    from bench import bench_gpu

    os.environ["ROMPATCH_BENCH_GPU_SMOKE"] = "1"
    try:
        res = bench_gpu.run()
    finally:
        del os.environ["ROMPATCH_BENCH_GPU_SMOKE"]
    res["setup"] = (
        "NOT GPU FIGURES: a check that bench/bench_gpu.py runs end to end (per-shape edits, peak GPU memory "
        "where there is a GPU, the per-stage breakdown, the 30B-class shape dispatched with half its blocks "
        "off the main device). The issue-16 GPU numbers (GPT-2 XL ≤ 1 s, Llama-7B bf16 peak memory, 30B-class "
        "offloaded) are still owed: no GPU was lent to the session that wrote them. " + res["setup"]
    )
    return res
