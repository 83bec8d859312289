"""Atomic writes: a file through a temporary file and a rename (``atomic_write``); a folder through a
staging folder that is renamed (or atomically swapped) into place (``staged_folder``).

A crash or kill leaves the previous state; staging folders of dead processes on this host are removed
by the next run. Used by ``apply``/``revert`` on checkpoints (the output is a whole model folder) and
by the PEFT adapter export. What may be replaced is the caller's policy, checked before staging.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_STAGE_MARK = ".rompatch-staging"
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2(a, b, flags). False where the call or the flag is unsupported; OSError otherwise."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_new(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, which must not exist: FileExistsError if it does, even if it appeared
    a moment ago (Linux renameat2 RENAME_NOREPLACE, atomic). Where that call is missing, a check just
    before a plain rename narrows the window (a plain rename would replace an empty folder)."""
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "already exists", str(out)) from None
        raise
    if out.exists() or out.is_symlink():
        raise FileExistsError(errno.EEXIST, "already exists", str(out))
    os.rename(tmp, out)


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


@contextmanager
def staged_folder(
    out: str | os.PathLike,
    *,
    error: type[Exception] = OSError,
    may_replace: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; on success, it becomes ``out`` in one rename, or
    replaces an existing ``out`` in one atomic swap (two renames where the system has none).

    Replacing is the caller's decision, taken again at the moment of the swap: with ``may_replace``
    None an existing ``out`` is never replaced, even one that appeared while writing (``error`` is
    raised and nothing is replaced); otherwise ``may_replace(out)`` runs just before the swap and
    raises to refuse (the folder found there may not be the one checked before writing).

    On any error (or a kill) ``out`` is left as it was and the staging folder is removed (by the next
    run, after a kill).
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
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
        _swap_into_place(tmp, out, error, may_replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(
    tmp: Path, out: Path, error: type[Exception], may_replace: Callable[[Path], None] | None
) -> None:
    if may_replace is None or not (out.exists() or out.is_symlink()):
        try:
            _rename_new(tmp, out)
        except OSError as e:
            raise error(
                f"{out} appeared while writing it ({e.strerror}); nothing was replaced, run again "
                "(with --overwrite to replace it)"
            ) from None
        return
    may_replace(out)  # the policy, on what is there now
    if _exchange(tmp, out):
        (tmp / _STAGE_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        shutil.rmtree(tmp, ignore_errors=True)  # the previous `out`
    else:  # no atomic swap here: two renames, with the old folder kept until the new one is in place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.rompatch-tmp.{os.getpid()}.", dir=out.parent))
        os.rename(out, old / "old")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


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
