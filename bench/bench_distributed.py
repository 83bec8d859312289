"""Issue 16, point 2: statistics throughput with 1 and 2 processes (torchrun, gloo, CPU).

``rompatch stats smollm2-135m`` at the default layer over 40,000 tokens of WikiText-2 (from
$ROMPATCH_DATA), each run in a fresh statistics cache (the converted model is shared): one process
with one and with two threads, and ``torchrun --nproc-per-node 2`` with one thread per process.
Tokens per second are the command's own (the pass alone, from the cache entry's ``seconds``); wall
seconds include starting the processes and loading the model. The 2-process entry is compared with
the 1-process one (same file name = same identity; max relative difference of C).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import data_file, missing_data

TITLE = "Statistics with torch.distributed: 1 and 2 processes on CPU (issue 16)"
FULL_ONLY = False
TOKENS = 40_000
RUNS = {
    "1 process, 1 thread": (1, 1),
    "1 process, 2 threads": (1, 2),
    "torchrun, 2 processes × 1 thread": (2, 1),
}


def skip_reason() -> str | None:
    return missing_data("wikitext-2/raw/wiki.test.raw")


def _stats(procs: int, threads: int, cache: Path, corpus: Path) -> tuple[dict, float]:
    from rompatch.constants import cache_dir

    cache.mkdir(parents=True)
    (cache / "models").symlink_to(cache_dir() / "models")  # the converted model, not its statistics
    env = {**os.environ, "ROMPATCH_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "rompatch"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "rompatch"]  # fmt: skip
    cmd += ["stats", "smollm2-135m", "--stats-data", str(corpus), "--stats-tokens", str(TOKENS), "--device",
            "cpu", "--json"]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)[0], wall


def run() -> dict:
    import torch
    from safetensors.torch import load_file

    from rompatch.models import ensure_embedded

    ensure_embedded("smollm2-135m")
    corpus = data_file("wikitext-2/raw/wiki.test.raw")
    work = Path(tempfile.mkdtemp(prefix="rompatch-bench-distributed-"))
    rows, entries = [], {}
    for name, (procs, threads) in RUNS.items():
        cache = work / name.replace(" ", "_").replace(",", "").replace("×", "x")
        rec, wall = _stats(procs, threads, cache, corpus)
        ident = next((cache / "stats").glob("*.safetensors"))
        entries[name] = ident
        full = json.loads(load_file_meta(ident)["full_identity"])
        secs = full["seconds"]
        rows.append(
            {
                "metric": f"statistics tokens/s, {name}",
                "value": round(rec["tokens"] / secs),
                "unit": "tok/s",
                "target": "",
                "note": f"{rec['tokens']:,} tokens at layer {rec['layer']}: pass {secs:.1f} s, wall {wall:.1f} s "
                "with start-up and model loading",
            }
        )
    one, two = entries["1 process, 1 thread"], entries["torchrun, 2 processes × 1 thread"]
    a, b = load_file(one)["mom2"], load_file(two)["mom2"]
    rel = float(((a - b).abs() / a.abs().clamp_min(1e-30)).max())
    same = one.name == two.name
    return {
        "rows": rows,
        "setup": f"SmolLM2-135M, default layer, {TOKENS:,} tokens of WikiText-2 test; 2-process and 1-process "
        f"entries {'share one cache identity' if same else 'HAVE DIFFERENT IDENTITIES'}; C differs by at most "
        f"{rel:.1e} (relative), {int((a != b).sum())} of {a.numel():,} entries differ at all (float64 sums "
        f"added in another order, then rounded to float32). torch {torch.__version__}.",
    }


def load_file_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}
