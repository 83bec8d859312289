"""Atomic writes: a file through a temporary file and a rename (``atomic_write``); a folder through a
staging folder that is renamed (or atomically swapped) into place (``staged_folder``).

A crash or kill leaves the previous state. Whatever a kill leaves (a staging folder or file, or the
previous folder kept aside) is named after its owner, ``<host hash>-<pid>-<process start time>``, so the
next run tells it from the work of a live process and removes it (``clean_stale``). Files and folders
are fsynced before the final rename. Used by ``apply``/``revert`` on checkpoints (the output is a whole model folder) and
by the PEFT adapter export. What may be replaced is the caller's policy, checked before staging.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_STAGE_MARK = ".rompatch-staging"  # rompatch < 0.2 marked its staging folders with this file
_TMP = "rompatch-tmp"
_OLD = "rompatch-old"
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


# macOS renamex_np's flags for the same two operations
_DARWIN_FLAGS = {_RENAME_NOREPLACE: 0x4, _RENAME_EXCHANGE: 0x2}  # RENAME_EXCL, RENAME_SWAP


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """rename(a, b) with ``flags`` (``_RENAME_NOREPLACE`` or ``_RENAME_EXCHANGE``), atomically: Linux
    renameat2, macOS renamex_np. False where the call or the flag is unsupported (other systems, some
    file systems); OSError when the rename itself fails."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":
            fn = libc.renamex_np
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            args: tuple = (os.fsencode(a), os.fsencode(b), _DARWIN_FLAGS[flags])
        else:
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            at_fdcwd = -100
            args = (at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags)
    except (OSError, AttributeError):
        return False
    if fn(*args) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE, renamex_np RENAME_SWAP). False where
    unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_new(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, which must not exist: FileExistsError if it does, even if it appeared
    a moment ago (renameat2 RENAME_NOREPLACE on Linux, renamex_np RENAME_EXCL on macOS: atomic). On
    Windows a rename never replaces. Elsewhere a check just before a plain rename narrows the window
    (a plain POSIX rename would replace an empty folder)."""
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


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux /proc), telling a reused pid from
    the process that made a staging folder; 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
    """This process as staging names carry it: ``<host hash>-<pid>-<start time>``."""
    return f"{_host_id()}-{os.getpid()}-{_start_time(os.getpid())}"


_OWNER = re.compile(r"([0-9a-f]{8})-(\d+)-(\d+)\.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_gone(owner: str) -> bool:
    """Whether the process named by ``owner`` (see ``_owner``) has ended: it ran on this host and
    its pid is free or now belongs to a process started at another time. A folder of another host
    (a shared file system) is never judged."""
    m = _OWNER.match(owner)
    if m is None or m.group(1) != _host_id():
        return False
    pid, start = int(m.group(2)), int(m.group(3))
    return not _pid_alive(pid) or (start != 0 and _start_time(pid) not in (0, start))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def clean_stale(out: str | os.PathLike) -> None:
    """Remove what killed processes on this host left next to ``out``: staging folders and files
    (``.<name>.rompatch-tmp.<owner>.<random>``), and the previous ``out`` kept aside during a
    two-rename replace (``.<name>.rompatch-old.<owner>.<random>/old``), which is first put back if
    the kill came before the new ``out`` was in place. Folders of live processes are left alone."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    if not out.parent.is_dir():
        return
    for kind in (_OLD, _TMP):  # an old `out` is restored before staging folders are judged
        prefix = f".{out.name}.{kind}."
        for p in out.parent.glob(f"{glob.escape(prefix)}*"):
            owner = p.name[len(prefix) :]
            if _owner_gone(owner):
                if kind == _OLD and (p / "old").exists() and not (out.exists() or out.is_symlink()):
                    log.warning("restoring %s, which a killed process had moved aside", out)
                    os.rename(p / "old", out)
                log.info("removing %s left by a killed process", p)
                _remove(p)
            elif kind == _TMP and (p / _STAGE_MARK).is_file():  # rompatch < 0.2: pid in a marker file
                try:
                    host, pid = (p / _STAGE_MARK).read_text().split()
                except (OSError, ValueError):
                    continue
                if host == socket.gethostname() and not _pid_alive(int(pid)):
                    _remove(p)


def _staging_dir(out: Path, kind: str = _TMP) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}.{_owner()}.", dir=out.parent))


def sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files hard-linked from elsewhere are already on
    disk: only their folder entries are synced)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            path = os.path.join(dirpath, f)
            if os.lstat(path).st_nlink == 1:
                _fsync_path(path)
        _fsync_path(dirpath, directory=True)


def _fsync_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some systems cannot open a folder; its entries are synced with the files
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def staged_folder(
    out: str | os.PathLike,
    *,
    error: type[Exception] = OSError,
    may_replace: Callable[[Path], None] | None = None,
    durable: bool = True,
) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; on success, it becomes ``out`` in one rename, or
    replaces an existing ``out`` in one atomic swap (two renames where the system has none).

    Replacing is the caller's decision, taken again at the moment of the swap: with ``may_replace``
    None an existing ``out`` is never replaced, even one that appeared while writing (``error`` is
    raised and nothing is replaced); otherwise ``may_replace(out)`` runs just before the swap and
    raises to refuse (the folder found there may not be the one checked before writing).

    ``durable``: every file and folder written is fsynced before the rename, and the parent folder
    after it, so a power loss leaves the old or the new ``out`` (bench/RESULTS.md gives the cost).

    On any error ``out`` is left as it was and the staging folder is removed. After a kill, at any
    point, what is left carries its owner's pid and start time in its name (``clean_stale``), and the
    next run removes it.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = _staging_dir(out)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if durable:
            sync_tree(tmp)
        _swap_into_place(tmp, out, error, may_replace)
        if durable:
            _fsync_path(out.parent, directory=True)
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
    if _exchange(tmp, out):  # `tmp` now holds the previous `out`, under this process's staging name
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # no atomic swap here: two renames, the old folder kept aside (and restorable) until then
        old = _staging_dir(out, _OLD)
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` then rename into place; nothing is left behind on failure, and a
    temporary file a kill leaves (named like a staging folder) is removed by the next write of
    ``path``. ``durable``: the file is fsynced before the rename and its folder after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP}.{_owner()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a patch is meant to be shared
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_path(path.parent, directory=True)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
