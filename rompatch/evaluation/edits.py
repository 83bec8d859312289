"""One edit of an evaluation: computed on the model as it is, wrapped in a patch, measured around it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..apply import patched
from ..create import Editor
from ..patch import Patch, RankOneDelta
from ..request import EditRequest

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
    "opening_delta",  # True when the edit has a second delta (rompatch.opening)
    "neighbours_released",  # names an edit let go of to reach its fact (ROMEHyperParams.neighbour_min_p)
)


def edit_patch(
    editor: Editor, req: EditRequest, *, lineage: Sequence[str] = ()
) -> tuple[RankOneDelta, Patch]:
    """Compute one edit on the editor's model as it is now and wrap it in a patch (not applied);
    returns its (first) delta and the patch (which holds its opening delta too, if it has one)."""
    ds = editor.edit(req)
    return ds[0], editor.wrap(ds, list(lineage))


def edit_summary(d: RankOneDelta) -> dict[str, Any]:
    return {k: d.seconds if k == "seconds" else d.metrics.get(k) for k in EDIT_METRICS}


def measured_edit(editor: Editor, req: EditRequest, measure: Callable[[], T]) -> tuple[RankOneDelta, T, T]:
    """(the edit, ``measure()`` before it, ``measure()`` with it applied); the model is left as it was."""
    pre = measure()
    d, patch = edit_patch(editor, req)
    with patched(editor.model, patch):
        post = measure()
    return d, pre, post


__all__ = ["EDIT_METRICS", "edit_patch", "edit_summary", "measured_edit"]
