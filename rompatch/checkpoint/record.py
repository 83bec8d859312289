"""The record of a rompatch-written checkpoint: ``rompatch.json`` and its undo data.

``rompatch.json`` lists the applied patches in order, with sha256 fingerprints of each touched tensor
before and after, and whether they were forced. ``rompatch-undo.st`` (safetensors format) holds the
original bytes of every touched tensor (``base.<param>``) and the applied patches' vectors
(``patch.<id>.deltas.<j>.u|v|k``), so ``revert`` needs neither the base checkpoint nor the patch files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..constants import CHECKPOINT_RECORD, CHECKPOINT_UNDO
from ..errors import CheckpointError, PatchFormatError
from ..patch import Patch, from_safetensors, to_metadata
from ..safetensors_io import TensorEntry, read_header, read_range, to_tensor
from ..stack import stacked_components

RECORD_FORMAT = "rompatch-checkpoint"
RECORD_VERSION = "1.0"
UNDO_FORMAT = "rompatch-undo"


@dataclass
class AppliedEntry:
    """One patch applied to a checkpoint, as the record keeps it."""

    patch: Patch
    forced: bool = False
    forced_reasons: list[str] = field(default_factory=list)  # "fingerprint", "lineage"
    applied_at: str | None = None
    source: str | None = None  # where the patch was read from (informational)
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)  # param -> {before, after}

    def to_json(self) -> dict[str, Any]:
        return {
            "patch_id": self.patch.id,
            "forced": self.forced,
            "forced_reasons": self.forced_reasons,
            "applied_at": self.applied_at,
            "source": self.source,
            "fingerprints": self.fingerprints,
            "patch": to_metadata(self.patch),
        }


@dataclass
class TrackedTensor:
    """A tensor some applied patch touches: where it is, and its fingerprints."""

    key: str
    file: str
    dtype: str  # "float32", "bfloat16", ...
    shape: tuple[int, ...]
    sha256_base: str  # before any rompatch patch (the bytes kept in the undo file)
    sha256: str  # now

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "sha256_base": self.sha256_base,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, t: dict[str, Any]) -> TrackedTensor:
        return cls(
            key=t["key"],
            file=t["file"],
            dtype=t["dtype"],
            shape=tuple(t["shape"]),
            sha256_base=t["sha256_base"],
            sha256=t["sha256"],
        )


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
            "tensors": {k: t.to_json() for k, t in self.tensors.items()},
            "applied": [a.to_json() for a in self.applied],
        }

    def write(self, folder: Path) -> None:
        text = json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"
        (folder / CHECKPOINT_RECORD).write_text(text)


def provided_ids(patch: Patch) -> dict[str, range]:
    """Patch ids an applied ``patch`` satisfies as lineage: itself, and each patch stacked into it
    (with the range of its deltas). See :func:`rompatch.stack.stack_patches`."""
    out = {patch.id: range(len(patch.deltas))}
    for comp_id, rng in stacked_components(patch):
        out.setdefault(comp_id, rng)
    return out


def undo_key(param: str) -> str:
    """The undo data's name for ``param``'s original bytes."""
    return f"base.{param}"


def delta_key(patch_id: str, j: int, x: str) -> str:
    """The undo data's name for factor ``x`` (``u`` or ``v``) of delta ``j`` of an applied patch."""
    return f"patch.{patch_id}.deltas.{j}.{x}"


def read_record(folder: Path) -> Record | None:
    """The record of the checkpoint in ``folder``, or None when it has none; raises CheckpointError
    when the record or its undo data is corrupt, truncated or from a newer rompatch."""
    rpath = folder / CHECKPOINT_RECORD
    if not rpath.is_file():
        return None
    raw, tensors = _parse_record(rpath)
    undo = _check_undo_file(folder, raw["undo"])
    entries, _ = read_header(undo)
    undo_entries = {e.key: e for e in entries}
    applied = [_rebuild_applied(i, a, undo, undo_entries, str(rpath)) for i, a in enumerate(raw["applied"])]
    return Record(
        base=dict(raw.get("base", {})),
        tensors=tensors,
        applied=applied,
        undo_bytes=int(raw["undo"].get("bytes", 0)),
    )


def _parse_record(rpath: Path) -> tuple[dict[str, Any], dict[str, TrackedTensor]]:
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
        tensors = {k: TrackedTensor.from_json(t) for k, t in raw["tensors"].items()}
        for key in ("undo", "applied"):
            if key not in raw:
                raise KeyError(key)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: not a valid rompatch record ({e}); the file is corrupt") from None
    return raw, tensors


def _check_undo_file(folder: Path, undo: dict[str, Any]) -> Path:
    upath = folder / CHECKPOINT_UNDO
    if not upath.is_file():
        raise CheckpointError(
            f"{folder}: {CHECKPOINT_RECORD} is present but its undo data {CHECKPOINT_UNDO} is missing; the "
            "folder was copied incompletely"
        )
    if upath.stat().st_size != int(undo.get("bytes", -1)):
        raise CheckpointError(
            f"{upath}: size differs from the one in {CHECKPOINT_RECORD}; the undo data is truncated or from "
            "another checkpoint"
        )
    return upath


def _rebuild_applied(
    i: int, a: dict[str, Any], upath: Path, undo_entries: dict[str, TensorEntry], where: str
) -> AppliedEntry:
    """Applied entry ``i`` of the record, its patch rebuilt from the metadata and the undo data."""
    try:
        pid = a["patch_id"]
        meta = a["patch"]
        n = len(json.loads(meta["deltas"]))
        tensors: dict[str, torch.Tensor] = {}
        for j in range(n):
            for x in ("u", "v", "k"):
                if x == "k" and delta_key(pid, j, x) not in undo_entries:
                    continue  # a delta without a key (format 1.1, extracted)
                e = undo_entries[delta_key(pid, j, x)]
                tensors[f"deltas.{j}.{x}"] = to_tensor(read_range(upath, e.offset, e.nbytes), e)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{where}: applied patch {i} cannot be rebuilt from {CHECKPOINT_UNDO} (missing {e}); the undo "
            "data is corrupt"
        ) from None
    try:
        patch = from_safetensors(meta, tensors, where=f"{where} applied[{i}]")
    except PatchFormatError as e:
        raise CheckpointError(f"{e}; the record is corrupt") from None
    if patch.id != pid:
        raise CheckpointError(f"{where}: applied patch {i} has id {patch.short_id}, recorded {pid[:12]}")
    return AppliedEntry(
        patch=patch,
        forced=bool(a.get("forced")),
        forced_reasons=list(a.get("forced_reasons", [])),
        applied_at=a.get("applied_at"),
        source=a.get("source"),
        fingerprints={k: dict(v) for k, v in a.get("fingerprints", {}).items()},
    )
