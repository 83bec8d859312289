"""In-memory apply/revert of patches on a live model, with exact undo.

Invariant: a touched parameter always equals ``cast(snapshot.float() + Σ Δ of the applied patches,
in application order)``, where ``snapshot`` is its value before any rompatch patch touched it.
Deltas accumulate in float32 and are cast to the parameter's dtype once. So:
- reverting every patch restores the snapshot bit for bit (it is copied back, not subtracted);
- reverting a patch from the middle of a stack gives exactly what applying only the others gives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import BaseMismatchError, FingerprintMismatchError, LineageError, NotAppliedError
from .fingerprint import dtype_name, tensor_sha256
from .models import applied_on_disk
from .numerics import apply_deltas, factors_on, whole
from .patch import Patch
from .placement import param_value, write_param
from .refs import PatchesLike, PatchLike, find_applied, flatten_patches, is_single_patch, resolve_patches

log = logging.getLogger(__name__)
_STATE_ATTR = "_rompatch_state"


@dataclass
class AppliedPatch:
    patch: Patch
    forced: bool = False


@dataclass
class _State:
    snapshots: dict[str, torch.Tensor] = field(default_factory=dict)  # param -> pre-patch copy (CPU)
    applied: list[AppliedPatch] = field(default_factory=list)


def _state(model: nn.Module) -> _State:
    st = getattr(model, _STATE_ATTR, None)
    if st is None:
        st = _State()
        object.__setattr__(model, _STATE_ATTR, st)  # plain attribute, not a submodule/buffer
    return st


def applied_patches(model: nn.Module) -> list[Patch]:
    """The patches applied to ``model`` in memory, in order."""
    return [a.patch for a in _state(model).applied]


def _param(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise BaseMismatchError(
            f"the patch edits '{name}', which this model does not have; it was made for another architecture"
        ) from None


def _expected_value(st: _State, name: str, patches: Sequence[Patch], dtype: torch.dtype) -> torch.Tensor:
    """cast(snapshot + Σ deltas on ``name`` from ``patches``), accumulated in float32 (on CPU)."""
    return apply_deltas(st.snapshots[name], factors_on(name, [whole(p) for p in patches]), dtype)


def refuse_mismatch(
    message: str,
    fix: str,
    *,
    parameter: str,
    expected: str,
    found: str,
    force: bool,
    logger: logging.Logger = log,
) -> None:
    """A base fingerprint mismatch: raise ``FingerprintMismatchError`` (``message`` + ``fix``), or with
    ``force`` log a warning and go on."""
    if not force:
        raise FingerprintMismatchError(message + fix, parameter=parameter, expected=expected, found=found)
    logger.warning("%s; applying anyway (force)", message)


def apply_patch(
    model: nn.Module, patch: PatchesLike, *, force: bool = False
) -> AppliedPatch | list[AppliedPatch]:
    """Apply ``patch`` to ``model`` in place. Checks shapes, lineage and base fingerprints first.

    ``patch``: a ``Patch``, a patch file, a Hub reference ``REPO_ID[/file.safetensors][@REV]``, or a
    sequence of them applied in order (such as the list ``create_patch(..., mode="sequential")``
    returns; see ``rompatch.refs``). Every reference is resolved before anything is applied, and a
    sequence is all or nothing: when one patch fails, the ones this call applied are reverted.
    Returns the ``AppliedPatch`` record, or the list of records when a sequence was given.

    A patch computed on top of others (non-empty lineage) needs those applied first. Each touched
    parameter must hash to the sha256 recorded in the patch (the value it was computed against);
    ``force=True`` applies anyway, logs a warning and records that it did.
    """
    patches = resolve_patches(patch)
    records: list[AppliedPatch] = []
    try:
        for p in patches:
            records.append(_apply_one(model, p, force=force))
    except BaseException:
        revert_patch(model, [r.patch for r in records])
        raise
    return records[0] if is_single_patch(patch) else records


def _apply_one(model: nn.Module, patch: Patch, *, force: bool) -> AppliedPatch:
    st = _state(model)
    if any(a.patch.id == patch.id for a in st.applied):
        raise LineageError(f"patch {patch.short_id} is already applied to this model")
    applied_ids = applied_on_disk(model) + [a.patch.id for a in st.applied]
    missing = [pid for pid in patch.lineage if pid not in applied_ids]
    if missing and not force:
        raise LineageError(
            f"patch {patch.short_id} was computed on top of {', '.join(m[:12] for m in missing)}; apply "
            "that patch first (or pass force=True)"
        )
    lineage_patches = [a.patch for a in st.applied if a.patch.id in patch.lineage]

    params = {name: _param(model, name) for name in patch.parameters}
    for name, info in patch.parameters.items():
        p = params[name]
        if tuple(p.shape) != tuple(info.shape):
            raise BaseMismatchError(
                f"'{name}' has shape {list(p.shape)} in this model but {list(info.shape)} in the patch; "
                "the patch is for a different model"
            )
    # Fingerprints: compare with the value the patch was computed against.
    for name, info in patch.parameters.items():
        p = params[name]
        if name in st.snapshots:
            actual = tensor_sha256(_expected_value(st, name, lineage_patches, p.dtype))
        else:
            actual = tensor_sha256(param_value(model, name))
        if actual != info.sha256:
            refuse_mismatch(
                f"base fingerprint mismatch on '{name}': patch expects sha256 {info.sha256[:16]}… "
                f"({info.dtype}), model has {actual[:16]}… ({dtype_name(p.dtype)})",
                "; use the patch's base model, or force=True to apply anyway",
                parameter=name,
                expected=info.sha256,
                found=actual,
                force=force,
            )

    record = AppliedPatch(patch=patch, forced=force)
    for name in params:
        if name not in st.snapshots:
            st.snapshots[name] = param_value(model, name).detach().to("cpu", copy=True)
    st.applied.append(record)
    for name, p in params.items():
        _rewrite(model, st, name, p)
    log.info(
        "applied patch %s (%d deltas)%s", patch.short_id, len(patch.deltas), " [forced]" if force else ""
    )
    return record


def _rewrite(model: nn.Module, st: _State, name: str, p: nn.Parameter) -> None:
    # write_param: in place on the parameter's device, or into accelerate's offload map
    write_param(model, name, _expected_value(st, name, [a.patch for a in st.applied], p.dtype))


def revert_patch(model: nn.Module, patch: PatchesLike) -> None:
    """Remove patches from ``model``. Any position in the stack may be reverted.

    ``patch``: anything ``apply_patch`` takes, or the id (prefix) of an applied patch, as
    ``applied_patches`` or ``rompatch log`` show it; sequences may mix them. A ``str`` of 4 to 64
    hex digits that is not an existing file is an id (patch files end in ``.safetensors`` and Hub
    references hold a ``/``, so neither is ever taken for one). Everything is checked before
    anything is reverted: each patch must be applied, and no patch that stays applied may have been
    computed on top of one being reverted. Patches are reverted newest first, so a
    ``create_patch`` chain can be given in its own order.

    Touched parameters are recomputed from their snapshot, so the result is bit-identical to having
    applied only the remaining patches; with nothing left, the snapshot itself is restored.
    """
    st = _state(model)
    targets = sorted({_applied_index(st, ref) for ref in flatten_patches(patch)}, reverse=True)
    leaving = {st.applied[i].patch.id for i in targets}
    for i in targets:
        target = st.applied[i].patch
        dependants = [
            a.patch.short_id
            for a in st.applied[i + 1 :]
            if target.id in a.patch.lineage and a.patch.id not in leaving
        ]
        if dependants:
            raise LineageError(
                f"patch {target.short_id} cannot be reverted while {', '.join(dependants)} (computed on top "
                "of it) is applied; revert that first"
            )
    for i in targets:  # newest first
        _revert_at(model, st, i)


def _applied_index(st: _State, ref: PatchLike) -> int:
    """Position in the stack of the applied patch ``ref`` names (a patch, or an id prefix)."""
    idx, pid = find_applied([a.patch for a in st.applied], ref, where="this model")
    if idx is None:
        applied = ", ".join(a.patch.short_id for a in st.applied) or "none"
        raise NotAppliedError(f"patch {pid[:12]} is not applied to this model (applied: {applied})")
    return idx


def _revert_at(model: nn.Module, st: _State, idx: int) -> None:
    target = st.applied.pop(idx).patch
    for name in target.parameters:
        p = _param(model, name)
        still = any(name in a.patch.parameters for a in st.applied)
        if still:
            _rewrite(model, st, name, p)
        else:
            write_param(model, name, st.snapshots.pop(name))
    log.info("reverted patch %s", target.short_id)


def verify_applied(model: nn.Module, patches: PatchesLike | None = None) -> None:
    """Check every touched parameter still holds the patched value (catches silent reloads).

    With ``patches`` (anything ``apply_patch`` takes), also check that exactly those patches are
    applied, in that order.
    """
    st = _state(model)
    if patches is not None:
        want = [p.id for p in resolve_patches(patches)]
        have = [a.patch.id for a in st.applied]
        if have != want:
            raise NotAppliedError(
                f"the model holds patches [{', '.join(x[:12] for x in have)}] instead of "
                f"[{', '.join(x[:12] for x in want)}]; apply or revert patches until they match"
            )
    for name in st.snapshots:
        p = _param(model, name)
        expected = tensor_sha256(_expected_value(st, name, [a.patch for a in st.applied], p.dtype))
        actual = tensor_sha256(param_value(model, name))
        if actual != expected:
            raise FingerprintMismatchError(
                f"'{name}' no longer holds the patched value (sha256 {actual[:16]}…, expected {expected[:16]}…); "
                "the weights were changed or reloaded after patching",
                parameter=name,
                expected=expected,
                found=actual,
            )


@contextmanager
def patched(model: nn.Module, *patches: PatchesLike, force: bool = False) -> Iterator[nn.Module]:
    """``with patched(model, p1, "p2.safetensors"): ...`` or ``with patched(model, chain): ...``.

    Each argument is anything ``apply_patch`` takes. Applies the patches in order (all or nothing)
    and reverts them all on exit, even on error.
    """
    records = apply_patch(model, [p for arg in patches for p in flatten_patches(arg)], force=force)
    try:
        yield model
    finally:
        revert_patch(model, [r.patch for r in records])
