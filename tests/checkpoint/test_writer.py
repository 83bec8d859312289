"""Writing the output folder: a kill mid-write leaves nothing half-written; hard links are never modified."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest

from rompatch.checkpoint.operations import apply_to_checkpoint, revert_checkpoint
from rompatch.errors import CheckpointError
from rompatch.patch import save_patch
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    file_shas,
    leftovers,
    make_ckpt,
    tensor_shas,
    weight_files,
)

REPO = Path(__file__).resolve().parents[2]


def _spawn_paused(args: list[str], pause_after: int) -> subprocess.Popen:
    """Run the CLI in a subprocess that pauses (sleeps) once ``pause_after`` weight files are in its
    staging folder, so the test can kill it mid-write."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN, str(pause_after), *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    buf = b""
    while b"paused after" not in buf:
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"subprocess did not pause: {buf.decode(errors='replace')}")
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            buf += os.read(proc.stderr.fileno(), 4096)
    return proc


_RUN = """
import os, sys, time
from rompatch.checkpoint import writer
from rompatch.cli.main import cli

pause_after, done, place = int(sys.argv[1]), [], writer.FolderWriter.place

def place_then_pause(self, rel):
    place(self, rel)
    if rel in self.src.files:
        done.append(rel)
        if len(done) == pause_after:
            os.write(2, f"paused after {len(done)} weight file(s)\\n".encode())
            time.sleep(3600)

writer.FolderWriter.place = place_then_pause
cli(sys.argv[2:], prog_name="rompatch")
"""


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_kill_during_apply_leaves_no_output_and_unchanged_input(tmp_path):
    model, base = make_ckpt(tmp_path)
    patch = save_patch(vector_patch(model, layer=1), tmp_path / "p.safetensors")
    inputs = file_shas(base)
    n_files = len(weight_files(base))

    proc = _spawn_paused(["apply", str(base), str(patch), "-o", str(tmp_path / "out")], pause_after=2)
    staging = leftovers(tmp_path)
    assert len(staging) == 1 and 2 <= len(list((tmp_path / staging[0]).glob("*.safetensors"))) < n_files
    _kill(proc)
    assert not (tmp_path / "out").exists(), "a killed apply leaves no OUT"
    assert file_shas(base) == inputs, "and an unchanged input"
    assert leftovers(tmp_path) == staging, "its staging folder stays until the next run"

    apply_to_checkpoint(base, [patch], tmp_path / "out")  # the next run cleans it up
    assert leftovers(tmp_path) == []
    done = file_shas(tmp_path / "out")

    # killed while replacing an existing OUT (--overwrite): OUT keeps its previous content
    other = save_patch(vector_patch(model, layer=2, subject="B"), tmp_path / "q.safetensors")
    proc = _spawn_paused(["apply", str(base), str(other), "-o", str(tmp_path / "out"), "--overwrite"], 3)
    _kill(proc)
    assert file_shas(tmp_path / "out") == done and file_shas(base) == inputs

    # killed during revert --in-place: the checkpoint is unchanged
    proc = _spawn_paused(["revert", str(tmp_path / "out"), str(patch), "--in-place"], 1)
    _kill(proc)
    assert file_shas(tmp_path / "out") == done and file_shas(base) == inputs
    revert_checkpoint(tmp_path / "out", [patch], in_place=True)
    assert tensor_shas(tmp_path / "out") == tensor_shas(base) and leftovers(tmp_path) == []


def test_hardlinked_inputs_are_never_modified(tmp_path):
    model, base = make_ckpt(tmp_path)
    p1 = vector_patch(model, layer=1)
    p2 = vector_patch(model, layer=1, seed=5, subject="B")
    apply_to_checkpoint(base, [p1], tmp_path / "o1")
    apply_to_checkpoint(tmp_path / "o1", [p2], tmp_path / "o2")
    snap = {d: file_shas(tmp_path / d) for d in ("base", "o1")}
    revert_checkpoint(tmp_path / "o2", [p1], in_place=True)  # rewrites the shard o1/o2 share... by a new file
    revert_checkpoint(tmp_path / "o2", [p2], in_place=True)
    assert {d: file_shas(tmp_path / d) for d in ("base", "o1")} == snap
    assert tensor_shas(tmp_path / "o2") == tensor_shas(base)
    res = apply_to_checkpoint(base, [p1], tmp_path / "copied", link=False)
    assert res.stats.linked == []
    assert all((tmp_path / "copied" / f.name).stat().st_ino != f.stat().st_ino for f in weight_files(base))


# ------------------------------------------------------------------ issue 17, failure 2: OUT races


def _during_write(monkeypatch, action):
    """Run ``action`` while apply writes its staging folder (after the up-front checks, before the swap)."""
    from rompatch.checkpoint.operations import StackWrite

    real = StackWrite.write

    def write(self, *a, **kw):
        out = real(self, *a, **kw)
        action()
        return out

    monkeypatch.setattr(StackWrite, "write", write)


def test_out_that_appears_while_applying_is_never_replaced(tmp_path, monkeypatch):

    model, base = make_ckpt(tmp_path)
    out = tmp_path / "race" / "x"

    def appear():
        out.mkdir(parents=True)
        (out / "precious.txt").write_text("data")

    _during_write(monkeypatch, appear)
    with pytest.raises(CheckpointError, match="appeared while writing"):
        apply_to_checkpoint(base, [vector_patch(model)], out)
    assert (out / "precious.txt").read_text() == "data" and sorted(p.name for p in out.iterdir()) == [
        "precious.txt"
    ]
    assert leftovers(out.parent) == []


def test_an_empty_folder_that_appears_is_not_replaced_either(tmp_path, monkeypatch):

    model, base = make_ckpt(tmp_path)
    out = tmp_path / "x"
    _during_write(monkeypatch, out.mkdir)  # a plain rename would replace an empty folder
    with pytest.raises(CheckpointError, match="appeared while writing"):
        apply_to_checkpoint(base, [vector_patch(model)], out)
    assert out.is_dir() and not any(out.iterdir())


def test_overwrite_checks_again_what_is_there_at_the_swap(tmp_path, monkeypatch):

    model, base = make_ckpt(tmp_path)
    out = tmp_path / "x"

    def appear():
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _during_write(monkeypatch, appear)
    with pytest.raises(CheckpointError, match="does not look like a model folder"):
        apply_to_checkpoint(base, [vector_patch(model)], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_two_applies_to_one_new_out_one_wins_the_other_fails_cleanly(tmp_path, monkeypatch):

    model, base = make_ckpt(tmp_path)
    out = tmp_path / "x"
    first, second = vector_patch(model, seed=1), vector_patch(model, seed=2)
    done = []

    def other_apply():  # the second apply runs to completion while the first one is writing
        if not done:
            done.append(True)
            apply_to_checkpoint(base, [second], out)

    _during_write(monkeypatch, other_apply)
    with pytest.raises(CheckpointError, match="appeared while writing"):
        apply_to_checkpoint(base, [first], out)
    record = json.loads((out / "rompatch.json").read_text())
    assert [a["patch_id"] for a in record["applied"]] == [second.id]
    assert file_shas(out) and leftovers(tmp_path) == []


_KILL_AT = """
import os, signal, sys
from rompatch import atomic
from rompatch.cli.main import cli

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

setattr(atomic, sys.argv[1], die)
cli(sys.argv[2:], prog_name="rompatch")
"""


def _run_killed_at(function: str, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILL_AT, function, *args], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_kill_in_the_commit_window_leaves_nothing_the_next_run_cannot_clean(tmp_path, overwrite):
    """Issue 17, failure 4: killed at the final rename (the staging folder complete and no longer
    marked as in progress), the full copy of the rewritten shards used to stay for ever."""
    model, base = make_ckpt(tmp_path)
    patch = save_patch(vector_patch(model, layer=1), tmp_path / "p.safetensors")
    other = save_patch(vector_patch(model, layer=2, subject="B"), tmp_path / "q.safetensors")
    out = tmp_path / "out"
    if overwrite:
        apply_to_checkpoint(base, [other], out)
    before = file_shas(out) if overwrite else None
    args = ["apply", str(base), str(patch), "-o", str(out)] + (["--overwrite"] if overwrite else [])
    _run_killed_at("_exchange" if overwrite else "_rename_new", args)
    assert (file_shas(out) if out.exists() else None) == before, "OUT is as it was"
    assert len(leftovers(tmp_path)) == 1, "the kill left the complete staging folder"

    with pytest.raises(CheckpointError, match="already exists") if overwrite else nullcontext():
        apply_to_checkpoint(base, [patch], out)  # the next run, even one that is refused, cleans up
    assert leftovers(tmp_path) == []


def test_symlinks_in_base_that_leave_it_are_refused_and_those_inside_copied_as_files(tmp_path):
    """Issue 17, failure 9: a link out of BASE was followed (a small target copied into OUT, a large
    one hard-linked) and a linked folder silently dropped; a dangling link gave a traceback."""
    model, base = make_ckpt(tmp_path)
    patch = save_patch(vector_patch(model, layer=1), tmp_path / "p.safetensors")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the checkpoint")

    (base / "passwd.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"passwd.txt is a symbolic link to .*outside the checkpoint"):
        apply_to_checkpoint(base, [patch], tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (base / "passwd.txt").unlink()

    (base / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(CheckpointError, match=r"dangling.txt is a broken symbolic link"):
        apply_to_checkpoint(base, [patch], tmp_path / "out")
    (base / "dangling.txt").unlink()

    (tmp_path / "elsewhere").mkdir()
    (base / "linked-dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"linked-dir is a symbolic link to .*outside the checkpoint"):
        apply_to_checkpoint(base, [patch], tmp_path / "out")
    (base / "linked-dir").unlink()

    # inside the folder: a linked file and a linked folder are carried as real files
    (base / "extra").mkdir()
    (base / "extra" / "notes.txt").write_text("inside")
    (base / "notes-link.txt").symlink_to("extra/notes.txt")
    (base / "extra-link").symlink_to("extra", target_is_directory=True)
    (base / "extra" / "loop").symlink_to("..", target_is_directory=True)  # a cycle: refused, not followed
    with pytest.raises(CheckpointError, match=r"loop is a symbolic link to a folder that contains it"):
        apply_to_checkpoint(base, [patch], tmp_path / "out")
    (base / "extra" / "loop").unlink()
    apply_to_checkpoint(base, [patch], tmp_path / "out")
    out = tmp_path / "out"
    for rel in ("notes-link.txt", "extra-link/notes.txt", "extra/notes.txt"):
        assert not (out / rel).is_symlink() and (out / rel).read_text() == "inside", rel
    assert not (out / "extra-link").is_symlink()


def test_a_record_or_undo_file_linked_out_of_the_folder_is_refused(tmp_path):
    """Issue 17, paths: the record and undo file names must resolve inside the checkpoint."""
    import shutil as sh

    model, base = make_ckpt(tmp_path)
    patch = save_patch(vector_patch(model, layer=1), tmp_path / "p.safetensors")
    out = tmp_path / "out"
    apply_to_checkpoint(base, [patch], out)
    for name in ("rompatch.json", "rompatch-undo.st"):
        moved = tmp_path / f"elsewhere-{name}"
        sh.move(out / name, moved)
        (out / name).symlink_to(moved)
        with pytest.raises(CheckpointError, match="symbolic link out of the checkpoint folder"):
            revert_checkpoint(out, [patch], out=tmp_path / f"reverted-{name}")
        (out / name).unlink()
        sh.move(moved, out / name)


def test_apply_and_revert_fsync_what_they_write_before_out_appears(tmp_path, monkeypatch):
    """Issue 17, failure 10: apply and revert never called fsync, so a power loss was not covered."""
    model, base = make_ckpt(tmp_path)
    patch = save_patch(vector_patch(model, layer=1), tmp_path / "p.safetensors")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = apply_to_checkpoint(base, [patch], tmp_path / "out")
    staged = [s for s in synced if ".rompatch-tmp." in s]
    for rel in [*r.stats.rewritten, "rompatch.json", "rompatch-undo.st"]:
        assert any(s.endswith("/" + rel) for s in staged), f"{rel} was not fsynced before the rename"
    assert any(os.path.basename(s).startswith(".out.rompatch-tmp.") for s in staged), "the staging folder"
    assert str(tmp_path) in synced, "and the parent folder after it"
    synced.clear()
    revert_checkpoint(tmp_path / "out", [patch], in_place=True)
    assert any(s.endswith("/rompatch-undo.st") or s.endswith(".safetensors") for s in synced)
    assert str(tmp_path) in synced
