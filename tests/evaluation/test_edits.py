"""One edit of an evaluation: its patch, its summary, and measuring before and with it."""

from __future__ import annotations

from rompatch.create import Editor
from rompatch.evaluation.edits import EDIT_METRICS, edit_patch, edit_summary, measured_edit
from rompatch.evaluation.evaluate import score_case
from rompatch.request import EditRequest
from tests.helpers.evaluation import CF, HP, model_state


def test_measured_edit_measures_before_and_with_the_edit_and_reverts(tiny):
    model, tok, stats = tiny
    before = model_state(model)
    req = EditRequest.from_dict(CF[0])
    d, pre, post = measured_edit(
        Editor(model, tok, hparams=HP, stats=stats), req, lambda: score_case(model, tok, CF[0])
    )
    assert model_state(model) == before
    assert post["EM"] > pre["EM"] and post["ES"] == 1.0
    assert list(edit_summary(d)) == list(EDIT_METRICS) and edit_summary(d)["seconds"] == d.seconds


def test_edit_patch_records_its_lineage(tiny):
    model, tok, stats = tiny
    d, patch = edit_patch(
        Editor(model, tok, hparams=HP, stats=stats), EditRequest.from_dict(CF[1]), lineage=["a" * 64]
    )
    assert patch.deltas == [d] and patch.lineage == ["a" * 64] and d.parameter in patch.parameters
