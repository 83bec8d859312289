"""Resolve patch references: ``Patch`` objects, local files, Hub references, and sequences of them.

Every public function that takes patches goes through :func:`resolve_patches` (or, where it needs
each item's own spelling, :func:`flatten_patches` then :func:`resolve_patch`), so all of them take
the same things:

- a ``Patch``;
- a local file, as ``str`` or ``os.PathLike``;
- a Hub reference ``REPO_ID[/path.safetensors][@REV]`` (resolved by ``rompatch.hub.pull``);
- a sequence of these, possibly nested one level, such as the ``list[Patch]`` that
  ``create_patches`` returns: ``[chain, "extra.safetensors"]`` is fine.

A reference that can only be a local path is never sent to the Hub (see :func:`is_local_path`), so
a missing file is reported as a missing file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import NotAppliedError, PatchFormatError
from .hub.pull import resolve_hub_patch
from .hub.transfer import is_local_patch_ref
from .patch import Patch, load_patch

PatchLike = Patch | str | os.PathLike
PatchesLike = PatchLike | Iterable[PatchLike | Iterable[PatchLike]]

_PATCH_SUFFIX = ".safetensors"
_ID_PREFIX = re.compile(r"[0-9a-f]{4,64}")


def is_single_patch(x: object) -> bool:
    """Whether ``x`` names one patch (as opposed to a sequence of them)."""
    return isinstance(x, (Patch, str, os.PathLike))


def _not_patches(x: object) -> PatchFormatError:
    return PatchFormatError(
        f"patches must be a Patch, a path, a Hub reference or a list of them, not {type(x).__name__}; "
        "pass e.g. 'edit.safetensors', [patch, 'alice/edits/x.safetensors'] or create_patch's list"
    )


def _items(x: object) -> list:
    if isinstance(x, (bytes, bytearray, Mapping)) or not isinstance(x, Iterable):
        raise _not_patches(x)
    return list(x)


def flatten_patches(patches: PatchesLike) -> list[PatchLike]:
    """``patches`` as a flat list of single references (nothing is loaded).

    One ``Patch``/path/reference gives a list of one; a sequence may hold sequences one level deep
    (a ``create_patch`` chain inside a list). Anything else is a one-line ``PatchFormatError``.
    """
    if is_single_patch(patches):
        return [patches]  # type: ignore[list-item]
    out: list[PatchLike] = []
    for item in _items(patches):
        inner = [item] if is_single_patch(item) else _items(item)
        for x in inner:
            if not is_single_patch(x):
                raise _not_patches(x)
            out.append(x)
    return out


def resolve_patch(ref: PatchLike, *, revision: str | None = None) -> Patch:
    """Load one patch from a ``Patch``, a local path or a Hub reference (see the module docstring).

    ``revision`` applies to a Hub reference without ``@REV``.
    """
    if isinstance(ref, Patch):
        return ref
    if is_local_patch_ref(ref):
        return load_patch(Path(ref).expanduser())
    return resolve_hub_patch(str(ref), revision=revision)


def resolve_patches(patches: PatchesLike, *, revision: str | None = None) -> list[Patch]:
    """Every patch ``patches`` names, loaded, in order (see the module docstring for the forms).

    All of them are resolved before this returns, so a bad reference fails before any work is done.
    """
    return [resolve_patch(p, revision=revision) for p in flatten_patches(patches)]


def patch_id_prefix(ref: PatchLike) -> str | None:
    """The patch id (prefix) that ``ref`` spells, or ``None`` when ``ref`` is a patch to load.

    An id is a ``str`` of 4 to 64 hex digits that is not an existing file. Nothing else can be
    mistaken for one: patch files end in ``.safetensors`` and Hub references hold a ``/``.
    """
    if isinstance(ref, str) and _ID_PREFIX.fullmatch(ref.lower()) and not os.path.exists(ref):
        return ref.lower()
    return None


def find_applied(applied: Sequence[Patch], ref: PatchLike, *, where: str) -> tuple[int | None, str]:
    """``(index in applied or None, id)`` of the patch ``ref`` names, for reverting it.

    ``ref``: a patch id prefix (see :func:`patch_id_prefix`) or anything :func:`resolve_patch`
    takes. A prefix matching several patches, and a string that is neither an id, a path nor a Hub
    reference, are one-line ``NotAppliedError`` s.
    """
    pid = patch_id_prefix(ref)
    if pid is not None:
        hits = [k for k, p in enumerate(applied) if p.id.startswith(pid)]
        if len(hits) > 1:
            raise NotAppliedError(f"patch id {ref} is ambiguous in {where}; give more characters")
        return (hits[0] if hits else None), pid
    if isinstance(ref, str) and "/" not in ref and not is_local_patch_ref(ref):
        raise NotAppliedError(
            f"{ref}: no such patch file, and not a patch id (4 to 64 hex digits) or a Hub reference "
            f"(USER/REPO[/file.safetensors]); the patches applied to {where} have ids "
            f"{', '.join(p.short_id for p in applied) or '(none)'}"
        )
    pid = resolve_patch(ref).id
    return next((k for k, p in enumerate(applied) if p.id == pid), None), pid
