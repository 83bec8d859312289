"""Writing a checkpoint folder: every file of the input, with new bytes for some tensors.

- a shard holding a touched tensor is copied (in a background thread, :class:`ShardCopier`) and the
  tensor's bytes are overwritten in the copy. Shape and dtype do not change, so the header, the tensor
  order and ``__metadata__`` stay byte-identical;
- untouched shards and other large files are hard-linked (or copied where linking is impossible, or
  when ``link=False``); small files (config, tokenizer) are copied. Existing files are never opened for
  writing: a rewrite always makes a new file, so a hard link into the input is never modified.

The output is a staging folder (:func:`rompatch.atomic.staged_output`) renamed into place by the caller.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import clean_stale, copy_file, link_or_copy, staged_folder
from ..constants import CHECKPOINT_RECORD, CHECKPOINT_UNDO
from ..errors import CheckpointError
from ..safetensors_io import TensorEntry, pwrite_all, tensor_bytes
from .reader import PICKLE_SUFFIXES, Checkpoint, folder_files

log = logging.getLogger(__name__)

LINK_MIN_BYTES = 1 << 20  # untouched files at least this large are hard-linked; smaller ones copied


@dataclass
class WriteStats:
    rewritten: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    touched_bytes: int = 0


class ShardCopier:
    """Copies the shards that will be rewritten into the staging folder, in a background thread.

    The kernel does the copying (sendfile), so it overlaps with validation and with computing the new
    tensors in this thread; a shard is patched once its copy is complete.
    """

    def __init__(self, src: Checkpoint, dest: Path, files: Sequence[str]):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rompatch-copy")
        self.futures: dict[str, Any] = {}
        for rel in sorted(set(files), key=src.files.index):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            self.futures[rel] = self.pool.submit(copy_file, src.path / rel, dest / rel)

    def wait(self, rel: str) -> None:
        self.futures[rel].result()

    def __enter__(self) -> ShardCopier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _looks_like_model_folder(p: Path) -> bool:
    if not any(p.iterdir()):
        return True
    return (p / "config.json").is_file() or (p / CHECKPOINT_RECORD).is_file() or any(p.glob("*.safetensors"))


def check_output(out: Path, *, overwrite: bool, protect: Sequence[Path]) -> None:
    """An existing ``out`` is refused unless ``overwrite``; it must look like a model folder (or be
    empty), and must not contain a path in ``protect`` (the input), which replacing it would delete."""
    if not out.exists():
        return
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


@contextmanager
def staged_output(
    out: str | os.PathLike, *, overwrite: bool = False, protect: Sequence[Path] = ()
) -> Iterator[Path]:
    """A staging folder that becomes the output folder ``out`` (:func:`rompatch.atomic.staged_folder`)
    once the block succeeds; ``out`` is checked first (:func:`check_output`)."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    clean_stale(out)  # what killed runs left, even when this run is refused
    check_output(out, overwrite=overwrite, protect=protect)

    def may_replace(found: Path) -> None:  # again at the swap: what is there now may have appeared meanwhile
        check_output(found, overwrite=overwrite, protect=protect)

    with staged_folder(out, error=CheckpointError, may_replace=may_replace if overwrite else None) as tmp:
        yield tmp


@contextmanager
def staged_copy(
    src: Checkpoint, out: str | os.PathLike, params: Sequence[str], *, overwrite: bool
) -> Iterator[tuple[Path, ShardCopier]]:
    """A staging folder for ``out`` (:func:`rompatch.atomic.staged_output`, protecting ``src``), with
    the shards holding ``params`` being copied into it in the background."""
    files = [src.entry(n).file for n in params]
    with (
        staged_output(out, overwrite=overwrite, protect=[src.path]) as tmp,
        ShardCopier(src, tmp, files) as cp,
    ):
        yield tmp, cp


Producer = Callable[[], torch.Tensor]


@dataclass
class FolderWriter:
    """Fills ``dest`` with ``src``'s files; tensors in ``new_values`` (param -> producer) get new bytes.

    Rewritten shards are copies (made by ``copier``) with the touched byte ranges overwritten (same
    header, order and metadata). The record and undo files are not carried (the caller writes them).
    """

    src: Checkpoint
    dest: Path
    new_values: Mapping[str, Producer]
    copier: ShardCopier
    link: bool
    stats: WriteStats = field(default_factory=WriteStats)
    by_file: dict[str, list[tuple[TensorEntry, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for param in self.new_values:
            e = self.src.entry(param)
            self.by_file.setdefault(e.file, []).append((e, param))

    def write(self) -> WriteStats:
        for rel in folder_files(self.src.path):
            self.place(rel)
        return self.stats

    def place(self, rel: str) -> None:
        """Write one file of the folder: rewritten, linked, copied or skipped."""
        s, d = self.src.path / rel, self.dest / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        weights = rel in self.src.files
        if rel in (CHECKPOINT_RECORD, CHECKPOINT_UNDO):
            return
        if not weights and rel.endswith(PICKLE_SUFFIXES):
            log.warning("not carrying pickle file %s (its weights would not include the patches)", rel)
            self.stats.skipped.append(rel)
        elif rel in self.by_file:
            self.rewrite(rel)
        elif weights or s.stat().st_size >= LINK_MIN_BYTES:
            getattr(self.stats, link_or_copy(s, d, self.link)).append(rel)
        else:
            copy_file(s, d)
            self.stats.copied.append(rel)

    def rewrite(self, rel: str) -> None:
        """Compute the new values of the tensors in shard ``rel``, then write them into its copy."""
        values = []
        for e, param in sorted(self.by_file[rel], key=lambda x: x[0].offset):
            value = self.new_values[param]()
            if value.dtype != e.torch_dtype or tuple(value.shape) != e.shape:
                raise AssertionError(f"{param}: new value {value.dtype} {tuple(value.shape)} != {e}")
            values.append((e, value))
        self.copier.wait(rel)
        fd = os.open(self.dest / rel, os.O_WRONLY)
        try:
            for e, value in values:
                pwrite_all(fd, tensor_bytes(value), e.offset)
                self.stats.touched_bytes += e.nbytes
        finally:
            os.close(fd)
        del values
        self.stats.rewritten.append(rel)
        log.info("rewrote %s (%d tensor(s))", rel, len(self.by_file[rel]))


def write_folder(
    src: Checkpoint, dest: Path, new_values: Mapping[str, Producer], copier: ShardCopier, *, link: bool
) -> WriteStats:
    """Fill ``dest`` with ``src``'s files, ``new_values`` giving new bytes (see :class:`FolderWriter`)."""
    return FolderWriter(src, dest, new_values, copier, link).write()
