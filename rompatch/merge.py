"""Merge patches: re-solve the deltas that share a matrix so that every edit's key maps exactly to
its own target value, with no cross-talk between edits.

Stacking adds deltas, so at edit j's key k_j a plain stack changes the output by
δ_j + Σ_{i≠j} v_i (u_i·k_j): the other edits leak in. A merge keeps every delta's key direction
u_i and solves the values jointly, per matrix:

    ΔW = R (UᵀK)⁻¹ Uᵀ        U = [u_1 … u_n],  K = [k_1 … k_n],  R = [r_1 … r_n]

so ΔW k_j = r_j for every j, and ΔW's rows lie in span{u_i}. When u_i ∝ C⁻¹k_i (ROME with the
statistics C), this is the C-weighted minimum-norm update meeting every constraint:
min tr(ΔW C ΔWᵀ) s.t. ΔW K = R gives ΔW = R (KᵀC⁻¹K)⁻¹ KᵀC⁻¹. Write C⁻¹K = U D (D diagonal);
KᵀC⁻¹K = KᵀU D is symmetric, so KᵀU D = D UᵀK, and R (KᵀUD)⁻¹ (UD)ᵀ = R (UᵀK)⁻¹ D⁻¹ D Uᵀ
= R (UᵀK)⁻¹ Uᵀ. The statistics are not needed, only u, k and the targets, which a patch stores
(format 1.2 keys).

The target r_j is what edit j's author wanted the matrix's change to be at k_j:

- a delta computed on its own (``create``, independent edits): its own v_j (u_j·k_j), or, for the
  two deltas of an edit whose prompt opens with its subject (``rompatch.opening``), the pair's sum at k_j;
- a delta of a joint solve (``create --mode batch``, a merge, MEMIT; ``hparams["solve"] == "joint"``): the
  sum of that patch's joint deltas on the matrix, at k_j;
- plus, for a patch computed on top of others (``create --mode sequential``, ``create --on``), the
  deltas of those others at k_j, when they are in the merge (its recorded target value).

Refused, with the reason: a delta without a key (format ≤ 1.1, extracted); a plain stack as input
(merge the patches it was stacked from); inputs computed on top of different patches outside the
merge; a patch computed on top of one that is merged into another input; an ill-conditioned
system (the condition number of UᵀK with unit diagonal is reported).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .constants import MERGED_FROM
from .errors import MergeError
from .opening import edit_groups
from .patch import Patch, RankOneDelta, new_patch
from .refs import PatchesLike, resolve_patches
from .stack import stack_patches, stacked_components

log = logging.getLogger(__name__)

DEFAULT_MAX_CONDITION = 1e4  # relative error at the keys ≈ condition × float32 rounding (6e-8)


def merged_components(patch: Patch) -> list[str]:
    """Ids of the patches merged into ``patch`` (empty if it is not a merge)."""
    info = patch.merged_from()
    if not info:
        return []
    try:
        return [str(c["id"]) for c in info["inputs"]]
    except (KeyError, TypeError) as e:
        raise MergeError(f"patch {patch.short_id}: metadata '{MERGED_FROM}' is malformed ({e})") from None


def is_joint(d: RankOneDelta) -> bool:
    """A delta of a joint solve: its patch's joint deltas on one matrix hold their targets together."""
    return d.hparams.get("solve") == "joint"


@dataclass(frozen=True)
class Solved:
    """One matrix's joint solve: the new values (n, out) and the system's condition number."""

    values: torch.Tensor
    condition: float


def joint_solve(
    us: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, *, max_condition: float | None
) -> Solved:
    """Values V (n, out) with Σ_i V_i (u_i·k_j) = targets_j for every j: V = R (UᵀK)⁻¹, in float64.

    ``us``, ``keys``: (n, in); ``targets``: (n, out). The condition number is that of G = [u_i·k_j]
    with its diagonal scaled to 1 (the scale of each u is arbitrary); above ``max_condition``
    (None: no limit) it raises MergeError.
    """
    U, K, R = us.double(), keys.double(), targets.double()
    if len(U) > U.shape[1]:
        raise MergeError(
            f"{len(U)} edits of one matrix with {U.shape[1]} inputs cannot each get their own target exactly "
            f"(UᵀK has rank at most {U.shape[1]}); merge at most {U.shape[1]} edits per matrix, or use MEMIT "
            "(--method memit), which solves in the least-squares sense over several layers"
        )
    G = U @ K.T  # G[i, j] = u_i · k_j
    diag = G.diagonal()
    if bool((diag.abs() < 1e-30).any()):
        j = int((diag.abs() < 1e-30).nonzero()[0])
        raise MergeError(
            f"edit {j}'s key is orthogonal to its own direction u (u·k = 0); it cannot be solved for"
        )
    cond = float(torch.linalg.cond(G / diag[None, :])) if len(G) > 1 else 1.0
    if not math.isfinite(cond) or (max_condition is not None and cond > max_condition):
        raise MergeError(
            f"the joint system of {len(G)} edits is ill-conditioned (condition number {cond:.3g} > {max_condition:.3g}); "
            "two edits have nearly the same key (the same subject twice?); drop one, or raise the limit "
            "(--max-condition) and accept larger rounding errors at the keys"
        )
    # target_j = Σ_i V_i (u_i·k_j), i.e. R = Gᵀ V
    return Solved(values=torch.linalg.solve(G.T, R).float(), condition=cond)


def _ancestor_inputs(ps: Sequence[Patch]) -> list[set[int]]:
    """For each input, the inputs it was computed on top of (by id, or as a component of a merge)."""
    where: dict[str, int] = {}
    merged_into: dict[str, int] = {}
    for k, p in enumerate(ps):
        where.setdefault(p.id, k)
        for cid in merged_components(p):
            merged_into.setdefault(cid, k)
    out = []
    for p in ps:
        for pid in p.lineage:
            if pid in merged_into and pid not in where:
                raise MergeError(
                    f"patch {p.short_id} was computed on top of {pid[:12]}, which is merged into "
                    f"{ps[merged_into[pid]].short_id}; its target is relative to the unmerged patch, so merge "
                    "the original patches together"
                )
        out.append({where[pid] for pid in p.lineage if pid in where})
    return out


def _check_inputs(ps: Sequence[Patch]) -> None:
    for p in ps:
        if stacked_components(p):
            raise MergeError(
                f"patch {p.short_id} is a plain stack of {len(stacked_components(p))} patches; its edits' targets "
                "are not recorded apart, so merge the patches it was stacked from"
            )
        for i, d in enumerate(p.deltas):
            if d.key is None and "svd_compressed" in d.hparams:
                raise MergeError(
                    f"patch {p.short_id} delta {i} has no key (an SVD-compressed MEMIT layer keeps no per-edit "
                    "keys); merging needs each edit's key: make MEMIT batches of at most min(in, out) edits"
                )
            if d.key is None:
                why = "an extracted delta" if d.kind == "extracted" else f"format {p.format_version}"
                raise MergeError(
                    f"patch {p.short_id} delta {i} has no key ({why}); merging needs each edit's key: "
                    "re-create the patch with this rompatch (patch format 1.2 stores keys)"
                )
    ids = {p.id for p in ps} | {c for p in ps for c in merged_components(p)}
    outside = {tuple(x for x in p.lineage if x not in ids) for p in ps}
    if len(outside) > 1:
        raise MergeError(
            "the patches were computed on top of different patches outside the merge; merge only patches "
            "computed on one model (add the patches they build on to the merge)"
        )


def edit_change(deltas: Sequence[RankOneDelta], k: torch.Tensor) -> torch.Tensor:
    """Σ v (u·k) over ``deltas``, float64: what they change together at key ``k``."""
    out = torch.zeros_like(deltas[0].v, dtype=torch.float64)
    for d in deltas:
        out += d.v.double() * float(d.u.double() @ k.double())
    return out


def _targets(
    ps: Sequence[Patch], parameter: str, ancestors: list[set[int]]
) -> list[tuple[RankOneDelta, torch.Tensor]]:
    """(delta, target value at its key) for every delta of ``parameter``, in input order."""
    out = []
    for n, p in enumerate(ps):
        mine = [d for d in p.deltas if d.parameter == parameter]
        joint = [d for d in mine if is_joint(d)]
        edit_of = {
            i: [mine[j] for j in g] for g in edit_groups(mine) for i in g
        }  # an opening pair is one edit
        below = [d for a in sorted(ancestors[n]) for d in ps[a].deltas if d.parameter == parameter]
        for i, d in enumerate(mine):
            assert d.key is not None
            own = joint if is_joint(d) else edit_of[i]
            r = edit_change(own, d.key)
            if below:
                r += edit_change(below, d.key)
            out.append((d, r))
    return out


def merge_patches(
    patches: PatchesLike,
    *,
    allow_conflicts: bool = False,
    max_condition: float | None = DEFAULT_MAX_CONDITION,
) -> Patch:
    """One patch whose deltas meet every input edit's target at its key exactly (module docstring).

    The inputs are checked as ``stack_patches`` checks them (one base, lineage order, conflicts).
    Each delta keeps its u, key, request, hyperparameters and statistics; its ``v`` is re-solved,
    its ``hparams`` gain ``"solve": "joint"``, and its ``metrics`` become
    ``{"merge_condition", "merge_edits", "before_merge": <its former metrics>}``. The patch records
    its inputs under the ``merged_from`` metadata key (with each matrix's condition number).
    """
    ps = resolve_patches(patches)
    plain = stack_patches(ps, allow_conflicts=allow_conflicts)  # base, lineage and conflict checks
    _check_inputs(ps)
    ancestors = _ancestor_inputs(ps)
    new: dict[int, RankOneDelta] = {}
    conditions: dict[str, float] = {}
    flat = [d for p in ps for d in p.deltas]
    for parameter in dict.fromkeys(d.parameter for d in flat):
        pairs = _targets(ps, parameter, ancestors)
        solved = joint_solve(
            torch.stack([d.u for d, _ in pairs]),
            torch.stack([d.key for d, _ in pairs]),  # type: ignore[misc]
            torch.stack([r for _, r in pairs]),
            max_condition=max_condition,
        )
        conditions[parameter] = solved.condition
        for (d, _), v in zip(pairs, solved.values):
            before = d.metrics.get("before_merge", d.metrics)
            new[id(d)] = replace(
                d,
                v=v,
                hparams={**d.hparams, "solve": "joint"},
                metrics={
                    "merge_condition": round(solved.condition, 4),
                    "merge_edits": len(pairs),
                    "before_merge": before,
                },
            )
    out = new_patch(
        [new[id(d)] for d in flat], base=plain.base, parameters=plain.parameters, lineage=plain.lineage
    )
    offsets, at = [], 0
    for p in ps:
        offsets.append({"id": p.id, "deltas": [at, at + len(p.deltas)]})
        at += len(p.deltas)
    out.extra[MERGED_FROM] = json.dumps(
        {"inputs": offsets, "condition": {k: round(v, 4) for k, v in conditions.items()}},
        separators=(",", ":"),
    )
    worst = max(conditions.values())
    log.info(
        "merged %d patches (%d deltas) into %s; worst condition number %.3g",
        len(ps),
        len(flat),
        out.short_id,
        worst,
    )
    return out
