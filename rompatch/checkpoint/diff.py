"""Compare edits: patch vs patch, checkpoint vs checkpoint, checkpoint vs patch.

Numerical rank (checkpoint diffs and ``extract``): the difference ``D = B - A`` of two stored
matrices of shape ``(m, n)`` carries rounding noise from storing ``B`` in its dtype: each element is
off by at most ``u·|B_ij|``, with ``u`` the unit roundoff (2⁻²⁴ float32, 2⁻¹¹ float16, 2⁻⁸ bfloat16).
Such noise has spectral norm about ``σ_e(√m + √n)`` with ``σ_e ≤ u·rms(B)``, so singular values of
``D`` count towards its rank only above::

    tol = max(2 · u · rms(A, B) · (√m + √n),  σ₁ · max(m, n) · ε_svd)

(the second term is the SVD's own float64/float32 error). Matrices with ``min(m, n) <= 1024`` get an
exact SVD in float64; larger ones a randomized one (``torch.svd_lowrank``, seeded) of the top
``RANK_CAP + 8`` singular values, reported as a lower bound when all of them exceed ``tol``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PatchFormatError
from ..fingerprint import dtype_name, tensor_sha256
from ..numerics import apply_deltas, factors_on, minus_update, update, whole
from ..patch import Patch, RankOneDelta, load_patch
from ..refs import resolve_patch
from ..safetensors_io import read_range
from ..stack import base_differences
from .reader import Checkpoint, open_checkpoint
from .record import provided_ids

log = logging.getLogger(__name__)

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
RANK_CAP = 64
EXACT_SVD_MAX = 1024


# ------------------------------------------------------------------------------ numerical rank


def rank_tolerance(
    shape: Sequence[int], dtype: torch.dtype, rms: float, sigma_max: float, *, svd_eps: float = 2.0**-52
) -> float:
    """Singular values at or below this are rounding noise of storing the matrix in ``dtype``."""
    m, n = shape
    noise = 2.0 * UNIT_ROUNDOFF[dtype] * rms * (math.sqrt(m) + math.sqrt(n))
    return max(noise, sigma_max * max(m, n) * svd_eps)


def svd_top(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``(U, S, V, exact)`` with ``d ≈ U diag(S) Vᵀ``: exact (float64) for small matrices, else the top
    ``k`` by a seeded randomized SVD."""
    m, n = d.shape
    if min(m, n) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(d.to(torch.float64), full_matrices=False)
        return u, s, vh.T, True
    q = min(k, m, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(d.to(torch.float64), q=q, niter=6)
    return u, s, v, False


def numerical_rank(a: torch.Tensor, b: torch.Tensor, *, cap: int = RANK_CAP) -> dict[str, Any]:
    """Rank of ``b - a`` above the dtype's rounding noise (2-D tensors of one dtype)."""
    d = b.to(torch.float64) - a.to(torch.float64)
    rms = max(
        float(a.to(torch.float64).pow(2).mean().sqrt()), float(b.to(torch.float64).pow(2).mean().sqrt())
    )
    _, s, _, exact = svd_top(d, cap + 8)
    smax = float(s[0]) if s.numel() else 0.0
    tol = rank_tolerance(d.shape, b.dtype, rms, smax)
    rank = int((s > tol).sum())
    lower_bound = not exact and rank == s.numel()
    return {
        "rank": min(rank, cap) if lower_bound else rank,
        "rank_is_lower_bound": lower_bound,
        "tolerance": tol,
        "top_singular_values": [float(x) for x in s[: min(8, s.numel())]],
    }


# ---------------------------------------------------------------------------- patch vs patch


def _key(d: RankOneDelta) -> tuple | None:
    r = d.request
    if r is None:
        return None
    return (" ".join(r.prompt.split()), r.subject.strip(), r.target_new.strip())


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.to(torch.float64), y.to(torch.float64)
    nx, ny = float(x.norm()), float(y.norm())
    return float(x @ y) / (nx * ny) if nx and ny else 0.0


def update_norm(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """‖Σ v uᵀ‖_F from the factors alone (no dense matrix): sqrt(Σ_kl (v_k·v_l)(u_k·u_l))."""
    if not factors:
        return 0.0
    v = torch.stack([f[0].to(torch.float64) for f in factors], 1)
    u = torch.stack([f[1].to(torch.float64) for f in factors], 1)
    return math.sqrt(max(float(((v.T @ v) * (u.T @ u)).sum()), 0.0))


def _edit(p: Patch, i: int) -> dict[str, Any]:
    return p.summary()["edits"][i]


def diff_patches(a: Patch, b: Patch) -> dict[str, Any]:
    """Edits only in ``a``, only in ``b``, and in both, with cosines of u and v for shared ones.

    Deltas are matched by request (prompt, subject, target). Deltas without a request (extracted)
    are then matched to an unmatched delta on the same parameter with the largest |cos u|; their
    cosines are sign-aligned (``v uᵀ = (-v)(-u)ᵀ``). ``parameters`` compares the summed update of each
    parameter: ``relative_difference = ‖ΣΔ_a - ΣΔ_b‖_F / ‖ΣΔ_a‖_F``.
    """
    both, left, right = _match(a, b)
    shared = [_shared(a, b, i, j, how) for i, j, how in both]
    params = {name: _parameter_diff(a, b, name) for name in sorted(set(a.parameters) | set(b.parameters))}
    base_diff = base_differences(a.base, b.base)
    return {
        "kind": "patch/patch",
        "a": a.id,
        "b": b.id,
        "same_base": not base_diff,
        "base_differences": {k: [a.base.get(k), b.base.get(k)] for k in base_diff},
        "same_lineage": a.lineage == b.lineage,
        "merged_from": {"a": a.merged_from(), "b": b.merged_from()},
        "identical": a.id == b.id,
        "only_a": [_edit(a, i) for i in sorted(left)],
        "only_b": [_edit(b, j) for j in sorted(right)],
        "both": shared,
        "parameters": params,
    }


def _match(a: Patch, b: Patch) -> tuple[list[tuple[int, int, str]], set[int], set[int]]:
    """Pairs ``(a index, b index, how)`` matched by request, then by direction; the unmatched indices."""
    left = {i for i in range(len(a.deltas))}
    right = {j for j in range(len(b.deltas))}
    both = []
    keys_b: dict[tuple, list[int]] = {}
    for j, d in enumerate(b.deltas):
        k = _key(d)
        if k is not None:
            keys_b.setdefault(k, []).append(j)
    for i, d in enumerate(a.deltas):
        k = _key(d)
        if k is not None and keys_b.get(k):
            j = keys_b[k].pop(0)
            both.append((i, j, "request"))
            left.discard(i)
            right.discard(j)
    for i in sorted(left):  # direction matching for request-less deltas
        da = a.deltas[i]
        cands = [
            j for j in sorted(right)
            if b.deltas[j].parameter == da.parameter and (da.request is None or b.deltas[j].request is None)
        ]  # fmt: skip
        if cands:
            j = max(cands, key=lambda j: abs(_cos(da.u, b.deltas[j].u)))
            both.append((i, j, "direction"))
            left.discard(i)
            right.discard(j)
    return both, left, right


def _shared(a: Patch, b: Patch, i: int, j: int, how: str) -> dict[str, Any]:
    """A matched pair: cosines of u and v (sign-aligned for direction matches), norm ratio, identity."""
    da, db = a.deltas[i], b.deltas[j]
    entry: dict[str, Any] = {"a_index": i, "b_index": j, "matched_by": how, "edit": _edit(a, i)}
    entry["same_parameter"] = da.parameter == db.parameter
    if da.u.shape == db.u.shape and da.v.shape == db.v.shape:
        cu, cv = _cos(da.u, db.u), _cos(da.v, db.v)
        flipped = how == "direction" and cu < 0
        entry.update(
            cos_u=-cu if flipped else cu,
            cos_v=-cv if flipped else cv,
            sign_flipped=flipped,
            norm_ratio_v=float(db.v.norm() * db.u.norm() / (da.v.norm() * da.u.norm()))
            if float(da.v.norm() * da.u.norm())
            else None,
            identical=torch.equal(da.u, db.u) and torch.equal(da.v, db.v),
        )
    else:
        entry.update(cos_u=None, cos_v=None, identical=False)
    return entry


def _parameter_diff(a: Patch, b: Patch, name: str) -> dict[str, Any]:
    fa = [(d.v, d.u) for d in a.deltas if d.parameter == name]
    fb = [(d.v, d.u) for d in b.deltas if d.parameter == name]
    entry: dict[str, Any] = {"in_a": bool(fa), "in_b": bool(fb)}
    if fa and fb:
        na = update_norm(fa)
        diff = update_norm(fa + [(-v, u) for v, u in fb])
        entry["relative_difference"] = diff / na if na else None
        entry["same_fingerprint"] = a.parameters[name].sha256 == b.parameters[name].sha256
    return entry


# ------------------------------------------------------------------- checkpoint vs checkpoint


def _same_bytes(ca: Checkpoint, cb: Checkpoint, key: str) -> bool:
    ea, eb = ca.entries[key], cb.entries[key]
    fa, fb = ca.path / ea.file, cb.path / eb.file
    try:
        if ea.offset == eb.offset and os.path.samefile(fa, fb):
            return True
    except OSError:
        pass
    step = 64 << 20
    for off in range(0, ea.nbytes, step):
        n = min(step, ea.nbytes - off)
        if read_range(fa, ea.offset + off, n) != read_range(fb, eb.offset + off, n):
            return False
    return True


def diff_checkpoints(a: Checkpoint | str | os.PathLike, b: Checkpoint | str | os.PathLike) -> dict[str, Any]:
    """Which tensors differ between two checkpoints; for each, the numerical rank of the difference
    (module docstring) and its relative size ``‖B - A‖_F / ‖A‖_F``. Reads one tensor pair at a time."""
    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b)
    ka, kb = set(ca.entries), set(cb.entries)
    differ, mismatched, same = [], [], 0
    for key in sorted(ka & kb):
        ea, eb = ca.entries[key], cb.entries[key]
        if (ea.dtype, ea.shape) != (eb.dtype, eb.shape):
            mismatched.append(
                {
                    "tensor": key,
                    "a": {"dtype": ea.dtype, "shape": list(ea.shape)},
                    "b": {"dtype": eb.dtype, "shape": list(eb.shape)},
                }
            )
            continue
        if _same_bytes(ca, cb, key):
            same += 1
            continue
        entry: dict[str, Any] = {"tensor": key, "shape": list(ea.shape), "dtype": ea.dtype_name}
        if ea.dtype in ("F32", "F16", "BF16", "F64"):
            wa, wb = ca.read(key), cb.read(key)
            d = wb.to(torch.float64) - wa.to(torch.float64)
            na = float(wa.to(torch.float64).norm())
            entry["relative_size"] = float(d.norm()) / na if na else math.inf
            entry["max_abs_difference"] = float(d.abs().max())
            del d
            if len(ea.shape) == 2:
                entry.update(numerical_rank(wa, wb))
            else:
                entry["rank"] = None
        differ.append(entry)
    rec_a, rec_b = ca.record, cb.record
    return {
        "kind": "checkpoint/checkpoint",
        "a": str(ca.path),
        "b": str(cb.path),
        "identical": not differ and not mismatched and ka == kb,
        "only_a": sorted(ka - kb),
        "only_b": sorted(kb - ka),
        "dtype_or_shape_differs": mismatched,
        "differ": differ,
        "n_identical": same,
        "applied_a": [x.patch.id for x in rec_a.applied] if rec_a else [],
        "applied_b": [x.patch.id for x in rec_b.applied] if rec_b else [],
    }


# ------------------------------------------------------------------------ checkpoint vs patch


def checkpoint_contains(
    checkpoint: Checkpoint | str | os.PathLike,
    patch: Patch,
    *,
    base: Checkpoint | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Does the checkpoint contain ``patch``? ``contains`` is True, False, or None (cannot tell).

    - rompatch-written checkpoint: the record answers (also for a patch stacked into an applied one);
    - with ``base``: the difference checkpoint - base must equal the patch's update up to rounding
      (``‖(W - A) - ΣΔ‖_F <= u·‖W‖_F + 4·2⁻²⁴·‖ΣΔ‖_F``: the largest error storing ``W`` in its dtype can
      cause, plus float32 error in the patch's factors, so an extracted copy of the patch also counts);
    - otherwise, from fingerprints only: the tensor still equals the patch's base fingerprint (no),
      or subtracting the update restores that fingerprint exactly (yes); else unknown.
    """
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    out: dict[str, Any] = {"kind": "checkpoint/patch", "checkpoint": str(ck.path), "patch": patch.id}
    if ck.record is not None and base is None:
        out.update(_contains_by_record(ck, patch))
        return out
    cb = None if base is None else base if isinstance(base, Checkpoint) else open_checkpoint(base)
    tensors = {}
    for name in patch.parameters:
        w = ck.read(name)
        fs = factors_on(name, [whole(patch)])
        total = update(w.shape, fs)
        t: dict[str, Any] = {"dtype": dtype_name(w.dtype)}
        if cb is not None:
            t.update(_against_base(w, cb.read(name), fs, total, patch.parameters[name].sha256))
        else:
            t.update(_by_fingerprint(w, total, patch.parameters[name].sha256))
        tensors[name] = t
    verdicts = [t["contains"] for t in tensors.values()]
    contains = (
        True if all(v is True for v in verdicts) else False if any(v is False for v in verdicts) else None
    )
    out.update(contains=contains, how="base" if cb is not None else "fingerprint", tensors=tensors)
    return out


def _contains_by_record(ck: Checkpoint, patch: Patch) -> dict[str, Any]:
    """The record's answer: is ``patch`` (or a stack holding it) applied?"""
    rec = ck.record
    assert rec is not None
    for k, a in enumerate(rec.applied):
        if patch.id in provided_ids(a.patch):
            modified = [n for n in ck.verify_record() if n in patch.parameters]
            return {
                "contains": not modified,
                "how": "record",
                "position": k,
                "part_of": None if a.patch.id == patch.id else a.patch.id,
                "forced": a.forced,
                "modified_since": modified,
            }
    return {"contains": False, "how": "record", "applied": [a.patch.id for a in rec.applied]}


def _against_base(
    w: torch.Tensor, a: torch.Tensor, fs: Sequence[Any], total: torch.Tensor, base_sha: str
) -> dict[str, Any]:
    """Does ``w - a`` equal the update ``total`` (factors ``fs``) exactly, or up to rounding?"""
    expected = apply_deltas(a, fs, w.dtype)  # the same operations, in the same order, as apply
    resid = (w.to(torch.float64) - a.to(torch.float64)) - total.to(torch.float64)
    # storing W in its dtype (u·‖W‖) plus float32 error in the factors and the accumulation
    bound = UNIT_ROUNDOFF[w.dtype] * float(w.to(torch.float64).norm()) + 4 * 2.0**-24 * float(total.norm())
    t = {
        "exact": bool(torch.equal(expected, w)),
        "relative_residual": float(resid.norm()) / max(float(total.norm()), 1e-30),
        "within_rounding": float(resid.norm()) <= bound * 1.0001,
        "base_matches_fingerprint": tensor_sha256(a) == base_sha,
    }
    t["contains"] = t["exact"] or t["within_rounding"]
    return t


def _by_fingerprint(w: torch.Tensor, total: torch.Tensor, base_sha: str) -> dict[str, Any]:
    """From fingerprints alone: ``w`` is the patch's base (no), or ``w - update`` is (yes); else unknown."""
    t = {
        "equals_patch_base": tensor_sha256(w) == base_sha,
        "subtracting_restores_base": tensor_sha256(minus_update(w, total)) == base_sha,
    }
    t["contains"] = False if t["equals_patch_base"] else True if t["subtracting_restores_base"] else None
    return t


# -------------------------------------------------------------------------------- dispatch


def _open_any(ref: Patch | Checkpoint | str | os.PathLike) -> Patch | Checkpoint:
    if isinstance(ref, (Patch, Checkpoint)):
        return ref
    p = Path(ref).expanduser()
    if p.is_dir():
        return open_checkpoint(p)
    if p.is_file():
        try:
            return load_patch(p)
        except PatchFormatError as e:
            raise PatchFormatError(f"{e} (to compare a checkpoint, pass its folder)") from None
    s = str(ref)
    if s.endswith(".safetensors") or "@" in s:
        return resolve_patch(s)
    return open_checkpoint(s)


def diff(
    a: Patch | Checkpoint | str | os.PathLike,
    b: Patch | Checkpoint | str | os.PathLike,
    *,
    base: Checkpoint | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compare two patches, two checkpoints, or a checkpoint and a patch (either order).

    A folder is a checkpoint, a file a patch; other strings are Hub references: ``…/file.safetensors``
    or ``…@REV`` a patch, a bare repo id a checkpoint. ``base`` only applies to checkpoint vs patch.
    """
    oa, ob = _open_any(a), _open_any(b)
    if isinstance(oa, Patch) and isinstance(ob, Patch):
        return diff_patches(oa, ob)
    if isinstance(oa, Checkpoint) and isinstance(ob, Checkpoint):
        return diff_checkpoints(oa, ob)
    ck, patch = (oa, ob) if isinstance(oa, Checkpoint) else (ob, oa)
    return checkpoint_contains(ck, patch, base=base)  # type: ignore[arg-type]
