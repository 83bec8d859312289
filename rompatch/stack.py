"""Stack several patches into one, and find conflicting edits.

A stacked patch holds every delta of its inputs, in order, so applying it is bit-identical to applying
the inputs one after another (deltas accumulate in float32 in the same order). What it records:

- ``base``: the common base model of the inputs (they must all have the same one);
- ``parameters``: for each touched parameter, the fingerprint of the first input that touches it,
  i.e. the value the whole stack is computed against;
- ``lineage`` (the patches that must be applied before the stack): the inputs' lineage ids that are
  not themselves inputs, in order of first mention. Lineage *between* inputs is satisfied inside the
  stack, and is checked: an input must come after every input it was computed on top of;
- ``stacked_from`` (metadata): each input's id and the range of deltas it contributed (flattened
  for stacks of stacks). A checkpoint with the stack applied therefore satisfies the lineage of a
  patch computed on top of any one input, and ``rompatch revert`` explains that an input can only
  be reverted with the whole stack. Since it decides lineage, it is part of the patch id from
  format 1.3; a stack written before 1.3 has it outside its id (unauthenticated), and lineage
  decisions ignore it (``stacked_components(..., verified_only=True)``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BaseMismatchError, ConflictError, LineageError, PatchFormatError
from .patch import STACKED_FROM, ParamInfo, Patch, components, extra_json, new_patch
from .refs import PatchesLike, resolve_patches
from .request import EditRequest

log = logging.getLogger(__name__)


def stacked_components(patch: Patch, *, verified_only: bool = False) -> list[tuple[str, range]]:
    """``(patch id, range of delta indices)`` for every patch stacked into ``patch`` (empty if none).

    ``verified_only``: only when the patch's id covers its ``stacked_from`` (format 1.3 on), as every
    lineage decision asks. A stack written before 1.3 keeps its list outside its id, where anyone
    could have changed it without changing the id: it is kept, shown, and enough for ``merge`` to
    refuse a plain stack, but trusted for nothing. PatchFormatError (one line) when it is malformed.
    """
    if verified_only and not patch.provenance_in_id:
        return []
    if not patch.extra.get(STACKED_FROM):
        return []
    value = extra_json(patch.extra, STACKED_FROM, "patch")
    return components(value, len(patch.deltas), f"metadata '{STACKED_FROM}'", f"patch {patch.short_id}")


def _same_model(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)  # one folder, spelled two ways
    return False


def base_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The base-model fields (model, revision, model_type, dtype) on which two patch bases differ.

    ``model`` strings naming one existing folder are equal; so are different names with the same
    non-null ``revision`` (a commit or content hash identifies the weights).
    """
    out = [k for k in ("model_type", "dtype", "revision") if a.get(k) != b.get(k)]
    if not _same_model(a.get("model"), b.get("model")) and not (a.get("revision") and "revision" not in out):
        out.insert(0, "model")
    return out


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def same_relation(a: EditRequest, b: EditRequest) -> bool:
    """Same relation: equal ``relation_id`` when both have one, else the same prompt template."""
    if a.relation_id and b.relation_id:
        return a.relation_id == b.relation_id
    return _norm(a.prompt) == _norm(b.prompt)


@dataclass(frozen=True)
class Conflict:
    """Two edits of the same subject and relation. ``duplicate``: same target (a doubled edit)."""

    subject: str
    relation: str
    first: tuple[int, int]  # (patch index, delta index)
    second: tuple[int, int]
    first_target: str
    second_target: str

    @property
    def duplicate(self) -> bool:
        return _norm(self.first_target) == _norm(self.second_target)

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "relation": self.relation,
            "first": list(self.first),
            "second": list(self.second),
            "first_target": self.first_target,
            "second_target": self.second_target,
            "duplicate": self.duplicate,
        }


def find_conflicts(patches: Sequence[Patch]) -> list[Conflict]:
    """Pairs of edits with the same subject and relation (``relation_id``, else prompt template).

    Different targets are a conflict; equal targets a duplicate. Deltas without a request
    (``extracted``) cannot conflict, nor can the deltas of one patch that carry the same request
    (one edit spread over several deltas: an opening pair, MEMIT's layers).
    """
    by_subject: dict[str, list[tuple[int, int, EditRequest]]] = {}
    for i, p in enumerate(patches):
        for j, d in enumerate(p.deltas):
            if d.request is not None:
                by_subject.setdefault(_norm(d.request.subject), []).append((i, j, d.request))
    out = []
    for group in by_subject.values():
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                (i, j, r), (k, m, s) = group[x], group[y]
                if i == k and r == s:
                    continue  # one edit in several deltas of one patch (an opening pair, MEMIT's layers)
                if same_relation(r, s):
                    out.append(
                        Conflict(
                            subject=r.subject,
                            relation=r.relation_id if r.relation_id and s.relation_id else r.prompt,
                            first=(i, j),
                            second=(k, m),
                            first_target=r.target_new,
                            second_target=s.target_new,
                        )
                    )
    return out


def stack_patches(patches: PatchesLike, *, allow_conflicts: bool = False) -> Patch:
    """One patch holding all deltas of ``patches`` in order (see the module docstring for its lineage).

    ``patches``: patch files, ``Patch`` objects or Hub references, as a sequence (nested one level,
    such as a ``create_patch`` chain; see ``rompatch.refs``).

    Raises BaseMismatchError for different base models (or inputs computed against different values
    of a tensor), LineageError for a repeated input or an input listed before one it was computed on
    top of, and ConflictError for edits of the same subject and relation with different targets
    (unless ``allow_conflicts``).
    """
    ps = resolve_patches(patches)
    if not ps:
        raise PatchFormatError("no patches given; pass the patch files to stack")
    _check_inputs(ps)
    position = _positions(ps)
    _check_conflicts(ps, allow_conflicts=allow_conflicts)
    out = new_patch(
        [d for p in ps for d in p.deltas],
        base=ps[0].base,
        parameters=_parameters(ps, position),
        lineage=[pid for pid in dict.fromkeys(x for p in ps for x in p.lineage) if pid not in position],
    )
    if len(ps) > 1:
        out.extra[STACKED_FROM] = json.dumps(_components(ps), separators=(",", ":"))
    elif stacked_components(ps[0], verified_only=True):  # a stack of one patch is that patch (same id)
        out.extra[STACKED_FROM] = ps[0].extra[STACKED_FROM]
    log.info("stacked %d patches (%d deltas) into %s", len(ps), len(out.deltas), out.short_id)
    return out


def _check_inputs(ps: Sequence[Patch]) -> None:
    """Each input once, all on one base model."""
    ids = [p.id for p in ps]
    for k, pid in enumerate(ids):
        if pid in ids[:k]:
            raise LineageError(f"patch {pid[:12]} is given twice; stack each patch once")
    for p in ps[1:]:
        diff = base_differences(ps[0].base, p.base)
        if diff:
            detail = ", ".join(f"{f} {ps[0].base.get(f)!r} vs {p.base.get(f)!r}" for f in diff)
            raise BaseMismatchError(
                f"patches {ps[0].short_id} and {p.short_id} have different bases ({detail}); stack only "
                "patches computed on the same model"
            )


def _positions(ps: Sequence[Patch]) -> dict[str, int]:
    """Ids provided inside the stack (inputs and what is stacked into them) -> input index; refuses an
    input listed before one it was computed on top of."""
    position: dict[str, int] = {}
    for k, p in enumerate(ps):
        position.setdefault(p.id, k)
        for cid, _ in stacked_components(p, verified_only=True):
            position.setdefault(cid, k)
    for k, p in enumerate(ps):
        for pid in p.lineage:
            if pid in position and position[pid] > k:
                raise LineageError(
                    f"patch {p.short_id} was computed on top of {pid[:12]}, which comes after it; list "
                    f"{pid[:12]} first"
                )
    return position


def _check_conflicts(ps: Sequence[Patch], *, allow_conflicts: bool) -> None:
    """Warn about doubled edits; refuse conflicting ones unless ``allow_conflicts`` (then warn)."""
    for c in find_conflicts(ps):
        a, b = ps[c.first[0]], ps[c.second[0]]
        text = c.relation.replace("{}", c.subject) if "{}" in c.relation else f"{c.subject} ({c.relation})"
        if c.duplicate:
            log.warning(
                "patches %s [%d] and %s [%d] both edit %r to %r: the edit is applied twice",
                a.short_id, c.first[1], b.short_id, c.second[1], text, c.first_target,
            )  # fmt: skip
        elif not allow_conflicts:
            raise ConflictError(
                f"conflicting edits: patch {a.short_id} [{c.first[1]}] makes {text!r} → {c.first_target!r}, patch "
                f"{b.short_id} [{c.second[1]}] → {c.second_target!r}; drop one, or pass --allow-conflicts "
                "(allow_conflicts=True)"
            )
        else:
            log.warning(
                "conflicting edits kept (allow_conflicts): %r → %r and %r",
                text,
                c.first_target,
                c.second_target,
            )


def _parameters(ps: Sequence[Patch], position: dict[str, int]) -> dict[str, ParamInfo]:
    """Each touched parameter's info from the first input touching it; later inputs must agree on
    its shape and layout, and on its fingerprint unless an input they build on changed it."""
    parameters: dict[str, ParamInfo] = {}
    first_toucher: dict[str, int] = {}
    for k, p in enumerate(ps):
        internal = {position[pid] for pid in p.lineage if pid in position}
        for name, info in p.parameters.items():
            if name not in parameters:
                parameters[name] = info
                first_toucher[name] = k
                continue
            f = ps[first_toucher[name]]
            if (info.shape, info.layout) != (parameters[name].shape, parameters[name].layout):
                raise BaseMismatchError(
                    f"patches {f.short_id} and {p.short_id} disagree on '{name}' ({list(parameters[name].shape)} "
                    f"{parameters[name].layout} vs {list(info.shape)} {info.layout}); they are for different models"
                )
            touched_inside = any(name in ps[i].parameters for i in internal)
            ext_p = [x for x in p.lineage if x not in position]
            ext_f = [x for x in f.lineage if x not in position]
            if info.sha256 != parameters[name].sha256 and not touched_inside and ext_p == ext_f:
                raise BaseMismatchError(
                    f"patches {f.short_id} and {p.short_id} were computed against different values of '{name}' "
                    f"(sha256 {parameters[name].sha256[:16]}… vs {info.sha256[:16]}…); they do not share a base"
                )
    return parameters


def _components(ps: Sequence[Patch]) -> list[dict[str, Any]]:
    """``stacked_from``: each input's id and delta range, and those of the patches stacked into it."""
    out = []
    offset = 0
    for p in ps:
        n = len(p.deltas)
        out.append({"id": p.id, "deltas": [offset, offset + n]})
        for cid, rng in stacked_components(p, verified_only=True):
            out.append({"id": cid, "deltas": [offset + rng.start, offset + rng.stop]})
        offset += n
    return out
