"""Create patches: request → statistics → key/value → delta → patch.

``create_patch`` computes ROME edits on a model and returns them as a ``Patch`` (the model is left
unchanged). ``mode="independent"`` computes every edit on the base model; ``mode="sequential"``
computes each on the model with the previous ones applied and records that lineage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from .apply import applied_patches, apply_patch, revert_patch
from .arch import check_layer, default_layer, get_spec
from .context import context_templates
from .errors import RequestError
from .models import applied_on_disk, model_identity
from .patch import ParamInfo, Patch, RankOneDelta, new_patch
from .request import EditRequest
from .rome import ROMEHyperParams, compute_delta, validate_request
from .scoring import target_logprobs
from .stats import SecondMoment, get_second_moment

log = logging.getLogger(__name__)


def _probe(model: Any, tok: Any, req: EditRequest) -> dict[str, float]:
    targets = [req.target_new] + ([req.target_true] if req.target_true else [])
    lp = target_logprobs(model, tok, [req.text], targets)[0]
    out = {"p_new": math.exp(lp[0])}
    if req.target_true:
        out["p_true"] = math.exp(lp[1])
    return out


def edit_to_delta(
    model: Any,
    tok: Any,
    req: EditRequest,
    *,
    stats: SecondMoment | None,
    hparams: ROMEHyperParams,
    templates: Sequence[str] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> RankOneDelta:
    """One request → one RankOneDelta with hyperparameters, statistics identity and creation metrics."""
    res = compute_delta(model, tok, req, stats=stats, hparams=hparams, templates=templates, progress=progress)
    before = _probe(model, tok, req)
    d = RankOneDelta(
        u=res.u,
        v=res.v,
        layer=res.layer,
        parameter=res.parameter,
        request=req,
        kind="rome",
        hparams=res.hparams,
        stats=stats.record() if stats is not None else {"mom2_adjustment": False},
    )
    # Metrics after: apply this single delta temporarily (exact revert).
    spec = get_spec(model)
    tmp = new_patch(
        [d],
        base=model_identity(model),
        parameters={res.parameter: ParamInfo.of(model.get_parameter(res.parameter).data, spec.layout)},
        lineage=applied_on_disk(model) + [p.id for p in applied_patches(model)],
    )
    apply_patch(model, tmp)
    try:
        after = _probe(model, tok, req)
    finally:
        revert_patch(model, tmp)
    metrics = dict(res.metrics)
    d.timings = {"edit_seconds": metrics.pop("seconds")}
    if stats is not None and stats.identity.get("seconds") is not None:
        d.timings["stats_seconds"] = stats.identity["seconds"]
    d.metrics = {
        **metrics,
        **{f"{k}_before": round(v, 6) for k, v in before.items()},
        **{f"{k}_after": round(v, 6) for k, v in after.items()},
    }
    return d


def create_patch(
    model: Any,
    tok: Any,
    requests: EditRequest | Sequence[EditRequest],
    *,
    hparams: ROMEHyperParams | None = None,
    stats: SecondMoment | None = None,
    stats_data: str | None = None,
    stats_tokens: int | None = None,
    mode: str = "independent",
    progress: bool = False,
    on_edit: Callable[[int, RankOneDelta], None] | None = None,
) -> Patch | list[Patch]:
    """Compute ROME edits and return them as one patch (``independent``) or a chain (``sequential``).

    ``independent``: every edit is computed on the model as given; one patch holds all deltas.
    ``sequential``: edit i is computed with edits 0..i-1 applied; returns one patch per edit,
    each listing its predecessors in ``lineage``. The model is unchanged afterwards in both modes.
    Bad requests (prompt without '{}', subject absent from the prompt's tokens, empty target,
    layer out of range) are rejected before any heavy work.
    """
    from tqdm.auto import tqdm

    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not reqs:
        raise RequestError("no edit requests given")
    if mode not in ("independent", "sequential"):
        raise RequestError(f"mode must be 'independent' or 'sequential', not {mode!r}")
    hp = hparams or ROMEHyperParams()
    layer = default_layer(model) if hp.layer is None else hp.layer
    check_layer(model, layer)
    if hp.layer is None:
        hp = ROMEHyperParams(**{**hp.__dict__, "layer": layer})
    for r in reqs:
        validate_request(tok, r)
    if hp.mom2_adjustment and stats is None:
        stats = get_second_moment(
            model, tok, layer, stats_data=stats_data, n_tokens=stats_tokens, progress=progress
        )
    templates = context_templates(model, tok, length_params=hp.context_length_params, seed=hp.seed)
    spec = get_spec(model)
    name = spec.mlp_out_param(layer)
    # Edits computed on a model that already carries patches (baked into its checkpoint, or applied
    # in memory) are computed on top of them: that is their lineage.
    inherited = applied_on_disk(model) + [p.id for p in applied_patches(model)]

    deltas: list[RankOneDelta] = []
    patches: list[Patch] = []
    bar = tqdm(
        total=len(reqs), desc="edits", unit="edit", disable=not progress or len(reqs) == 1, leave=False
    )
    try:
        for i, r in enumerate(reqs):
            step_bar = tqdm(
                total=hp.v_steps,
                desc=f"edit {i + 1}/{len(reqs)} {r.subject[:24]}",
                leave=False,
                disable=not progress,
            )

            def tick(step, loss, _b=step_bar):
                _b.update(1)
                _b.set_postfix_str(f"loss {loss:.3f}")

            info = ParamInfo.of(model.get_parameter(name).data, spec.layout)
            d = edit_to_delta(model, tok, r, stats=stats, hparams=hp, templates=templates, progress=tick)
            step_bar.close()
            if mode == "sequential":
                p = new_patch(
                    [d],
                    base=model_identity(model),
                    parameters={name: info},
                    lineage=inherited + [q.id for q in patches],
                )
                apply_patch(model, p)
                patches.append(p)
            else:
                deltas.append(d)
            if on_edit is not None:
                on_edit(i, d)
            bar.update(1)
    finally:
        bar.close()
        for p in reversed(patches):
            revert_patch(model, p)
    if mode == "sequential":
        return patches
    return new_patch(
        deltas,
        base=model_identity(model),
        parameters={name: ParamInfo.of(model.get_parameter(name).data, spec.layout)},
        lineage=inherited,
    )
