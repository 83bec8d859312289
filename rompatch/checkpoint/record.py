"""The record of a rompatch-written checkpoint: ``rompatch.json`` and its undo data.

``rompatch.json`` lists the applied patches in order, with sha256 fingerprints of each touched tensor
before and after, and whether they were forced. ``rompatch-undo.st`` (safetensors format) holds the
original bytes of every touched tensor (``base.<param>``) and the applied patches' vectors
(``patch.<id>.deltas.<j>.u|v|k``), so ``revert`` needs neither the base checkpoint nor the patch files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..constants import CHECKPOINT_RECORD, CHECKPOINT_UNDO
from ..errors import CheckpointError, PatchFormatError
from ..patch import ANNOTATION_PREFIX, Patch, extra_json, from_safetensors, to_metadata
from ..safetensors_io import (
    StrictJSONError,
    TensorEntry,
    brief,
    read_header,
    read_range,
    strict_json,
    to_tensor,
)
from ..stack import stacked_components

RECORD_FORMAT = "rompatch-checkpoint"
RECORD_VERSION = "1.0"
UNDO_FORMAT = "rompatch-undo"
RECORD_MAX_BYTES = 256 << 20  # a larger rompatch.json is refused unread (a real one is KBs per patch)
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
            # what rebuilds the patch and its provenance; not other tools' "x-" annotations
            "patch": {
                k: v for k, v in to_metadata(self.patch).items() if not k.startswith(ANNOTATION_PREFIX)
            },
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
    (with the range of its deltas) when its id covers that list (format 1.3 on). See
    :func:`rompatch.stack.stack_patches`."""
    out = {patch.id: range(len(patch.deltas))}
    for comp_id, rng in stacked_components(patch, verified_only=True):
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
    (one line) when the record or its undo data is corrupt, truncated or from a newer rompatch."""
    rpath = folder / CHECKPOINT_RECORD
    if not rpath.is_file():
        return None
    _check_inside(folder, rpath)
    _check_inside(folder, folder / CHECKPOINT_UNDO)
    raw, tensors = _parse_record(rpath)
    undo = _check_undo_file(folder, raw["undo"])
    entries, _ = read_header(undo)
    undo_entries = {e.key: e for e in entries}
    applied = [_rebuild_applied(i, a, undo, undo_entries, str(rpath)) for i, a in enumerate(raw["applied"])]
    return Record(
        base=dict(raw.get("base", {})),
        tensors=tensors,
        applied=applied,
        undo_bytes=raw["undo"]["bytes"],
    )


class _Corrupt(ValueError):
    """What is wrong with a record, in words for "not a valid rompatch record (...)"."""


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _strings(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _string_map(x: Any) -> bool:
    return isinstance(x, dict) and all(isinstance(v, str) for v in x.values())


def _tracked(name: str, t: Any) -> TrackedTensor:
    at = f"tensor {brief(name)}"
    keys = ("key", "file", "dtype", "shape", "sha256_base", "sha256")
    if not isinstance(t, dict) or any(k not in t for k in keys):
        raise _Corrupt(f"{at} must be an object with {', '.join(keys)}")
    for k in ("key", "file", "dtype"):
        if not isinstance(t[k], str):
            raise _Corrupt(f"{at} '{k}' must be a string")
    if not isinstance(t["shape"], list) or not all(_count(s) for s in t["shape"]):
        raise _Corrupt(f"{at} 'shape' must be a list of integers ≥ 0")
    for k in ("sha256_base", "sha256"):
        if not isinstance(t[k], str) or not (t[k] == "" or _HEX64.fullmatch(t[k])):
            raise _Corrupt(f"{at} '{k}' must be 64 lowercase hex characters")
    return TrackedTensor.from_json(t)


def _check_applied(i: int, a: Any) -> None:
    at = f"applied[{i}]"
    if not isinstance(a, dict):
        raise _Corrupt(f"{at} must be an object")
    if not isinstance(a.get("patch_id"), str) or not _HEX64.fullmatch(a["patch_id"]):
        raise _Corrupt(f"{at} 'patch_id' must be 64 lowercase hex characters")
    if not _string_map(a.get("patch")):
        raise _Corrupt(f"{at} 'patch' must map strings to strings (the patch's metadata)")
    if not isinstance(a.get("forced", False), bool):
        raise _Corrupt(f"{at} 'forced' must be true or false")
    if not _strings(a.get("forced_reasons", [])):
        raise _Corrupt(f"{at} 'forced_reasons' must be a list of strings")
    for k in ("applied_at", "source"):
        if a.get(k) is not None and not isinstance(a[k], str):
            raise _Corrupt(f"{at} '{k}' must be a string or null")
    prints = a.get("fingerprints", {})
    if not isinstance(prints, dict) or not all(_string_map(v) for v in prints.values()):
        raise _Corrupt(f"{at} 'fingerprints' must be an object of {{before, after}} sha256 strings")


def _parse_record(rpath: Path) -> tuple[dict[str, Any], dict[str, TrackedTensor]]:
    """The record's JSON, parsed strictly (``strict_json``) and with every field's type checked."""
    where = str(rpath)
    size = rpath.stat().st_size
    if size > RECORD_MAX_BYTES:
        raise CheckpointError(
            f"{where} is {size} bytes, more than the {RECORD_MAX_BYTES >> 20} MiB a record may have; it is "
            "corrupt or not rompatch's: start again from the base checkpoint (rompatch apply BASE PATCHES -o OUT)"
        )
    try:
        raw = strict_json(rpath.read_bytes())
        if not isinstance(raw, dict):
            raise _Corrupt("the record must be a JSON object")
        if raw.get("format") != RECORD_FORMAT:
            raise _Corrupt(f"format is {brief(raw.get('format'))}, expected {RECORD_FORMAT!r}")
        version = raw.get("format_version", "0")
        if not isinstance(version, str) or not re.fullmatch(r"\d{1,6}(\.\d{1,6})?", version):
            raise _Corrupt("'format_version' must be a string 'MAJOR.MINOR'")
        if int(version.split(".")[0]) > int(RECORD_VERSION.split(".")[0]):
            raise CheckpointError(
                f"{where} was written by a newer rompatch (record format {version}); upgrade rompatch "
                "(pip install -U rompatch)"
            )
        for key in ("undo", "applied", "tensors"):
            if key not in raw:
                raise _Corrupt(f"'{key}' is missing")
        if not isinstance(raw.get("base", {}), dict):
            raise _Corrupt("'base' must be an object")
        if not isinstance(raw["undo"], dict):
            raise _Corrupt("'undo' must be an object with the undo data's file and bytes")
        if not _count(raw["undo"].get("bytes")):
            raise _Corrupt("'undo' bytes must be a non-negative integer")
        if not isinstance(raw["tensors"], dict):
            raise _Corrupt("'tensors' must be an object")
        tensors = {k: _tracked(k, t) for k, t in raw["tensors"].items()}
        if not isinstance(raw["applied"], list):
            raise _Corrupt("'applied' must be a list")
        for i, a in enumerate(raw["applied"]):
            _check_applied(i, a)
    except (StrictJSONError, _Corrupt) as e:
        detail = f"it {e}" if isinstance(e, StrictJSONError) else str(e)
        raise CheckpointError(
            f"{where}: not a valid rompatch record ({detail}); the file is corrupt: start again from the base "
            "checkpoint (rompatch apply BASE PATCHES -o OUT)"
        ) from None
    return raw, tensors


def _check_inside(folder: Path, path: Path) -> None:
    """The record and the undo data are the checkpoint's own files: a link out of the folder is refused."""
    from .reader import link_root  # reader imports this module

    if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(link_root(folder)):
        raise CheckpointError(
            f"{path} is a symbolic link out of the checkpoint folder; rompatch reads its record and undo data "
            "only from inside it: replace the link with the file, or start again from the base checkpoint"
        )


def _check_undo_file(folder: Path, undo: dict[str, Any]) -> Path:
    upath = folder / CHECKPOINT_UNDO
    if not upath.is_file():
        raise CheckpointError(
            f"{folder}: {CHECKPOINT_RECORD} is present but its undo data {CHECKPOINT_UNDO} is missing; the "
            "folder was copied incompletely"
        )
    if upath.stat().st_size != undo["bytes"]:
        raise CheckpointError(
            f"{upath}: size differs from the one in {CHECKPOINT_RECORD}; the undo data is truncated or from "
            "another checkpoint"
        )
    return upath


def _rebuild_applied(
    i: int, a: dict[str, Any], upath: Path, undo_entries: dict[str, TensorEntry], where: str
) -> AppliedEntry:
    """Applied entry ``i`` of the record, its patch rebuilt from the metadata and the undo data."""
    pid, meta = a["patch_id"], a["patch"]
    try:
        deltas = extra_json(meta, "deltas", f"{where} applied[{i}]") if "deltas" in meta else None
    except PatchFormatError as e:
        raise CheckpointError(f"{e}; the record is corrupt") from None
    n = len(deltas) if isinstance(deltas, list) else 0  # from_safetensors says what else is wrong
    try:
        tensors: dict[str, torch.Tensor] = {}
        for j in range(n):
            for x in ("u", "v", "k"):
                if x == "k" and delta_key(pid, j, x) not in undo_entries:
                    continue  # a delta without a key (format 1.1, extracted)
                e = undo_entries[delta_key(pid, j, x)]
                tensors[f"deltas.{j}.{x}"] = to_tensor(read_range(upath, e.offset, e.nbytes), e)
    except (KeyError, ValueError, RuntimeError) as e:
        why = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise CheckpointError(
            f"{where}: applied patch {i} cannot be rebuilt from {CHECKPOINT_UNDO} ({why}); the undo data is corrupt"
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
