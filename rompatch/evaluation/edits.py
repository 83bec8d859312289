"""One edit of an evaluation: computed on the model as it is, wrapped in a patch, measured around it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..apply import patched
from ..arch import get_spec
from ..create import edit_to_delta
from ..models import model_identity
from ..patch import ParamInfo, Patch, RankOneDelta, new_patch
from ..request import EditRequest
from ..rome import ROMEHyperParams
from ..stats import SecondMoment

T = TypeVar("T")

EDIT_METRICS = (
    "seconds",
    "v_norm",
    "update_spectral_norm",
    "weight_spectral_norm",
    "v_steps_run",
    "p_new_before",
    "p_new_after",
    "delta_capped",
)


def edit_patch(
    model: Any,
    tok: Any,
    req: EditRequest,
    *,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
    lineage: Sequence[str] = (),
) -> tuple[RankOneDelta, Patch]:
    """Compute one edit on the model as it is now and wrap it in a patch (not applied)."""
    spec = get_spec(model)
    d = edit_to_delta(model, tok, req, stats=stats, hparams=hparams)
    info = ParamInfo.of(model.get_parameter(d.parameter).data, spec.layout)
    patch = new_patch([d], base=model_identity(model), parameters={d.parameter: info}, lineage=list(lineage))
    return d, patch


def edit_summary(d: RankOneDelta) -> dict[str, Any]:
    return {k: d.seconds if k == "seconds" else d.metrics.get(k) for k in EDIT_METRICS}


def measured_edit(
    model: Any,
    tok: Any,
    req: EditRequest,
    measure: Callable[[], T],
    *,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
) -> tuple[RankOneDelta, T, T]:
    """(the edit, ``measure()`` before it, ``measure()`` with it applied); the model is left as it was."""
    pre = measure()
    d, patch = edit_patch(model, tok, req, hparams=hparams, stats=stats)
    with patched(model, patch):
        post = measure()
    return d, pre, post


__all__ = ["EDIT_METRICS", "edit_patch", "edit_summary", "measured_edit"]
