"""A SIGKILL at every write syscall of a checkpoint operation (issue 17).

For each operation (apply to a new OUT, apply --overwrite, revert --in-place, and apply --overwrite
where the system has no atomic exchange), a first run counts the write operations it makes, and then
for every k a forked child is killed (SIGKILL, no clean-up of any kind) just before its k-th one.
After each kill:

- the base checkpoint is unchanged (sha256 of every file);
- OUT is exactly the old state or exactly the new one (sha256 of every file; "old" is "absent" for a
  new OUT);
- the next run on that OUT (the same operation again: it succeeds, or it is refused because it is
  already done) leaves no staging folder or file behind.

Write operations are counted through Python audit hooks (PEP 578): every ``open`` for writing,
``mkdir``, ``rename``/``replace``, ``unlink``, ``rmdir``, ``link``, ``symlink``, ``chmod``,
``truncate``, ``shutil.copyfile`` and foreign calls through ``ctypes`` (``renameat2``). The data
written by ``pwrite``/``sendfile`` into an open file is between two counted operations, so a kill
after it is covered by the kill before the next one.

Run as ``python -m bench.kill_points [--json]`` in a process of its own: it forks, so it sets torch
to one thread before making anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

WRITE_EVENTS = {
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.link",
    "os.symlink",
    "os.chmod",
    "os.truncate",
    "shutil.copyfile",
    "ctypes.call_function",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _is_write(event: str, args: tuple) -> bool:
    if event in WRITE_EVENTS:
        return True
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        if isinstance(flags, int) and flags & _WRITE_FLAGS:
            return True
        return isinstance(mode, str) and any(c in mode for c in "wax+")
    return False


def _install_killer(at: int | None, counter: list[int]) -> None:
    """Count write operations in this process; SIGKILL it just before the ``at``-th (1-based)."""

    def hook(event: str, args: tuple) -> None:
        if _is_write(event, args):
            counter[0] += 1
            if at is not None and counter[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _in_child(fn: Callable[[], None], *, kill_at: int | None) -> tuple[str, int]:
    """Run ``fn`` in a forked child. Returns ("killed"|"ok"|"error", number of writes counted)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        counter = [0]
        _install_killer(kill_at, counter)
        status = "ok"
        try:
            fn()
        except Exception as e:  # refused operations are a normal outcome of "the next run"
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        os.write(w, json.dumps([status, counter[0]]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", kill_at or 0
    out, n = json.loads(data)
    return out, n


def _shas(folder: Path) -> dict[str, str] | None:
    """sha256 of every file under ``folder`` (None if it does not exist); the checkpoint record's
    ``applied_at`` times are left out, since two runs of one operation differ only there."""
    import hashlib

    from rompatch.constants import CHECKPOINT_RECORD

    if not folder.exists():
        return None
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == CHECKPOINT_RECORD:
                rec = json.loads(data)
                for a in rec.get("applied", []):
                    a.pop("applied_at", None)
                data = json.dumps(rec, sort_keys=True).encode()
            out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if ".rompatch-tmp." in p.name or ".rompatch-old." in p.name
    )


@dataclass
class Scenario:
    name: str
    writes: int = 0  # write operations of one uninterrupted run
    trials: int = 0
    out_old: int = 0  # after the kill, OUT was exactly the old state
    out_new: int = 0  # ... exactly the new state
    out_aside: int = 0  # two-rename fallback only: OUT moved aside, the next run restores it
    out_other: int = 0  # neither: a violation
    base_changed: int = 0  # a violation
    leftover_after_kill: int = 0  # staging left by the kill (expected: cleaned by the next run)
    leftover_after_next_run: int = 0  # a violation
    next_run: dict[str, int] = field(default_factory=dict)  # outcomes of the next run
    violations: list[str] = field(default_factory=list)


def run_matrix(work: Path) -> dict:
    import torch

    torch.set_num_threads(1)  # no thread pools before forking
    from rompatch import atomic
    from rompatch.checkpoint.operations import apply_to_checkpoint, revert_checkpoint
    from rompatch.patch import save_patch
    from tests.helpers import vector_patch
    from tests.helpers.ckpt import make_ckpt

    model, base = make_ckpt(work)
    p1 = save_patch(vector_patch(model, layer=1), work / "p1.safetensors")
    p2 = save_patch(vector_patch(model, layer=2, subject="B"), work / "p2.safetensors")
    applied = work / "applied"  # base + p1: the old state of the --overwrite and --in-place cases
    apply_to_checkpoint(base, [p1], applied)
    stage = work / "stage"
    stage.mkdir()
    out = stage / "out"

    def reset(state: Path | None) -> None:
        for p in stage.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if state is not None:
            shutil.copytree(state, out)

    def no_exchange() -> None:
        atomic._exchange = lambda a, b: False  # noqa: SLF001 (in the forked child only)

    # (name, old state of OUT, operation, whether OUT may be briefly absent: the two-rename fallback
    # moves the old OUT aside before renaming the new one in, and the next run puts it back)
    scenarios: list[tuple[str, Path | None, Callable[[], None], bool]] = [
        ("apply to a new OUT", None, lambda: apply_to_checkpoint(base, [p1], out), False),
        ("apply --overwrite", applied, lambda: apply_to_checkpoint(base, [p2], out, overwrite=True), False),
        ("revert --in-place", applied, lambda: revert_checkpoint(out, [p1], in_place=True), False),
        (
            "apply --overwrite, no atomic exchange (two renames)",
            applied,
            lambda: (no_exchange(), apply_to_checkpoint(base, [p2], out, overwrite=True)),
            True,
        ),
    ]
    base_shas = _shas(base)
    results = []
    t0 = time.time()
    for name, old_state, op, aside_allowed in scenarios:
        sc = Scenario(name)
        reset(old_state)
        old = _shas(out)
        status, sc.writes = _in_child(op, kill_at=None)
        if status != "ok":
            raise RuntimeError(f"{name}: the uninterrupted run failed: {status}")
        new = _shas(out)
        for k in range(1, sc.writes + 1):
            reset(old_state)
            status, _ = _in_child(op, kill_at=k)
            sc.trials += 1
            if status != "killed":
                sc.violations.append(f"kill at write {k}: the run was not killed ({status})")
                continue
            now = _shas(out)
            if now == old:
                sc.out_old += 1
            elif now == new:
                sc.out_new += 1
            elif now is None and old is not None and aside_allowed:
                sc.out_aside += 1  # checked below: the next run must put it back
            else:
                sc.out_other += 1
                sc.violations.append(f"kill at write {k}: OUT is neither old nor new")
            if _shas(base) != base_shas:
                sc.base_changed += 1
                sc.violations.append(f"kill at write {k}: the base changed")
            sc.leftover_after_kill += bool(_leftovers(stage))
            status, _ = _in_child(op, kill_at=None)  # the next run
            outcome = "ok" if status == "ok" else status.split(":")[1].strip()
            sc.next_run[outcome] = sc.next_run.get(outcome, 0) + 1
            if _leftovers(stage):
                sc.leftover_after_next_run += 1
                sc.violations.append(f"kill at write {k}: {_leftovers(stage)} left after the next run")
            if _shas(out) != new:
                sc.violations.append(f"kill at write {k}: the next run did not reach the new state")
        results.append(sc)
    return {
        "scenarios": [asdict(s) for s in results],
        "trials": sum(s.trials for s in results),
        "violations": sum(len(s.violations) for s in results),
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rompatch-kill-") as d:
        result = run_matrix(Path(d))
    if args.json:
        print(json.dumps(result))
    else:
        for s in result["scenarios"]:
            print(
                f"{s['name']}: {s['trials']} kills; OUT old {s['out_old']}, new {s['out_new']}, moved aside "
                f"{s['out_aside']}, other {s['out_other']}; base changed {s['base_changed']}; staging left by the kill "
                f"{s['leftover_after_kill']}, after the next run {s['leftover_after_next_run']}"
            )
            for v in s["violations"]:
                print("  VIOLATION", v)
        print(f"{result['trials']} kills, {result['violations']} violations, {result['seconds']} s")


if __name__ == "__main__":
    main()
