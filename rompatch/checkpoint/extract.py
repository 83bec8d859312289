"""Recover a patch from two checkpoints: the low-rank difference of their MLP output matrices.

For each layer's MLP output matrix (named by the architecture table, :mod:`rompatch.arch`, from
``config.json``'s ``model_type``), ``D = EDITED - BASE`` is computed in float64 in the ``(out, in)``
orientation (GPT-2 ``Conv1D`` weights are transposed first). Its SVD ``D = Σ σ_i a_i b_iᵀ`` gives one
rank-one delta per singular value above the dtype-aware tolerance (:mod:`rompatch.checkpoint.diff`):

    u_i = b_i        (right singular vector, input size, unit norm)
    v_i = σ_i · a_i  (left singular vector scaled by σ_i, output size)

so ``Σ v_i u_iᵀ = D`` up to rounding. Signs are fixed so that each ``u_i``'s largest-magnitude entry is
positive. The requests are unknown: deltas have ``kind="extracted"`` and ``request=None``, and the
patch's metadata key ``extracted_from`` records both checkpoints, the tolerance, each matrix's rank
and relative residual ``‖D - Σ v_i u_iᵀ‖_F / ‖D‖_F``.

One ROME edit is rank one, so extraction recovers ``u`` and ``v/‖...‖`` up to sign; several edits on one
matrix come back as an orthogonal basis of the same update (equal sum, different factors).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

from ..arch import ModelSpec, get_spec
from ..errors import BaseMismatchError, CheckpointError
from ..patch import EXTRACTED_FROM, ParamInfo, Patch, RankOneDelta, new_patch
from ..safetensors_io import sha256_bytes, to_tensor
from ..stack import base_differences
from .diff import RANK_CAP, UNIT_ROUNDOFF, rank_tolerance, svd_top
from .reader import Checkpoint, open_checkpoint

log = logging.getLogger(__name__)


def _num_layers(config: dict[str, Any]) -> int | None:
    cfg = config.get("text_config") or config
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return None


def extract_patch(
    base: Checkpoint | str | os.PathLike,
    edited: Checkpoint | str | os.PathLike,
    *,
    max_rank: int | None = None,
    revision: str | None = None,
) -> Patch:
    """A patch of rank-one deltas that turns ``base`` into ``edited`` (in the MLP output matrices).

    ``max_rank`` keeps at most that many components per matrix (the largest); without it, a matrix
    whose difference has numerical rank ``RANK_CAP`` or more is refused as not a low-rank edit.
    Other tensors are not compared (``rompatch diff`` shows every difference).
    """
    if max_rank is not None and max_rank < 1:
        raise CheckpointError(f"max_rank must be at least 1, got {max_rank}")
    ca = base if isinstance(base, Checkpoint) else open_checkpoint(base, revision=revision)
    cb = edited if isinstance(edited, Checkpoint) else open_checkpoint(edited)
    model_type = _model_type(ca, cb)
    spec = get_spec(SimpleNamespace(model_type=model_type))
    deltas: list[RankOneDelta] = []
    parameters: dict[str, ParamInfo] = {}
    report: dict[str, Any] = {}
    for layer, name in _mlp_outputs(ca, cb, spec):
        found = _extract_matrix(ca, cb, name, layer, spec=spec, max_rank=max_rank)
        if found is None:
            continue
        ds, info, report[name] = found
        if info is not None:
            deltas += ds
            parameters[name] = info
    if not deltas:
        raise CheckpointError(
            f"no MLP output matrix differs between {ca.path} and {cb.path} beyond rounding; nothing to extract "
            "(`rompatch diff` lists every tensor that differs)"
        )
    rec = ca.record
    patch = new_patch(
        deltas,
        base=_base_info(ca, cb, model_type, next(iter(parameters.values())).dtype),
        parameters=parameters,
        lineage=[a.patch.id for a in rec.applied] if rec is not None else [],
    )
    patch.extra[EXTRACTED_FROM] = json.dumps(
        {"base": str(ca.source.get("model")), "edited": str(cb.source.get("model")), "tensors": report},
        separators=(",", ":"),
    )
    return patch


def _model_type(ca: Checkpoint, cb: Checkpoint) -> str:
    mt_a, mt_b = ca.model_type, cb.model_type
    if mt_a and mt_b and mt_a != mt_b:
        raise BaseMismatchError(
            f"BASE is a {mt_a} model and EDITED a {mt_b} model; extract compares two versions of one model"
        )
    model_type = mt_a or mt_b
    if not model_type:
        raise CheckpointError(
            f"neither {ca.path} nor {cb.path} has a config.json with model_type; rompatch needs it to know "
            "which matrices are MLP outputs"
        )
    return model_type


def _mlp_outputs(ca: Checkpoint, cb: Checkpoint, spec: ModelSpec) -> Iterator[tuple[int, str]]:
    """``(layer, parameter)`` of each layer's MLP output matrix, present in both checkpoints (without a
    layer count in the config: until the first layer after 0 that is missing)."""
    n_layers = _num_layers(ca.config or cb.config)
    layer = 0
    while n_layers is None or layer < n_layers:
        name = spec.mlp_out_param(layer)
        try:
            ca.entry(name), cb.entry(name)
        except CheckpointError:
            if n_layers is None and layer > 0:
                return
            raise
        yield layer, name
        layer += 1


def _extract_matrix(
    ca: Checkpoint, cb: Checkpoint, name: str, layer: int, *, spec: ModelSpec, max_rank: int | None
) -> tuple[list[RankOneDelta], ParamInfo | None, dict[str, Any]] | None:
    """The deltas, parameter info and report of one matrix; None when its bytes are equal (info is
    None when it differs only by rounding)."""
    ea, eb = ca.entry(name), cb.entry(name)
    if (ea.dtype, ea.shape) != (eb.dtype, eb.shape):
        raise BaseMismatchError(
            f"'{name}' is {ea.dtype} {list(ea.shape)} in BASE but {eb.dtype} {list(eb.shape)} in EDITED; "
            "extract needs two checkpoints in the same dtype (re-save one)"
        )
    raw_a, raw_b = ca.read_raw(name), cb.read_raw(name)
    if raw_a == raw_b:
        return None
    wa, wb = to_tensor(raw_a, ea), to_tensor(raw_b, eb)
    d = wb.to(torch.float64) - wa.to(torch.float64)
    if spec.conv1d:
        d = d.T  # (in, out) -> (out, in)
    cap = max_rank if max_rank is not None else RANK_CAP
    u_mat, s, v_mat, _ = svd_top(d, cap + 8)
    rms = max(
        float(wa.to(torch.float64).pow(2).mean().sqrt()), float(wb.to(torch.float64).pow(2).mean().sqrt())
    )
    tol = rank_tolerance(d.shape, ea.torch_dtype, rms, float(s[0]))
    rank = int((s > tol).sum())
    if rank == 0:
        log.warning(
            "%s differs only by rounding (largest singular value %.3g <= %.3g); skipped",
            name,
            float(s[0]),
            tol,
        )
        return [], None, {"rank": 0, "tolerance": tol, "skipped": "rounding only"}
    if max_rank is None and rank >= RANK_CAP:
        raise CheckpointError(
            f"the difference in '{name}' has numerical rank >= {RANK_CAP}: not a low-rank edit (fine-tuned?); "
            "pass --max-rank R (max_rank=R) to keep its R largest components anyway"
        )
    k = min(rank, cap)
    total = float(d.pow(2).sum())
    residual = max(total - float(s[:k].pow(2).sum()), 0.0) ** 0.5 / total**0.5
    deltas = [
        _component(
            u_mat,
            s,
            v_mat,
            i,
            layer=layer,
            name=name,
            tol=tol,
            max_rank=max_rank,
            rank=rank,
            residual=residual,
        )
        for i in range(k)
    ]
    info = ParamInfo(shape=ea.shape, dtype=ea.dtype_name, sha256=sha256_bytes(raw_a), layout=spec.layout)  # type: ignore[arg-type]
    report = {
        "rank": rank,
        "kept": k,
        "tolerance": tol,
        "relative_residual": residual,
        "top_singular_values": [float(x) for x in s[: min(8, s.numel())]],
        "unit_roundoff": UNIT_ROUNDOFF[ea.torch_dtype],
    }
    log.info("%s: rank %d (kept %d), relative residual %.3g", name, rank, k, residual)
    return deltas, info, report


def _component(
    u_mat: torch.Tensor,
    s: torch.Tensor,
    v_mat: torch.Tensor,
    i: int,
    *,
    layer: int,
    name: str,
    tol: float,
    max_rank: int | None,
    rank: int,
    residual: float,
) -> RankOneDelta:
    """Singular component ``i`` as a delta: ``u`` the right vector, ``v`` the left one times σ, signed so
    that ``u``'s largest-magnitude entry is positive."""
    u = v_mat[:, i]
    v = s[i] * u_mat[:, i]
    if u[u.abs().argmax()] < 0:
        u, v = -u, -v
    return RankOneDelta(
        u=u.to(torch.float32),
        v=v.to(torch.float32),
        layer=layer,
        parameter=name,
        request=None,
        kind="extracted",
        hparams={"method": "svd", "component": i, "tolerance": tol, "max_rank": max_rank},
        metrics={"singular_value": float(s[i]), "matrix_rank": rank, "relative_residual": residual},
    )


def _base_info(ca: Checkpoint, cb: Checkpoint, model_type: str, dtype: str) -> dict[str, Any]:
    """The extracted patch's base: BASE's (its record's, for a rompatch-written one), with its dtype."""
    rec = ca.record
    base_info = dict(rec.base) if rec is not None else dict(ca.source)
    base_info.update(model_type=model_type, dtype=dtype)
    base_info = {k: base_info.get(k) for k in ("model", "revision", "model_type", "dtype")}
    if cb.record is not None and not base_differences(cb.record.base, base_info):
        log.info("EDITED was written by rompatch; `rompatch log %s` shows the exact patches", cb.path)
    return base_info
