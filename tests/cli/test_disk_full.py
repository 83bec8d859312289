"""Disk full (issue 17, failure 5): apply, revert and stack onto a small filesystem end in a one-line
error, with nothing written there. Runs where a tmpfs can be mounted in a private mount namespace
(``unshare -rm``, or as root); skipped otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rompatch.checkpoint.operations import apply_to_checkpoint
from rompatch.patch import save_patch
from tests.helpers import vector_patch
from tests.helpers.ckpt import make_ckpt

REPO = Path(__file__).resolve().parents[2]


def _can_mount(tmp_path: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True
    )
    return None if r.returncode == 0 else f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]})"


def _on_small_fs(small: Path, size: str, args: list[str], fill: bool) -> tuple[int, str, list[str]]:
    """Run ``rompatch ARGS`` with a tmpfs of ``size`` mounted on ``small``; returns its exit code,
    stderr and what was left on the small filesystem afterwards. ``fill``: fill it up first."""
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {small} && mkdir -p {small}/pre && "
        + (f"(cat /dev/zero > {small}/pre/fill 2>/dev/null; true) && " if fill else "")
        + f'"$@"; rc=$?; echo "LEFT:$(ls -A {small} | tr "\\n" " ")"; exit $rc'
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "rompatch", *args],
        capture_output=True,
        env=env,
    )
    left = r.stdout.decode().split("LEFT:")[-1].split()
    return r.returncode, r.stderr.decode(), sorted(set(left) - {"pre"})


def test_disk_full_is_a_one_line_error_and_leaves_nothing(tmp_path):
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    model, base = make_ckpt(tmp_path)
    patch = save_patch(vector_patch(model, layer=1), tmp_path / "p.safetensors")
    other = save_patch(vector_patch(model, layer=2, subject="B"), tmp_path / "q.safetensors")
    applied = tmp_path / "applied"
    apply_to_checkpoint(base, [patch], applied)
    small = tmp_path / "small"
    small.mkdir()
    cases = {
        "apply": ("96k", False, ["apply", str(base), str(patch), "-o", f"{small}/out"]),
        "revert": ("96k", False, ["revert", str(applied), str(patch), "-o", f"{small}/out"]),
        "stack": ("64k", True, ["stack", str(patch), str(other), "-o", f"{small}/stacked.safetensors"]),
    }
    for name, (size, fill, args) in cases.items():
        rc, err, left = _on_small_fs(small, size, args, fill)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert rc != 0, name
        assert len(lines) == 1 and "No space left on device" in lines[0], (name, err[-2000:])
        assert "free some space" in lines[0], name
        assert left == [], (name, left)
