"""Patches on checkpoints on disk: apply, revert and log without loading the model.

A checkpoint is a Hugging Face model folder whose weights are ``model.safetensors`` or shards listed
in ``model.safetensors.index.json`` (or a Hub id, fetched with ``huggingface_hub``). rompatch never
loads the model: it parses each safetensors header (8-byte length + JSON), then reads and writes only
the byte ranges of the tensors a patch touches.

Writing an output folder (``apply``, ``revert``):

- everything is written into a staging folder next to the output (``.<name>.rompatch-tmp.<pid>.<rand>``)
  and renamed into place at the end; replacing an existing folder swaps the two atomically
  (``renameat2(RENAME_EXCHANGE)`` on Linux, two renames elsewhere). A crash leaves the previous state
  (and at worst a staging folder, removed by the next run once its process is gone);
- a shard holding a touched tensor is copied and the tensor's bytes are overwritten in the copy. Shape
  and dtype do not change, so the header, the tensor order and ``__metadata__`` stay byte-identical;
- untouched shards and other large files are hard-linked (or copied where linking is impossible, or
  when ``link=False``); small files (config, tokenizer) are copied. Existing files are never opened for
  writing: a rewrite always makes a new file, so a hard link into the input is never modified;
- ``rompatch.json`` (the record) lists the applied patches in order with sha256 fingerprints of each
  touched tensor before and after, and whether they were forced; ``rompatch-undo.st`` (safetensors
  format) holds the original bytes of every touched tensor and the patches' vectors, so ``revert``
  needs neither the base checkpoint nor the patch files.

Numerics mirror :mod:`rompatch.apply` exactly: a touched tensor is always
``cast(original.float32 + Σ deltas of the applied patches in order)``, so a checkpoint patched on disk
is bit-identical to the same patches applied in memory to the model loaded from the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..atomic import copy_file, link_or_copy, staged_output
from ..constants import (
    CHECKPOINT_RECORD,
    CHECKPOINT_UNDO,
    ENV_TEST_PAUSE_AFTER_SHARD,
    SAFE_INDEX,
    SAFE_WEIGHTS,
)
from ..errors import (
    BaseMismatchError,
    CheckpointError,
    FingerprintMismatchError,
    HubError,
    LineageError,
    NotAppliedError,
    PatchFormatError,
)
from ..patch import Patch, from_safetensors, to_metadata
from ..refs import PatchesLike, PatchLike, find_applied, flatten_patches, resolve_patch
from .safetensors_io import (
    SafetensorsWriter,
    TensorEntry,
    pwrite_all,
    read_header,
    read_range,
    sha256_bytes,
    sha256_range,
    tensor_bytes,
    to_tensor,
)

log = logging.getLogger(__name__)

RECORD_FORMAT = "rompatch-checkpoint"
RECORD_VERSION = "1.0"
UNDO_FORMAT = "rompatch-undo"
LINK_MIN_BYTES = 1 << 20  # untouched files at least this large are hard-linked; smaller ones copied
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*", "*.py"]

# --------------------------------------------------------------------------------- checkpoints


@dataclass
class AppliedEntry:
    """One patch applied to a checkpoint, as the record keeps it."""

    patch: Patch
    forced: bool = False
    forced_reasons: list[str] = field(default_factory=list)  # "fingerprint", "lineage"
    applied_at: str | None = None
    source: str | None = None  # where the patch was read from (informational)
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)  # param -> {before, after}


@dataclass
class TrackedTensor:
    """A tensor some applied patch touches: where it is, and its fingerprints."""

    key: str
    file: str
    dtype: str  # "float32", "bfloat16", ...
    shape: tuple[int, ...]
    sha256_base: str  # before any rompatch patch (the bytes kept in the undo file)
    sha256: str  # now


@dataclass
class Record:
    """The contents of ``rompatch.json``: what was applied, in order, and what it changed."""

    base: dict[str, Any]
    tensors: dict[str, TrackedTensor] = field(default_factory=dict)
    applied: list[AppliedEntry] = field(default_factory=list)
    undo_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "format_version": RECORD_VERSION,
            "rompatch_version": __version__,
            "base": self.base,
            "undo": {"file": CHECKPOINT_UNDO, "bytes": self.undo_bytes},
            "tensors": {
                k: {
                    "key": t.key,
                    "file": t.file,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "sha256_base": t.sha256_base,
                    "sha256": t.sha256,
                }
                for k, t in self.tensors.items()
            },
            "applied": [
                {
                    "patch_id": a.patch.id,
                    "forced": a.forced,
                    "forced_reasons": a.forced_reasons,
                    "applied_at": a.applied_at,
                    "source": a.source,
                    "fingerprints": a.fingerprints,
                    "patch": to_metadata(a.patch),
                }
                for a in self.applied
            ],
        }


def provided_ids(patch: Patch) -> dict[str, range]:
    """Patch ids an applied ``patch`` satisfies as lineage: itself, and each patch stacked into it
    (with the range of its deltas). See :func:`rompatch.stack.stack_patches`."""
    from ..stack import stacked_components

    out = {patch.id: range(len(patch.deltas))}
    for comp_id, rng in stacked_components(patch):
        out.setdefault(comp_id, rng)
    return out


class Checkpoint:
    """A safetensors model folder opened for reading: its tensors' locations, config and record."""

    def __init__(self, path: str | os.PathLike, *, source: Mapping[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint folder")
        self.source: dict[str, Any] = dict(source or {"model": str(path), "revision": None})
        self.index: dict[str, Any] | None = None
        index_path = self.path / SAFE_INDEX
        if index_path.is_file():
            try:
                self.index = json.loads(index_path.read_text())
                weight_map = dict(self.index["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index_path}: not a valid safetensors index ({e}); re-download or re-save the checkpoint"
                ) from None
            self.files = sorted(set(weight_map.values()))
        elif (self.path / SAFE_WEIGHTS).is_file():
            weight_map = None
            self.files = [SAFE_WEIGHTS]
        else:
            _refuse_non_safetensors(self.path)
            raise CheckpointError(
                f"{self.path}: no {SAFE_WEIGHTS} or {SAFE_INDEX}; pass a Hugging Face model folder saved with "
                "safetensors (save_pretrained)"
            )
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, dict | None] = {}
        for rel in self.files:
            f = self.path / rel
            if not f.is_file():
                raise CheckpointError(
                    f"{self.path}: shard {rel} listed in {SAFE_INDEX} is missing; the download is incomplete"
                )
            entries, meta = read_header(f, rel=rel)
            self.metadata[rel] = meta
            for e in entries:
                self.entries[e.key] = e
        if weight_map is not None:
            for key, rel in weight_map.items():
                e = self.entries.get(key)
                if e is None or e.file != rel:
                    raise CheckpointError(
                        f"{self.path}: {SAFE_INDEX} puts '{key}' in {rel}, but that shard does not hold it; "
                        "the index and shards do not match, re-save the checkpoint"
                    )
        self.config: dict[str, Any] = {}
        cfg = self.path / "config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except ValueError as e:
                raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        self._record: Record | None | bool = False  # False: not read yet

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.files)} file(s), {len(self.entries)} tensors)"

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    # ---- tensors

    def key_for(self, param: str) -> str:
        """The safetensors key of model parameter ``param`` (exact, or without the base-model prefix,
        as in checkpoints saved from the bare model: ``h.0.mlp.c_proj.weight``)."""
        if param in self.entries:
            return param
        head, _, rest = param.partition(".")
        if rest and rest in self.entries:
            return rest
        raise CheckpointError(
            f"{self.path}: no tensor '{param}' in this checkpoint; the patch is for another architecture or "
            "model"
        )

    def entry(self, param: str) -> TensorEntry:
        return self.entries[self.key_for(param)]

    def read_raw(self, param: str) -> bytearray:
        e = self.entry(param)
        return read_range(self.path / e.file, e.offset, e.nbytes)

    def read(self, param: str) -> torch.Tensor:
        """One tensor, read from its byte range only."""
        e = self.entry(param)
        return to_tensor(read_range(self.path / e.file, e.offset, e.nbytes), e)

    def sha256(self, param: str) -> str:
        e = self.entry(param)
        return sha256_range(self.path / e.file, e.offset, e.nbytes)

    # ---- the record

    @property
    def record(self) -> Record | None:
        """The rompatch record, or None for a checkpoint rompatch did not write (or fully reverted)."""
        if self._record is False:
            self._record = _read_record(self)
        return self._record  # type: ignore[return-value]

    def undo_tensor(self, name: str) -> bytearray:
        entries = self._undo_entries()
        e = entries[name]
        return read_range(self.path / CHECKPOINT_UNDO, e.offset, e.nbytes)

    def _undo_entries(self) -> dict[str, TensorEntry]:
        if not hasattr(self, "_undo"):
            entries, _ = read_header(self.path / CHECKPOINT_UNDO)
            self._undo = {e.key: e for e in entries}
        return self._undo

    def original(self, param: str) -> torch.Tensor:
        """``param`` as it was before any rompatch patch: from the undo data if tracked, else on disk."""
        rec = self.record
        if rec is not None and param in rec.tensors:
            e = self._undo_entries()[f"base.{param}"]
            raw = self.undo_tensor(f"base.{param}")
            if sha256_bytes(raw) != rec.tensors[param].sha256_base:
                raise CheckpointError(
                    f"{self.path / CHECKPOINT_UNDO}: the saved original of '{param}' does not match its recorded "
                    "sha256; the undo data is corrupt"
                )
            return to_tensor(raw, e)
        return self.read(param)

    def verify_record(self) -> list[str]:
        """Tracked tensors whose bytes no longer match the record (changed after rompatch wrote them)."""
        rec = self.record
        if rec is None:
            return []
        return [name for name, t in rec.tensors.items() if self.sha256(name) != t.sha256]


def _refuse_non_safetensors(path: Path) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path} holds pickle weights ({', '.join(pickles[:3])}) and no safetensors; rompatch never unpickles. "
            'Convert once: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" (transformers writes "
            "safetensors by default), then pass that folder"
        )


def _read_record(ckpt: Checkpoint) -> Record | None:
    rpath = ckpt.path / CHECKPOINT_RECORD
    if not rpath.is_file():
        return None
    where = str(rpath)
    try:
        raw = json.loads(rpath.read_text())
        if raw.get("format") != RECORD_FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {RECORD_FORMAT!r}")
        major = int(str(raw.get("format_version", "0")).split(".")[0])
        if major > int(RECORD_VERSION.split(".")[0]):
            raise CheckpointError(
                f"{where} was written by a newer rompatch (record format {raw['format_version']}); upgrade "
                "rompatch (pip install -U rompatch)"
            )
        tensors = {
            k: TrackedTensor(
                key=t["key"],
                file=t["file"],
                dtype=t["dtype"],
                shape=tuple(t["shape"]),
                sha256_base=t["sha256_base"],
                sha256=t["sha256"],
            )
            for k, t in raw["tensors"].items()
        }
        undo = raw["undo"]
        applied_raw = raw["applied"]
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: not a valid rompatch record ({e}); the file is corrupt") from None
    upath = ckpt.path / CHECKPOINT_UNDO
    if not upath.is_file():
        raise CheckpointError(
            f"{ckpt.path}: {CHECKPOINT_RECORD} is present but its undo data {CHECKPOINT_UNDO} is missing; the "
            "folder was copied incompletely"
        )
    if upath.stat().st_size != int(undo.get("bytes", -1)):
        raise CheckpointError(
            f"{upath}: size differs from the one in {CHECKPOINT_RECORD}; the undo data is truncated or from "
            "another checkpoint"
        )
    entries, _ = read_header(upath)
    undo_entries = {e.key: e for e in entries}
    applied = []
    for i, a in enumerate(applied_raw):
        try:
            pid = a["patch_id"]
            meta = a["patch"]
            n = len(json.loads(meta["deltas"]))
            tensors_ = {}
            for j in range(n):
                for x in ("u", "v"):
                    e = undo_entries[f"patch.{pid}.deltas.{j}.{x}"]
                    tensors_[f"deltas.{j}.{x}"] = to_tensor(read_range(upath, e.offset, e.nbytes), e)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{where}: applied patch {i} cannot be rebuilt from {CHECKPOINT_UNDO} (missing {e}); the undo "
                "data is corrupt"
            ) from None
        try:
            patch = from_safetensors(meta, tensors_, where=f"{where} applied[{i}]")
        except PatchFormatError as e:
            raise CheckpointError(f"{e}; the record is corrupt") from None
        if patch.id != pid:
            raise CheckpointError(f"{where}: applied patch {i} has id {patch.short_id}, recorded {pid[:12]}")
        applied.append(
            AppliedEntry(
                patch=patch,
                forced=bool(a.get("forced")),
                forced_reasons=list(a.get("forced_reasons", [])),
                applied_at=a.get("applied_at"),
                source=a.get("source"),
                fingerprints={k: dict(v) for k, v in a.get("fingerprints", {}).items()},
            )
        )
    return Record(
        base=dict(raw.get("base", {})),
        tensors=tensors,
        applied=applied,
        undo_bytes=int(undo.get("bytes", 0)),
    )


# --------------------------------------------------------------------------- opening / the Hub


def open_checkpoint(ref: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Open a local safetensors model folder, an embedded model, or fetch a Hub model first.

    ``ref`` is resolved as ``load_model`` resolves it (``rompatch.models.local_model_path``): an
    embedded alias is its converted folder (fetched and converted on first use), a missing local
    path is a ``NoSuchFolderError`` before any Hub call. Hub ids go through
    ``huggingface_hub.snapshot_download`` (so ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``
    apply): first the small files, then only the shards the index lists.
    """
    from ..models import local_model_path

    p = local_model_path(ref)
    if p is None:
        folder, commit = _hub_snapshot(str(ref), revision)
        return Checkpoint(folder, source={"model": str(ref), "revision": commit})
    if not p.is_dir():
        raise CheckpointError(f"{ref} is a file; pass the model folder that holds it (with config.json)")
    if revision is not None:
        raise CheckpointError(
            f"{ref} is a local folder or an embedded model; --revision only applies to Hub ids"
        )
    return Checkpoint(p, source=_local_identity(p))


def _local_identity(path: Path) -> dict[str, Any]:
    from ..models import SOURCE_FILE

    src = path / SOURCE_FILE
    if src.is_file():  # an embedded model's converted folder: same identity as load_model gives it
        try:
            info = json.loads(src.read_text())
            return {
                "model": info.get("alias", str(path)),
                "revision": f"gguf-sha256:{info.get('gguf_sha256', '')}",
            }
        except ValueError:
            pass
    return {"model": str(path.resolve()), "revision": None}


def _hub_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(patterns: list[str], rev: str | None) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=rev, allow_patterns=patterns))
        except HFValidationError:
            raise CheckpointError(f"{repo_id}: no such checkpoint folder, and not a valid Hub id") from None
        except GatedRepoError:
            raise HubError(
                f"{repo_id} is gated; accept its terms on the Hub and set HF_TOKEN (or `hf auth login`)",
                repo_id=repo_id,
            ) from None
        except RepositoryNotFoundError:
            raise HubError(
                f"{repo_id}: no such local folder or Hub model (or it is private: set HF_TOKEN)",
                repo_id=repo_id,
            ) from None
        except RevisionNotFoundError:
            raise HubError(
                f"{repo_id}: no revision {rev!r} on the Hub; pass an existing branch, tag or commit",
                repo_id=repo_id,
            ) from None
        except LocalEntryNotFoundError:
            raise HubError(
                f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (offline or "
                "HF_HUB_OFFLINE=1); connect, or pass a local folder",
                repo_id=repo_id,
            ) from None
        except HfHubHTTPError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HubError(
                f"{repo_id}: Hub request failed ({first}); retry, or pass a local folder", repo_id=repo_id
            ) from None

    folder = fetch(HUB_FILE_PATTERNS, revision)
    commit = folder.name if len(folder.name) == 40 else revision
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{repo_id}: {SAFE_INDEX} is not a valid index ({e})") from None
    else:
        shards = [SAFE_WEIGHTS]
    folder = fetch(shards, commit)
    if not all((folder / s).is_file() for s in shards):
        if (folder / "pytorch_model.bin.index.json").is_file() or not index.is_file():
            raise CheckpointError(
                f"Hub repo {repo_id} has no safetensors weights (pickle .bin only?); rompatch never unpickles. "
                'Convert once: python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{repo_id}').save_pretrained('local-copy')\", then pass local-copy"
            )
        raise HubError(
            f"{repo_id}: some shards listed in {SAFE_INDEX} could not be fetched; retry", repo_id=repo_id
        )
    return folder, commit


def _pause_hook(count: int) -> None:
    want = os.environ.get(ENV_TEST_PAUSE_AFTER_SHARD)
    if want and count == int(want):
        os.write(2, f"rompatch: paused after {count} weight file(s) (test hook)\n".encode())
        while True:
            time.sleep(3600)


@dataclass
class WriteStats:
    rewritten: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    touched_bytes: int = 0


class _ShardCopier:
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

    def __enter__(self) -> _ShardCopier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_folder(
    src: Checkpoint,
    dest: Path,
    new_values: Mapping[str, Callable[[], torch.Tensor]],
    copier: _ShardCopier,
    *,
    link: bool,
) -> WriteStats:
    """Fill ``dest`` with ``src``'s files; tensors in ``new_values`` (param -> producer) get new bytes.

    Rewritten shards are copies (made by ``copier``) with the touched byte ranges overwritten (same
    header, order and metadata). The record and undo files are not carried (the caller writes them).
    """
    stats = WriteStats()
    by_file: dict[str, list[tuple[TensorEntry, str]]] = {}
    for param in new_values:
        e = src.entry(param)
        by_file.setdefault(e.file, []).append((e, param))
    _fill(src, dest, by_file, new_values, copier, set(src.files), stats, link)
    return stats


def _fill(
    src: Checkpoint,
    dest: Path,
    by_file: Mapping[str, list[tuple[TensorEntry, str]]],
    new_values: Mapping[str, Callable[[], torch.Tensor]],
    copier: _ShardCopier,
    weight_files: set[str],
    stats: WriteStats,
    link: bool,
) -> None:
    count = 0
    for rel in _walk(src.path):
        s, d = src.path / rel, dest / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        if rel in (CHECKPOINT_RECORD, CHECKPOINT_UNDO):
            continue
        if rel not in weight_files and rel.endswith(PICKLE_SUFFIXES):
            log.warning("not carrying pickle file %s (its weights would not include the patches)", rel)
            stats.skipped.append(rel)
            continue
        if rel in by_file:
            values = []
            for e, param in sorted(by_file[rel], key=lambda x: x[0].offset):
                value = new_values[param]()
                if value.dtype != e.torch_dtype or tuple(value.shape) != e.shape:
                    raise AssertionError(f"{param}: new value {value.dtype} {tuple(value.shape)} != {e}")
                values.append((e, value))
            copier.wait(rel)
            fd = os.open(d, os.O_WRONLY)
            try:
                for e, value in values:
                    pwrite_all(fd, tensor_bytes(value), e.offset)
                    stats.touched_bytes += e.nbytes
            finally:
                os.close(fd)
            del values
            stats.rewritten.append(rel)
            log.info("rewrote %s (%d tensor(s))", rel, len(by_file[rel]))
        elif rel in weight_files or s.stat().st_size >= LINK_MIN_BYTES:
            getattr(stats, link_or_copy(s, d, link)).append(rel)
        else:
            copy_file(s, d)
            stats.copied.append(rel)
        if rel in weight_files:
            count += 1
            _pause_hook(count)


def _walk(root: Path) -> list[str]:
    """Files under ``root`` (relative, sorted), skipping hidden files and folders (.git, .cache, ...)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


# -------------------------------------------------------------------------------- numerics


_CHUNK_ELEMS = 4 << 20  # rows of the dense update are built this many float32 elements at a time


def add_delta(acc: torch.Tensor, d: Any, layout: str, *, sign: int = 1) -> None:
    """``acc += d.matrix(layout)`` (``-=`` for ``sign=-1``), bit for bit, without the full dense temporary.

    Every element is ``acc[i, j] ± fl(v_i · u_j)`` exactly as in ``acc.add_(torch.outer(v, u))``: the
    update is only built a block of rows at a time (float products commute, so the Conv1D transpose
    ``outer(v, u).T`` equals ``outer(u, v)`` element for element).
    """
    a, b = (d.u, d.v) if layout == "conv1d" else (d.v, d.u)  # rows, columns of the stored weight
    step = max(1, _CHUNK_ELEMS // max(1, b.numel()))
    for r in range(0, a.numel(), step):
        blk = acc[r : r + step]
        upd = torch.outer(a[r : r + step], b)
        blk.add_(upd) if sign > 0 else blk.sub_(upd)


def _accumulate(
    original: torch.Tensor, parts: Sequence[tuple[Patch, Sequence[int]]], name: str
) -> torch.Tensor | None:
    """float32 ``original + Σ deltas`` on ``name`` over ``parts`` in order; None when none touch it.

    The same operations, in the same order, as :func:`rompatch.apply._expected_value`.
    """
    acc = None
    for p, idx in parts:
        for i in idx:
            d = p.deltas[i]
            if d.parameter == name:
                if acc is None:
                    acc = original.to(torch.float32, copy=True)
                add_delta(acc, d, p.parameters[name].layout)
    return acc


def _value(original: torch.Tensor, parts: Sequence[tuple[Patch, Sequence[int]]], name: str) -> torch.Tensor:
    acc = _accumulate(original, parts, name)
    return original.clone() if acc is None else acc.to(original.dtype)


def _sha(t: torch.Tensor) -> str:
    return sha256_bytes(tensor_bytes(t))


def _full(p: Patch) -> tuple[Patch, range]:
    return p, range(len(p.deltas))


_BLOCK_ELEMS = 1 << 18  # rows are hashed in blocks of about this many elements (1 MB in float32)
# ... and computed in sub-blocks below torch's intra-op grain size (at::internal::GRAIN_SIZE, 32768
# elements): torch runs an elementwise op on fewer elements on the calling thread, so the arithmetic
# stays on one core (the shard copy and the hashing use others) without changing torch's
# process-wide thread count. Rows longer than that are one sub-block each (torch may split those).
_SUB_BLOCK_ELEMS = (1 << 15) - 1


def _chain(
    original: torch.Tensor, applied: Sequence[AppliedEntry], name: str, original_sha: str | None
) -> tuple[torch.Tensor, dict[int, dict[str, str]], str]:
    """Final value of ``name``, the sha256 before and after each applied entry touching it, and the
    sha256 of ``original`` (hashed here when ``original_sha`` is None).

    Computed a block of rows at a time (cache-sized). Every element goes through exactly the
    operations of the in-memory apply, ``fl(fl(w) + fl(v_i · u_j))`` per delta in order, then one cast
    per patch, so the result is bit-identical to :func:`rompatch.apply._expected_value`. The blocks
    are hashed in a worker thread (hashlib releases the GIL) while the next block is computed.
    """
    steps = []  # (entry index, [(row factor, column factor)], hasher)
    for k, a in enumerate(applied):
        layout = a.patch.parameters[name].layout if name in a.patch.parameters else "linear"
        fs = [(d.u, d.v) if layout == "conv1d" else (d.v, d.u) for d in a.patch.deltas if d.parameter == name]
        if fs:
            steps.append((k, fs, hashlib.sha256()))
    orig_h = hashlib.sha256() if original_sha is None else None
    if not steps:
        if orig_h is not None:
            orig_h.update(tensor_bytes(original))
        return original, {}, original_sha or orig_h.hexdigest()  # type: ignore[union-attr]
    rows = original.shape[0]
    cols = original.numel() // rows
    step = max(1, _BLOCK_ELEMS // cols)
    sub = max(1, _SUB_BLOCK_ELEMS // cols)
    out = torch.empty_like(original)
    acc = torch.empty((min(sub, rows), cols), dtype=torch.float32)
    prod = torch.empty_like(acc)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rompatch-sha") as hashing:
        for r in range(0, rows, step):
            n = min(step, rows - r)
            if orig_h is not None:
                hashing.submit(orig_h.update, tensor_bytes(original[r : r + n]))
            # each patch's cast sum of rows r..r+n (the last one straight into the result)
            blks = [torch.empty_like(original[r : r + n]) for _ in steps[:-1]] + [out[r : r + n]]
            for s in range(r, r + n, sub):
                m = min(sub, r + n - s)
                acc[:m].copy_(original[s : s + m])  # exact: float32 holds every value of the narrower dtypes
                for (_, fs, _), blk in zip(steps, blks):
                    for a_, b_ in fs:
                        torch.mul(a_[s : s + m, None], b_[None, :], out=prod[:m])  # outer(a, b), rows s..s+m
                        acc[:m].add_(prod[:m])
                    blk[s - r : s - r + m].copy_(acc[:m])  # the cast of the sum; same rounding as .to()
            for (_, _, h), blk in zip(steps, blks):
                hashing.submit(h.update, tensor_bytes(blk))
    before = original_sha or orig_h.hexdigest()  # type: ignore[union-attr]
    prints: dict[int, dict[str, str]] = {}
    for k, _, h in steps:
        prints[k] = {"before": before, "after": h.hexdigest()}
        before = prints[k]["after"]
    return out, prints, prints[steps[0][0]]["before"]


# ------------------------------------------------------------------------------------ results


@dataclass
class CheckpointResult:
    """What ``apply_to_checkpoint`` / ``revert_checkpoint`` did."""

    path: Path
    applied: list[str]  # patch ids applied to the output, in order
    touched: list[str]  # parameters whose bytes changed
    stats: WriteStats
    undo_bytes: int = 0
    forced: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    residuals: dict[str, dict[str, Any]] = field(default_factory=dict)  # foreign revert only

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "applied": self.applied,
            "reverted": self.reverted,
            "forced": self.forced,
            "touched": self.touched,
            "touched_bytes": self.stats.touched_bytes,
            "rewritten": self.stats.rewritten,
            "linked": self.stats.linked,
            "copied": self.stats.copied,
            "skipped": self.stats.skipped,
            "undo_bytes": self.undo_bytes,
            "residuals": self.residuals,
        }


# -------------------------------------------------------------------------------------- apply


def _state(ckpt: Checkpoint, *, allow_modified: bool = False) -> Record:
    """The checkpoint's record (an empty one for a foreign checkpoint), checked against the bytes on disk."""
    rec = ckpt.record
    if rec is None:
        base = dict(ckpt.source)
        base["model_type"] = ckpt.model_type
        return Record(base=base)
    modified = ckpt.verify_record()
    if modified and not allow_modified:
        raise CheckpointError(
            f"{ckpt.path}: {', '.join(modified)} changed after rompatch wrote this checkpoint, so its record "
            "no longer describes it; start again from the base (or `rompatch revert --all --force` restores "
            "the recorded originals)"
        )
    for name in modified:
        log.warning("%s: '%s' changed after rompatch wrote it; restoring from the undo data", ckpt.path, name)
    return rec


def _resolve(ref: PatchLike) -> tuple[Patch, str | None]:
    """The patch and, for a file or Hub reference, where it came from (recorded in the log)."""
    return resolve_patch(ref), None if isinstance(ref, Patch) else str(ref)


def _provided(applied: Sequence[AppliedEntry]) -> dict[str, tuple[int, range]]:
    out: dict[str, tuple[int, range]] = {}
    for k, a in enumerate(applied):
        for pid, rng in provided_ids(a.patch).items():
            out.setdefault(pid, (k, rng))
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def apply_to_checkpoint(
    base: str | os.PathLike,
    patches: PatchesLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    force: bool = False,
    link: bool = True,
    revision: str | None = None,
) -> CheckpointResult:
    """Apply ``patches`` in order to the checkpoint ``base``, writing folder ``out``.

    ``base``: a local model folder, an embedded alias or a Hub id (see ``open_checkpoint``).
    ``patches``: patch files, ``Patch`` objects or Hub references, one or a sequence (nested one
    level, such as a ``create_patch`` chain; see ``rompatch.refs``); all are resolved before the
    checkpoint is opened.

    The model is never loaded; only shards holding touched tensors are rewritten (see the module
    docstring). Each touched tensor's sha256 must equal the patch's recorded fingerprint, and a patch's
    lineage must already be applied (``base`` may itself be a rompatch-written checkpoint: the chain
    continues); ``force=True`` applies anyway and records that it did. Nothing is written until every
    check has passed, and ``out`` appears in one rename.
    """
    resolved = [_resolve(p) for p in flatten_patches(patches)]
    if not resolved:
        raise PatchFormatError("no patches given; pass at least one patch file")
    ckpt = open_checkpoint(base, revision=revision)
    rec = _state(ckpt)
    changed = sorted({n for p, _ in resolved for n in p.parameters})
    files = [ckpt.entry(n).file for n in changed]  # refuses unknown tensors before anything is written
    # The copies of the shards to rewrite start now, in the background, while the checks run; if a
    # check fails, the staging folder (and the copies) are removed.
    with (
        staged_output(out, overwrite=overwrite, protect=[ckpt.path]) as tmp,
        _ShardCopier(ckpt, tmp, files) as cp,
    ):
        applied, originals, pending = _check_apply(ckpt, rec, resolved, force)
        stats, undo_bytes = _write_into(
            ckpt, tmp, cp, rec, applied, changed, link=link, originals=originals, pending=pending, force=force
        )
    forced_ids = [a.patch.id for a in applied[len(rec.applied) :] if a.forced]
    log.info("applied %d patch(es) to %s -> %s", len(resolved), ckpt.path, out)
    return CheckpointResult(
        path=Path(os.path.abspath(out)),
        applied=[a.patch.id for a in applied],
        touched=changed,
        stats=stats,
        undo_bytes=undo_bytes,
        forced=forced_ids,
    )


def _check_apply(
    ckpt: Checkpoint, rec: Record, resolved: Sequence[tuple[Patch, str | None]], force: bool
) -> tuple[list[AppliedEntry], dict[str, torch.Tensor], dict[str, tuple[int, Patch]]]:
    """Lineage and fingerprint checks, in application order. Returns the new applied list, the
    originals of newly touched tensors, and the fingerprint checks left to do on those: a tensor no
    patch touched yet is hashed while its new value is computed (:func:`_write_into` finishes them)."""
    applied = list(rec.applied)
    originals: dict[str, torch.Tensor] = {}  # params newly tracked by this run: their value now
    pending: dict[str, tuple[int, Patch]] = {}

    def original(name: str) -> torch.Tensor:
        if name in rec.tensors:
            return ckpt.original(name)
        if name not in originals:
            originals[name] = ckpt.read(name)
        return originals[name]

    tracked = set(rec.tensors)
    for patch, source in resolved:
        provided = _provided(applied)
        if patch.id in provided:
            k, _ = provided[patch.id]
            host = applied[k].patch
            how = "" if host.id == patch.id else f" (as part of stacked patch {host.short_id})"
            raise LineageError(f"patch {patch.short_id} is already applied to {ckpt.path}{how}")
        reasons = []
        missing = [pid for pid in patch.lineage if pid not in provided]
        if missing:
            msg = (
                f"patch {patch.short_id} was computed on top of {', '.join(m[:12] for m in missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not applied to {ckpt.path}; apply "
                f"{'that patch' if len(missing) == 1 else 'those patches'} first (or --force)"
            )
            if not force:
                raise LineageError(msg)
            log.warning("%s; applying anyway (force)", msg)
            reasons.append("lineage")
        lineage_parts = [
            (applied[k].patch, rng)
            for pid, (k, rng) in sorted(provided.items(), key=lambda x: x[1][0])
            if pid in patch.lineage
        ]
        for name, info in patch.parameters.items():
            e = ckpt.entry(name)
            if e.shape != tuple(info.shape):
                raise BaseMismatchError(
                    f"'{name}' has shape {list(e.shape)} in {ckpt.path} but {list(info.shape)} in patch "
                    f"{patch.short_id}; the patch is for a different model"
                )
            _ = e.torch_dtype  # refuses non-float storage
            if name in tracked:
                actual = _sha(_value(original(name), lineage_parts, name))
                if _fingerprint_mismatch(ckpt, patch, name, actual, force) and "fingerprint" not in reasons:
                    reasons.append("fingerprint")
            else:
                original(name)
                pending[name] = (len(applied), patch)
            tracked.add(name)
        applied.append(
            AppliedEntry(
                patch, forced=bool(reasons), forced_reasons=reasons, applied_at=_now(), source=source
            )
        )
    return applied, originals, pending


def _fingerprint_mismatch(ckpt: Checkpoint, patch: Patch, name: str, actual: str, force: bool) -> bool:
    """False when ``actual`` is the fingerprint ``patch`` expects for ``name``; raise, or warn with force."""
    info = patch.parameters[name]
    if actual == info.sha256:
        return False
    stored = ckpt.entry(name).dtype_name
    hint = (
        f"; the patch was computed on {info.dtype} weights, this checkpoint stores {stored}"
        if info.dtype != stored
        else "; use the patch's base model"
    )
    msg = (
        f"base fingerprint mismatch on '{name}': patch {patch.short_id} expects sha256 {info.sha256}, "
        f"{ckpt.path} has {actual}{hint}"
    )
    if not force:
        raise FingerprintMismatchError(
            msg + ", or pass --force (force=True) to apply anyway",
            parameter=name,
            expected=info.sha256,
            found=actual,
        )
    log.warning("%s; applying anyway (force)", msg)
    return True


def _write_into(
    ckpt: Checkpoint,
    tmp: Path,
    copier: _ShardCopier,
    rec: Record,
    applied: list[AppliedEntry],
    changed: Sequence[str],
    *,
    link: bool,
    originals: Mapping[str, torch.Tensor] | None = None,
    pending: Mapping[str, tuple[int, Patch]] | None = None,
    force: bool = False,
) -> tuple[WriteStats, int]:
    """Write ``ckpt`` with ``applied`` as its patch stack into the staging folder ``tmp``, recomputing
    the ``changed`` tensors; returns the write stats and the undo data's size.

    ``originals``: values of untracked tensors the caller already read. ``pending``: fingerprint checks
    (tensor -> applied index, patch) done here, on the hash computed with the new value; a mismatch
    raises (nothing is committed) or, with ``force``, marks that entry forced.
    """
    originals = dict(originals or {})
    pending = dict(pending or {})
    still = {n for a in applied for n in a.patch.parameters}
    new_tensors: dict[str, TrackedTensor] = {}
    fingerprints: dict[int, dict[str, dict[str, str]]] = {
        k: dict(a.fingerprints) for k, a in enumerate(applied)
    }
    for k in fingerprints:  # parameters whose chain changes get fresh fingerprints below
        for n in changed:
            fingerprints[k].pop(n, None)
    for name in sorted(still):
        e = ckpt.entry(name)
        old = rec.tensors.get(name)
        new_tensors[name] = TrackedTensor(
            key=e.key,
            file=e.file,
            dtype=e.dtype_name,
            shape=e.shape,
            sha256_base=old.sha256_base if old else "",
            sha256=old.sha256 if old else "",
        )
    undo_specs = [(f"base.{n}", ckpt.entry(n).dtype, ckpt.entry(n).shape) for n in sorted(still)]
    for a in applied:
        for j, d in enumerate(a.patch.deltas):
            undo_specs += [
                (f"patch.{a.patch.id}.deltas.{j}.u", "F32", tuple(d.u.shape)),
                (f"patch.{a.patch.id}.deltas.{j}.v", "F32", tuple(d.v.shape)),
            ]

    def original(name: str) -> torch.Tensor:
        if name in originals:
            return originals.pop(name)
        return ckpt.original(name)

    undo = (
        SafetensorsWriter(tmp / CHECKPOINT_UNDO, undo_specs, {"format": UNDO_FORMAT, "format_version": "1"})
        if applied
        else None
    )

    def producer(name: str) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            orig = original(name)
            if name not in new_tensors:  # no patch touches it any more: back to the original bytes
                return orig
            t = new_tensors[name]
            value, prints, t.sha256_base = _chain(orig, applied, name, t.sha256_base or None)
            if name in pending:
                k, patch = pending[name]
                if _fingerprint_mismatch(ckpt, patch, name, t.sha256_base, force):
                    applied[k].forced = True
                    if "fingerprint" not in applied[k].forced_reasons:
                        applied[k].forced_reasons.append("fingerprint")
            undo.write(f"base.{name}", tensor_bytes(orig))  # type: ignore[union-attr]
            for k, fp in prints.items():
                fingerprints[k][name] = fp
            t.sha256 = prints[max(prints)]["after"]
            return value

        return make

    try:
        stats = _write_folder(ckpt, tmp, {n: producer(n) for n in changed}, copier, link=link)
        if undo is None:
            return stats, 0
        for name in sorted(still - set(changed)):  # carried over from the input's undo data
            undo.write(f"base.{name}", ckpt.undo_tensor(f"base.{name}"))
        for a in applied:
            for j, d in enumerate(a.patch.deltas):
                undo.write(f"patch.{a.patch.id}.deltas.{j}.u", tensor_bytes(d.u))
                undo.write(f"patch.{a.patch.id}.deltas.{j}.v", tensor_bytes(d.v))
    finally:
        undo_bytes = undo.close() if undo is not None else 0
    for k, a in enumerate(applied):
        a.fingerprints = {n: fingerprints[k][n] for n in a.patch.parameters if n in fingerprints[k]}
    new_rec = Record(base=rec.base, tensors=new_tensors, applied=applied, undo_bytes=undo_bytes)
    (tmp / CHECKPOINT_RECORD).write_text(json.dumps(new_rec.to_json(), indent=2, ensure_ascii=False) + "\n")
    return stats, undo_bytes


# ------------------------------------------------------------------------------------- revert


def revert_checkpoint(
    checkpoint: str | os.PathLike,
    patches: PatchesLike = (),
    *,
    out: str | os.PathLike | None = None,
    in_place: bool = False,
    all: bool = False,  # noqa: A002
    force: bool = False,
    overwrite: bool = False,
    link: bool = True,
) -> CheckpointResult:
    """Remove ``patches`` from a checkpoint (a local folder, an embedded alias or a Hub id).

    ``patches``: patch objects, files, Hub references or id prefixes of applied patches, one or a
    sequence (nested one level); an id is as ``rompatch.apply.revert_patch`` describes it.

    On a rompatch-written checkpoint the touched tensors are recomputed from the undo data: reverting
    everything restores them bit for bit (and drops the record), and reverting from the middle of a
    stack gives exactly what applying only the others gives. On a checkpoint rompatch did not write,
    the deltas are subtracted in float32 and cast once; ``residuals`` reports, per tensor, the largest
    absolute difference between the stored result and the exact float32 subtraction, and whether the
    result hashes to the patch's base fingerprint (an exact restore).

    Write to ``out`` (a new folder) or ``in_place=True`` (the folder is replaced atomically; files are
    never modified in place, so hard links into other folders are safe).
    """
    from ..models import embedded_alias

    if (out is None) == (not in_place):
        raise CheckpointError("pass exactly one of out=... (-o OUT) or in_place=True (--in-place)")
    if in_place and (embedded_alias(checkpoint) or not Path(checkpoint).expanduser().is_dir()):
        raise CheckpointError(
            f"{checkpoint}: --in-place needs a local folder (not a Hub id or an embedded model); write to "
            "-o OUT instead"
        )
    refs = flatten_patches(patches)
    ckpt = open_checkpoint(checkpoint)
    if in_place:
        out = ckpt.path
        overwrite = True
    if ckpt.record is None:
        if all:
            raise NotAppliedError(f"{ckpt.path} has no rompatch record; name the patches to subtract")
        return _revert_foreign(
            ckpt, [resolve_patch(p) for p in refs], out, overwrite=overwrite, force=force, link=link
        )
    rec = _state(ckpt, allow_modified=force)
    if all:
        targets = list(range(len(rec.applied)))
    else:
        if not refs:
            raise NotAppliedError("no patches given; name the patches to revert (file or id), or pass --all")
        targets = sorted({_find_applied(rec, p, ckpt.path) for p in refs})
    removed = [rec.applied[k] for k in targets]
    remaining = [a for k, a in enumerate(rec.applied) if k not in targets]
    removed_ids = {pid for a in removed for pid in provided_ids(a.patch)}
    still_provided = {pid for a in remaining for pid in provided_ids(a.patch)}
    for a in remaining:
        deps = [pid for pid in a.patch.lineage if pid in removed_ids and pid not in still_provided]
        if deps and not force:
            raise LineageError(
                f"patch {deps[0][:12]} cannot be reverted while {a.patch.short_id} (computed on top of it) is "
                "applied; revert that too (or --force)"
            )
    changed = sorted({n for a in removed for n in a.patch.parameters})
    if force:
        changed = sorted(set(changed) | set(ckpt.verify_record()))
    files = [ckpt.entry(n).file for n in changed]
    with (
        staged_output(out, overwrite=overwrite, protect=[ckpt.path]) as tmp,
        _ShardCopier(ckpt, tmp, files) as cp,
    ):
        stats, undo_bytes = _write_into(ckpt, tmp, cp, rec, remaining, changed, link=link)
    log.info("reverted %d patch(es) from %s -> %s", len(removed), ckpt.path, out)
    return CheckpointResult(
        path=Path(os.path.abspath(out)),
        applied=[a.patch.id for a in remaining],
        touched=changed,
        stats=stats,
        undo_bytes=undo_bytes,
        reverted=[a.patch.id for a in removed],
    )


def _find_applied(rec: Record, ref: PatchLike, where: Path) -> int:
    k, pid = find_applied([a.patch for a in rec.applied], ref, where=str(where))
    if k is not None:
        return k
    for a in rec.applied:
        if pid in provided_ids(a.patch):
            raise NotAppliedError(
                f"patch {pid[:12]} was applied to {where} as part of stacked patch {a.patch.short_id}; revert "
                "that patch"
            )
    applied = ", ".join(a.patch.short_id for a in rec.applied) or "none"
    raise NotAppliedError(f"patch {pid[:12]} is not applied to {where} (applied: {applied})")


def _revert_foreign(
    ckpt: Checkpoint,
    patches: Sequence[Patch],
    out: str | os.PathLike,
    *,
    overwrite: bool,
    force: bool,
    link: bool,
) -> CheckpointResult:
    """Subtract deltas from a checkpoint without a record; no undo data exists, so report residuals."""
    if not patches:
        raise NotAppliedError("no patches given; name the patches to subtract")
    names = sorted({n for p in patches for n in p.parameters})
    residuals: dict[str, dict[str, Any]] = {}
    for name in names:
        e = ckpt.entry(name)
        first = next(p for p in patches if name in p.parameters)
        info = first.parameters[name]
        if e.shape != tuple(info.shape):
            raise BaseMismatchError(
                f"'{name}' has shape {list(e.shape)} in {ckpt.path} but {list(info.shape)} in the patch"
            )
        if ckpt.sha256(name) == info.sha256 and not force:
            raise NotAppliedError(
                f"'{name}' in {ckpt.path} already equals patch {first.short_id}'s base fingerprint, so the patch "
                "is not applied there; nothing to revert (or --force to subtract anyway)"
            )
    parts = [_full(p) for p in reversed(patches)]

    def producer(name: str) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            w = ckpt.read(name)
            acc = w.to(torch.float32, copy=True)
            for p, idx in parts:
                for i in reversed(idx):
                    d = p.deltas[i]
                    if d.parameter == name:
                        add_delta(acc, d, p.parameters[name].layout, sign=-1)
            value = acc.to(w.dtype)
            first = next(p for p in patches if name in p.parameters)
            residuals[name] = {
                "max_abs_residual": float((value.to(torch.float32) - acc).abs().max()),
                "restored_base_fingerprint": _sha(value) == first.parameters[name].sha256,
            }
            return value

        return make

    files = [ckpt.entry(n).file for n in names]
    with (
        staged_output(out, overwrite=overwrite, protect=[ckpt.path]) as tmp,
        _ShardCopier(ckpt, tmp, files) as cp,
    ):
        stats = _write_folder(ckpt, tmp, {n: producer(n) for n in names}, cp, link=link)
    for name, r in residuals.items():
        log.info(
            "%s: max |residual| %.3g, base fingerprint restored: %s",
            name,
            r["max_abs_residual"],
            r["restored_base_fingerprint"],
        )
    return CheckpointResult(
        path=Path(os.path.abspath(out)),
        applied=[],
        touched=names,
        stats=stats,
        reverted=[p.id for p in patches],
        residuals=residuals,
    )


# ---------------------------------------------------------------------------------------- log


def checkpoint_log(checkpoint: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The patches applied to a checkpoint, in order, with their edits and fingerprints.

    ``verify`` re-hashes the tracked tensors and reports under ``modified`` any that changed after
    rompatch wrote them (a stale record).
    """
    ckpt = open_checkpoint(checkpoint)
    rec = ckpt.record
    if rec is None:
        return {"path": str(ckpt.path), "rompatch": False, "base": ckpt.source, "applied": [], "modified": []}
    entries = []
    for k, a in enumerate(rec.applied):
        s = a.patch.summary()
        entries.append(
            {
                "index": k,
                "id": a.patch.id,
                "forced": a.forced,
                "forced_reasons": a.forced_reasons,
                "applied_at": a.applied_at,
                "source": a.source,
                "lineage": a.patch.lineage,
                "patch_base": a.patch.base,
                "fingerprints": a.fingerprints,
                "edits": s["edits"],
            }
        )
    return {
        "path": str(ckpt.path),
        "rompatch": True,
        "base": rec.base,
        "applied": entries,
        "tensors": {k: v["sha256"] for k, v in rec.to_json()["tensors"].items()},
        "undo_bytes": rec.undo_bytes,
        "modified": ckpt.verify_record() if verify else [],
    }


__all__ = [
    "Checkpoint",
    "CheckpointResult",
    "AppliedEntry",
    "Record",
    "TensorEntry",
    "open_checkpoint",
    "apply_to_checkpoint",
    "revert_checkpoint",
    "checkpoint_log",
    "staged_output",
    "read_header",
]
