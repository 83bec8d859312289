"""A SIGKILL before every write operation of apply, apply --overwrite and revert --in-place (issue 17):
OUT is old or new, the base never changes, and the next run leaves no staging folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_kill_at_every_write_leaves_out_old_or_new_and_nothing_after_the_next_run():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kill_points", "--json"], env=env, capture_output=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    by_name = {s["name"]: s for s in result["scenarios"]}
    assert result["violations"] == 0, [v for s in result["scenarios"] for v in s["violations"]]
    assert result["trials"] >= 100
    for s in result["scenarios"]:
        assert s["trials"] == s["writes"] > 10, s["name"]
        assert s["out_other"] == s["base_changed"] == s["leftover_after_next_run"] == 0, s["name"]
        assert s["leftover_after_kill"] > 0, "the kills did hit the staging phase"
    # the kills reached both sides of the commit: before it OUT is old, after it new
    assert by_name["apply --overwrite"]["out_new"] > 0 and by_name["apply --overwrite"]["out_old"] > 0
    assert by_name["revert --in-place"]["out_new"] > 0 and by_name["revert --in-place"]["out_old"] > 0
    assert by_name["apply to a new OUT"]["out_old"] == by_name["apply to a new OUT"]["trials"]
