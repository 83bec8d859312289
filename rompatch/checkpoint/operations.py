"""Patches on checkpoints on disk: apply, revert and log without loading the model.

``apply`` and ``revert`` check everything first (shapes, lineage, base fingerprints), then write the
output folder through a staging folder renamed into place (:func:`rompatch.checkpoint.writer.staged_output`):
everything is written and fsynced in ``.<name>.rompatch-tmp.<owner>.<rand>`` next to the output, and
replacing an existing folder swaps the two atomically (``renameat2(RENAME_EXCHANGE)`` on Linux, two
renames elsewhere). A crash leaves the previous state; what it leaves behind names its owner (host,
pid, start time) and is removed by the next run on that output (:func:`rompatch.atomic.clean_stale`).

- :mod:`.reader` opens a folder (or a Hub id) and reads tensors by byte range;
- :mod:`.writer` writes the output folder (rewritten shards, hard links, copies);
- :mod:`.record` is ``rompatch.json`` and the undo data that make ``revert`` exact;
- :mod:`.rewrite` recomputes touched tensors as ``cast(original + Σ deltas)``
  (:mod:`rompatch.numerics`), bit-identical to the in-memory apply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..atomic import clean_stale
from ..errors import BaseMismatchError, CheckpointError, LineageError, NotAppliedError, PatchFormatError
from ..fingerprint import tensor_sha256
from ..models import embedded_alias
from ..numerics import apply_deltas, factors_on, remove_deltas, whole
from ..patch import Patch
from ..refs import PatchesLike, PatchLike, find_applied, flatten_patches, resolve_patch
from ..signing import TrustedKeys, require_signed
from .reader import Checkpoint, open_checkpoint
from .record import AppliedEntry, Record, provided_ids
from .rewrite import StackWrite, fingerprint_mismatch
from .writer import Producer, WriteStats, staged_copy, write_folder

log = logging.getLogger(__name__)


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


# -------------------------------------------------------------------------------------- apply


def apply_to_checkpoint(
    base: str | os.PathLike,
    patches: PatchesLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    force: bool = False,
    link: bool = True,
    revision: str | None = None,
    require_signature: TrustedKeys | None = None,
) -> CheckpointResult:
    """Apply ``patches`` in order to the checkpoint ``base``, writing folder ``out``.

    ``base``: a local model folder, an embedded alias or a Hub id (see ``open_checkpoint``).
    ``patches``: patch files, ``Patch`` objects or Hub references, one or a sequence (nested one
    level, such as a ``create_patch`` chain; see ``rompatch.refs``); all are resolved before the
    checkpoint is opened.

    The model is never loaded; only shards holding touched tensors are rewritten (see
    :mod:`rompatch.checkpoint.writer`). Each touched tensor's sha256 must equal the patch's recorded
    fingerprint, and a patch's lineage must already be applied (``base`` may itself be a
    rompatch-written checkpoint: the chain continues); ``force=True`` applies anyway and records that
    it did. Nothing is written until every check has passed, and ``out`` appears in one rename.

    ``require_signature``: trusted public keys (key files or ``PublicKey`` objects, see
    ``rompatch.signing.trusted_keys``); every patch must carry a good signature by one of them
    (``rompatch.signing.require_signed``, checked before the checkpoint is opened; ``force`` does not
    override it), else a ``SignatureError``.
    """
    resolved = [_resolve(p) for p in flatten_patches(patches)]
    if not resolved:
        raise PatchFormatError("no patches given; pass at least one patch file")
    if require_signature is not None:
        require_signed([p for p, _ in resolved], require_signature)
    clean_stale(out)  # a killed run's leftovers (and an OUT it had moved aside) first
    ckpt = open_checkpoint(base, revision=revision)
    rec = _state(ckpt)
    changed = sorted({n for p, _ in resolved for n in p.parameters})
    # The copies of the shards to rewrite start now, in the background, while the checks run; if a
    # check fails, the staging folder (and the copies) are removed. Unknown tensors are refused first.
    with staged_copy(ckpt, out, changed, overwrite=overwrite) as (tmp, cp):
        checks = _ApplyChecks(ckpt, rec, force=force)
        for patch, source in resolved:
            checks.add(patch, source)
        write = StackWrite(
            ckpt,
            rec,
            checks.applied,
            changed,
            originals=checks.originals,
            pending=checks.pending,
            force=force,
        )
        stats, undo_bytes = write.write(tmp, cp, link=link)
    forced_ids = [a.patch.id for a in checks.applied[len(rec.applied) :] if a.forced]
    log.info("applied %d patch(es) to %s -> %s", len(resolved), ckpt.path, out)
    return CheckpointResult(
        path=Path(os.path.abspath(out)),
        applied=[a.patch.id for a in checks.applied],
        touched=changed,
        stats=stats,
        undo_bytes=undo_bytes,
        forced=forced_ids,
    )


class _ApplyChecks:
    """Lineage and fingerprint checks, in application order (:meth:`add` each patch).

    Builds the new applied list, the originals of newly touched tensors, and the fingerprint checks
    left to do on those: a tensor no patch touched yet is hashed while its new value is computed
    (:class:`rompatch.checkpoint.rewrite.StackWrite` finishes them).
    """

    def __init__(self, ckpt: Checkpoint, rec: Record, *, force: bool):
        self.ckpt, self.rec, self.force = ckpt, rec, force
        self.applied = list(rec.applied)
        self.originals: dict[str, torch.Tensor] = {}  # params newly tracked by this run: their value now
        self.pending: dict[str, tuple[int, Patch]] = {}
        self.tracked = set(rec.tensors)

    def add(self, patch: Patch, source: str | None) -> None:
        provided = _provided(self.applied)
        self._refuse_reapply(patch, provided)
        reasons = self._lineage(patch, provided)
        lineage_parts = [
            (self.applied[k].patch, rng)
            for pid, (k, rng) in sorted(provided.items(), key=lambda x: x[1][0])
            if pid in patch.lineage
        ]
        for name in patch.parameters:
            if self._tensor(patch, name, lineage_parts) and "fingerprint" not in reasons:
                reasons.append("fingerprint")
        self.applied.append(
            AppliedEntry(
                patch, forced=bool(reasons), forced_reasons=reasons, applied_at=_now(), source=source
            )
        )

    def _original(self, name: str) -> torch.Tensor:
        if name in self.rec.tensors:
            return self.ckpt.original(name)
        if name not in self.originals:
            self.originals[name] = self.ckpt.read(name)
        return self.originals[name]

    def _refuse_reapply(self, patch: Patch, provided: dict[str, tuple[int, range]]) -> None:
        if patch.id in provided:
            k, _ = provided[patch.id]
            host = self.applied[k].patch
            how = "" if host.id == patch.id else f" (as part of stacked patch {host.short_id})"
            raise LineageError(f"patch {patch.short_id} is already applied to {self.ckpt.path}{how}")

    def _lineage(self, patch: Patch, provided: dict[str, tuple[int, range]]) -> list[str]:
        """``["lineage"]`` when forced past missing lineage, else ``[]``; raises without force."""
        missing = [pid for pid in patch.lineage if pid not in provided]
        if not missing:
            return []
        msg = (
            f"patch {patch.short_id} was computed on top of {', '.join(m[:12] for m in missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not applied to {self.ckpt.path}; apply "
            f"{'that patch' if len(missing) == 1 else 'those patches'} first (or --force)"
        )
        if not self.force:
            raise LineageError(msg)
        log.warning("%s; applying anyway (force)", msg)
        return ["lineage"]

    def _tensor(self, patch: Patch, name: str, lineage_parts: list[tuple[Patch, range]]) -> bool:
        """Check ``name``'s shape and dtype; True when its fingerprint mismatches (forced)."""
        info = patch.parameters[name]
        e = self.ckpt.entry(name)
        if e.shape != tuple(info.shape):
            raise BaseMismatchError(
                f"'{name}' has shape {list(e.shape)} in {self.ckpt.path} but {list(info.shape)} in patch "
                f"{patch.short_id}; the patch is for a different model"
            )
        _ = e.torch_dtype  # refuses non-float storage
        mismatch = False
        if name in self.tracked:
            actual = tensor_sha256(apply_deltas(self._original(name), factors_on(name, lineage_parts)))
            mismatch = fingerprint_mismatch(self.ckpt, patch, name, actual, self.force)
        else:
            self._original(name)
            self.pending[name] = (len(self.applied), patch)
        self.tracked.add(name)
        return mismatch


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
    _check_revert_output(checkpoint, out, in_place)
    clean_stale(checkpoint if in_place else out)  # a killed run's leftovers first
    refs = flatten_patches(patches)
    ckpt = open_checkpoint(checkpoint)
    if in_place:
        out = ckpt.path
        overwrite = True
    assert out is not None
    if ckpt.record is None:
        if all:
            raise NotAppliedError(f"{ckpt.path} has no rompatch record; name the patches to subtract")
        return _revert_foreign(
            ckpt, [resolve_patch(p) for p in refs], out, overwrite=overwrite, force=force, link=link
        )
    rec = _state(ckpt, allow_modified=force)
    targets = _revert_targets(rec, refs, ckpt.path, all_=all)
    removed = [rec.applied[k] for k in targets]
    remaining = [a for k, a in enumerate(rec.applied) if k not in targets]
    _check_dependants(removed, remaining, force=force)
    changed = sorted({n for a in removed for n in a.patch.parameters})
    if force:
        changed = sorted(set(changed) | set(ckpt.verify_record()))
    with staged_copy(ckpt, out, changed, overwrite=overwrite) as (tmp, cp):
        stats, undo_bytes = StackWrite(ckpt, rec, remaining, changed).write(tmp, cp, link=link)
    log.info("reverted %d patch(es) from %s -> %s", len(removed), ckpt.path, out)
    return CheckpointResult(
        path=Path(os.path.abspath(out)),
        applied=[a.patch.id for a in remaining],
        touched=changed,
        stats=stats,
        undo_bytes=undo_bytes,
        reverted=[a.patch.id for a in removed],
    )


def _check_revert_output(
    checkpoint: str | os.PathLike, out: str | os.PathLike | None, in_place: bool
) -> None:
    if (out is None) == (not in_place):
        raise CheckpointError("pass exactly one of out=... (-o OUT) or in_place=True (--in-place)")
    if in_place and (embedded_alias(checkpoint) or not Path(checkpoint).expanduser().is_dir()):
        raise CheckpointError(
            f"{checkpoint}: --in-place needs a local folder (not a Hub id or an embedded model); write to "
            "-o OUT instead"
        )


def _revert_targets(rec: Record, refs: Sequence[PatchLike], where: Path, *, all_: bool) -> list[int]:
    """Positions in ``rec.applied`` of the patches to revert."""
    if all_:
        return list(range(len(rec.applied)))
    if not refs:
        raise NotAppliedError("no patches given; name the patches to revert (file or id), or pass --all")
    return sorted({_find_applied(rec, p, where) for p in refs})


def _check_dependants(
    removed: Sequence[AppliedEntry], remaining: Sequence[AppliedEntry], *, force: bool
) -> None:
    """Refuse (unless ``force``) to revert a patch that a remaining one was computed on top of."""
    removed_ids = {pid for a in removed for pid in provided_ids(a.patch)}
    still_provided = {pid for a in remaining for pid in provided_ids(a.patch)}
    for a in remaining:
        deps = [pid for pid in a.patch.lineage if pid in removed_ids and pid not in still_provided]
        if deps and not force:
            raise LineageError(
                f"patch {deps[0][:12]} cannot be reverted while {a.patch.short_id} (computed on top of it) is "
                "applied; revert that too (or --force)"
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
    for name in names:
        _check_foreign(ckpt, patches, name, force=force)
    residuals: dict[str, dict[str, Any]] = {}

    def producer(name: str) -> Producer:
        return lambda: _subtracted(ckpt, patches, name, residuals)

    with staged_copy(ckpt, out, names, overwrite=overwrite) as (tmp, cp):
        stats = write_folder(ckpt, tmp, {n: producer(n) for n in names}, cp, link=link)
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


def _check_foreign(ckpt: Checkpoint, patches: Sequence[Patch], name: str, *, force: bool) -> None:
    """``name`` has the patches' shape and (unless ``force``) does not already hold their base value."""
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


def _subtracted(
    ckpt: Checkpoint, patches: Sequence[Patch], name: str, residuals: dict[str, dict[str, Any]]
) -> torch.Tensor:
    """``name`` with the patches' deltas subtracted (newest first); its residual goes into ``residuals``."""
    value, exact = remove_deltas(ckpt.read(name), factors_on(name, [whole(p) for p in patches]))
    first = next(p for p in patches if name in p.parameters)
    residuals[name] = {
        "max_abs_residual": float((value.to(torch.float32) - exact).abs().max()),
        "restored_base_fingerprint": tensor_sha256(value) == first.parameters[name].sha256,
    }
    return value


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
    return {
        "path": str(ckpt.path),
        "rompatch": True,
        "base": rec.base,
        "applied": [_log_entry(k, a) for k, a in enumerate(rec.applied)],
        "tensors": {k: v["sha256"] for k, v in rec.to_json()["tensors"].items()},
        "undo_bytes": rec.undo_bytes,
        "modified": ckpt.verify_record() if verify else [],
    }


def _log_entry(k: int, a: AppliedEntry) -> dict[str, Any]:
    return {
        "index": k,
        "id": a.patch.id,
        "forced": a.forced,
        "forced_reasons": a.forced_reasons,
        "applied_at": a.applied_at,
        "source": a.source,
        "lineage": a.patch.lineage,
        "merged_from": a.patch.merged_from(),
        "patch_base": a.patch.base,
        "fingerprints": a.fingerprints,
        "edits": a.patch.summary()["edits"],
    }


__all__ = [
    "AppliedEntry",
    "Checkpoint",
    "CheckpointResult",
    "Record",
    "apply_to_checkpoint",
    "checkpoint_log",
    "open_checkpoint",
    "revert_checkpoint",
]
