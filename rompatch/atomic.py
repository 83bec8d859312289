"""Atomic writes: a file through a temporary file and a rename (``atomic_write``); a folder through a
staging folder that is renamed (or atomically swapped) into place (``staging``).

A crash or kill leaves the previous state; staging folders of dead processes on this host are removed
by the next run. Used by ``apply``/``revert`` on checkpoints, where the output is a whole model folder.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .constants import CHECKPOINT_RECORD
from .errors import CheckpointError

log = logging.getLogger(__name__)

_STAGE_MARK = ".rompatch-staging"
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove staging folders for ``out`` left by killed processes on this host."""
    for d in out.parent.glob(f".{out.name}.rompatch-tmp.*"):
        mark = d / _STAGE_MARK
        try:
            host, pid = mark.read_text().split()
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and not _pid_alive(int(pid)):
            log.info("removing staging folder %s left by killed process %s", d, pid)
            shutil.rmtree(d, ignore_errors=True)


def _looks_like_model_folder(p: Path) -> bool:
    if not any(p.iterdir()):
        return True
    return (p / "config.json").is_file() or (p / CHECKPOINT_RECORD).is_file() or any(p.glob("*.safetensors"))


@contextmanager
def staged_output(
    out: str | os.PathLike, *, overwrite: bool = False, protect: Sequence[Path] = ()
) -> Iterator[Path]:
    """Yield an empty staging folder; on success, it becomes ``out`` in one rename (or atomic swap).

    On any error (or a kill) ``out`` is left as it was. An existing ``out`` is refused unless
    ``overwrite``; it must look like a model folder (or be empty), and must not contain a path in
    ``protect`` (the input), which replacing it would delete.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    if out.exists():
        if not overwrite:
            raise CheckpointError(
                f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or choose another output"
            )
        if not out.is_dir():
            raise CheckpointError(f"{out} exists and is not a folder; remove it or choose another output")
        if not _looks_like_model_folder(out):
            raise CheckpointError(
                f"refusing to overwrite {out}: it does not look like a model folder (no config.json or "
                "*.safetensors); remove it yourself or choose another output"
            )
        for p in protect:
            p = Path(os.path.abspath(p))
            if p != out and out in p.parents:
                raise CheckpointError(f"{out} contains the input {p}; replacing it would delete the input")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.rompatch-tmp.{os.getpid()}.", dir=out.parent))
    (tmp / _STAGE_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        (tmp / _STAGE_MARK).unlink()
        if not out.exists():
            try:
                os.rename(tmp, out)
            except OSError as e:
                raise CheckpointError(
                    f"{out} appeared while writing it ({e.strerror}); nothing was replaced"
                ) from None
        elif _exchange(tmp, out):
            (tmp / _STAGE_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
            shutil.rmtree(tmp, ignore_errors=True)  # the previous `out`
        else:  # no atomic swap here: two renames, with the old folder kept until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.rompatch-tmp.{os.getpid()}.", dir=out.parent))
            os.rename(out, old / "old")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # sendfile/copy_file_range in the kernel on Linux
    try:
        shutil.copymode(src, dst)
    except OSError:
        pass


def link_or_copy(src: Path, dst: Path, link: bool) -> str:
    if link:
        try:
            os.link(os.path.realpath(src), dst)
            return "linked"
        except OSError:
            pass
    copy_file(src, dst)
    return "copied"


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` then rename into place; nothing is left behind on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a patch is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
