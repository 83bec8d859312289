"""Writing a checkpoint with a given patch stack: the touched tensors' new values and fingerprints,
the undo data and the record (what ``apply`` and ``revert`` share).

A touched tensor is always ``cast(original + Σ deltas of the applied patches in order)``
(:mod:`rompatch.numerics`), so a checkpoint patched on disk is bit-identical to the same patches
applied in memory to the model loaded from the base.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..apply import refuse_mismatch
from ..constants import CHECKPOINT_UNDO
from ..numerics import chained, factors_on, whole
from ..patch import Patch
from ..safetensors_io import SafetensorsWriter, tensor_bytes
from .reader import Checkpoint
from .record import UNDO_FORMAT, AppliedEntry, Record, TrackedTensor, delta_key, undo_key
from .writer import Producer, ShardCopier, WriteStats, write_folder

log = logging.getLogger(__name__)

Prints = dict[int, dict[str, str]]  # applied index -> {"before": sha256, "after": sha256}


def chain(
    original: torch.Tensor, applied: Sequence[AppliedEntry], name: str, original_sha: str | None
) -> tuple[torch.Tensor, Prints, str]:
    """Final value of ``name``, the sha256 before and after each applied entry touching it, and the
    sha256 of ``original`` (hashed here when ``original_sha`` is None).

    The value is :func:`rompatch.numerics.chained` (bit-identical to the in-memory apply); its row
    blocks are hashed in a worker thread (hashlib releases the GIL) while the next block is computed.
    """
    steps = [(k, factors_on(name, [whole(a.patch)])) for k, a in enumerate(applied)]
    steps = [(k, fs, hashlib.sha256()) for k, fs in steps if fs]
    orig_h = hashlib.sha256() if original_sha is None else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rompatch-sha") as hashing:

        def on_block(r: int, n: int, blks: list[torch.Tensor]) -> None:
            if orig_h is not None:
                hashing.submit(orig_h.update, tensor_bytes(original[r : r + n]))
            for (_, _, h), blk in zip(steps, blks):
                hashing.submit(h.update, tensor_bytes(blk))

        if steps:
            out = chained(original, [fs for _, fs, _ in steps], on_block)
        elif orig_h is not None:
            orig_h.update(tensor_bytes(original))
    if not steps:
        return original, {}, original_sha or orig_h.hexdigest()  # type: ignore[union-attr]
    before = original_sha or orig_h.hexdigest()  # type: ignore[union-attr]
    prints: Prints = {}
    for k, _, h in steps:
        prints[k] = {"before": before, "after": h.hexdigest()}
        before = prints[k]["after"]
    return out, prints, prints[steps[0][0]]["before"]


def fingerprint_mismatch(ckpt: Checkpoint, patch: Patch, name: str, actual: str, force: bool) -> bool:
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
    refuse_mismatch(
        f"base fingerprint mismatch on '{name}': patch {patch.short_id} expects sha256 {info.sha256}, "
        f"{ckpt.path} has {actual}{hint}",
        ", or pass --force (force=True) to apply anyway",
        parameter=name,
        expected=info.sha256,
        found=actual,
        force=force,
        logger=log,
    )
    return True


@dataclass
class StackWrite:
    """Write ``ckpt`` with ``applied`` as its patch stack, recomputing the ``changed`` tensors.

    ``originals``: values of untracked tensors the caller already read. ``pending``: fingerprint checks
    (tensor -> applied index, patch) done here, on the hash computed with the new value; a mismatch
    raises (nothing is committed) or, with ``force``, marks that entry forced.
    """

    ckpt: Checkpoint
    rec: Record
    applied: list[AppliedEntry]
    changed: Sequence[str]
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: Mapping[str, tuple[int, Patch]] = field(default_factory=dict)
    force: bool = False

    def __post_init__(self) -> None:
        self.still = sorted({n for a in self.applied for n in a.patch.parameters})
        self.tensors = {name: self._tracked(name) for name in self.still}
        self.fingerprints = [dict(a.fingerprints) for a in self.applied]
        for prints in self.fingerprints:  # parameters whose chain changes get fresh fingerprints
            for n in self.changed:
                prints.pop(n, None)
        self.undo: SafetensorsWriter | None = None

    def _tracked(self, name: str) -> TrackedTensor:
        e = self.ckpt.entry(name)
        old = self.rec.tensors.get(name)
        return TrackedTensor(
            key=e.key,
            file=e.file,
            dtype=e.dtype_name,
            shape=e.shape,
            sha256_base=old.sha256_base if old else "",
            sha256=old.sha256 if old else "",
        )

    def write(self, dest: Path, copier: ShardCopier, *, link: bool) -> tuple[WriteStats, int]:
        """Write into the staging folder ``dest``; returns the write stats and the undo data's size."""
        if self.applied:
            self.undo = SafetensorsWriter(
                dest / CHECKPOINT_UNDO, self._undo_specs(), {"format": UNDO_FORMAT, "format_version": "1"}
            )
        try:
            stats = write_folder(
                self.ckpt, dest, {n: self._producer(n) for n in self.changed}, copier, link=link
            )
            if self.undo is None:
                return stats, 0
            self._write_carried_undo()
        finally:
            undo_bytes = self.undo.close() if self.undo is not None else 0
        for a, prints in zip(self.applied, self.fingerprints):
            a.fingerprints = {n: prints[n] for n in a.patch.parameters if n in prints}
        Record(base=self.rec.base, tensors=self.tensors, applied=self.applied, undo_bytes=undo_bytes).write(
            dest
        )
        return stats, undo_bytes

    def _undo_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        specs = [(undo_key(n), self.ckpt.entry(n).dtype, self.ckpt.entry(n).shape) for n in self.still]
        for a in self.applied:
            for j, d in enumerate(a.patch.deltas):
                specs += [
                    (delta_key(a.patch.id, j, x), "F32", tuple(t.shape)) for x, t in d.vectors().items()
                ]
        return specs

    def _write_carried_undo(self) -> None:
        """The undo data of tensors not recomputed (from the input's) and every applied patch's vectors."""
        assert self.undo is not None
        for name in sorted(set(self.still) - set(self.changed)):
            self.undo.write(undo_key(name), self.ckpt.undo_tensor(undo_key(name)))
        for a in self.applied:
            for j, d in enumerate(a.patch.deltas):
                for x, t in d.vectors().items():
                    self.undo.write(delta_key(a.patch.id, j, x), tensor_bytes(t))

    def _original(self, name: str) -> torch.Tensor:
        if name in self.originals:
            return self.originals.pop(name)
        return self.ckpt.original(name)

    def _producer(self, name: str) -> Producer:
        return lambda: self._value(name)

    def _value(self, name: str) -> torch.Tensor:
        orig = self._original(name)
        if name not in self.tensors:  # no patch touches it any more: back to the original bytes
            return orig
        t = self.tensors[name]
        value, prints, t.sha256_base = chain(orig, self.applied, name, t.sha256_base or None)
        if name in self.pending:
            self._check_pending(name, t.sha256_base)
        self.undo.write(undo_key(name), tensor_bytes(orig))  # type: ignore[union-attr]
        for k, fp in prints.items():
            self.fingerprints[k][name] = fp
        t.sha256 = prints[max(prints)]["after"]
        return value

    def _check_pending(self, name: str, actual: str) -> None:
        k, patch = self.pending[name]
        if fingerprint_mismatch(self.ckpt, patch, name, actual, self.force):
            self.applied[k].forced = True
            if "fingerprint" not in self.applied[k].forced_reasons:
                self.applied[k].forced_reasons.append("fingerprint")
