"""Issue 17: a SIGKILL before every write operation of apply, apply --overwrite and revert --in-place
(bench/kill_points.py): what state OUT is left in, and whether the next run leaves anything behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TITLE = "Kills at every write syscall: apply, apply --overwrite, revert --in-place (issue 17)"
FULL_ONLY = False

REPO = Path(__file__).resolve().parent.parent


def run() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    load0 = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kill_points", "--json"],
        env=env,
        capture_output=True,
        cwd=REPO,
        check=True,
    )
    r = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    rows = []
    for s in r["scenarios"]:
        rows.append(
            {
                "metric": f"{s['name']}: kills / violations",
                "value": f"{s['trials']} / {len(s['violations'])}",
                "unit": "",
                "target": "0 violations",
                "note": f"OUT left old {s['out_old']}, new {s['out_new']}"
                + (f", moved aside and restored by the next run {s['out_aside']}" if s["out_aside"] else "")
                + f", other {s['out_other']}; base changed {s['base_changed']}; staging left by the kill "
                f"{s['leftover_after_kill']}, after the next run {s['leftover_after_next_run']}; next run: "
                + ", ".join(f"{k} {v}" for k, v in sorted(s["next_run"].items())),
            }
        )
    return {
        "rows": rows,
        "setup": f"A tiny random Llama checkpoint in 12 shards (tests.helpers.ckpt.make_ckpt), one rank-one patch. "
        "For each operation a forked child is killed (SIGKILL) just before its k-th write operation, for every k "
        "(counted with Python audit hooks: open for writing, mkdir, rename, unlink, rmdir, link, chmod, copyfile, "
        "renameat2 through ctypes); then the same operation runs again. The last scenario forces the two-rename "
        "replace used where renameat2(RENAME_EXCHANGE) is missing: there, a kill between its two renames leaves "
        "OUT moved aside under the killed process's name, and the next run puts it back before anything else. "
        f"{r['trials']} kills in {r['seconds']} s; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end.",
    }
