"""The average over known facts (rompatch.tracing.known_facts) on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rompatch.errors import TraceError
from rompatch.tracing.known_facts import _category_rows, load_known, trace_known
from rompatch.tracing.trace import CATEGORIES, trace_fact
from tests.helpers.tracing import known_records, tiny


def test_category_rows():
    # tokens: 0 BOS, 1-3 subject, 4-7 after; categories per the paper's notebook
    assert _category_rows((1, 4), 8) == [[1], [2], [3], [4], [5, 6], [7]]
    # a one-token subject is both first and last; no middle
    assert _category_rows((2, 3), 5) == [[2], [], [2], [3], [], [4]]


def test_trace_known_average_and_resume(tok, tmp_path, monkeypatch):
    model = tiny("llama")
    recs = known_records(model, tok, n=2)
    wrong = {
        "known_id": 99,
        "subject": "Beats Music",
        "attribute": "zzzz qqqq",
        "prompt": "Beats Music is owned by",
    }
    opts = dict(noise_std=1.0, samples=2, window=2, kinds=("hidden", "mlp"))
    avg = trace_known(model, tok, [wrong, *recs], cache_dir=tmp_path / "cases", **opts)
    assert avg.n_facts == len(recs) and avg.considered == len(recs) + 1
    assert avg.skipped == {"wrong prediction": 1}
    # the rollup is the notebook's: mean restored probability per category, minus mean low score
    singles = [trace_fact(model, tok, r["prompt"], r["subject"], **opts) for r in recs]
    for k in ("hidden", "mlp"):
        for c in range(len(CATEGORIES)):
            rows = [r.scores[k][_category_rows(r.subject_range, len(r.tokens))[c]] for r in singles]
            rows = np.concatenate(rows)
            if len(rows):
                np.testing.assert_allclose(avg.mean_scores[k][c], rows.mean(0), rtol=1e-6)
        low = np.mean([r.corrupted_prob for r in singles])
        np.testing.assert_allclose(avg.effect(k), avg.mean_scores[k] - low)
    assert avg.counts[0] == len(recs)
    assert avg.peak_layer("mlp") == int(np.argmax(avg.effect("mlp")[2]))
    assert len(list((tmp_path / "cases").glob("*.json"))) == len(recs) + 1

    # resume: every fact comes from the cache, nothing is traced again
    def boom(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr("rompatch.tracing.known_facts.trace_prompt", boom)
    monkeypatch.setattr("rompatch.tracing.known_facts.predicts_attribute", boom)
    again = trace_known(model, tok, [wrong, *recs], cache_dir=tmp_path / "cases", **opts)
    np.testing.assert_array_equal(again.mean_scores["mlp"], avg.mean_scores["mlp"])
    # other settings are not served from the cache
    with pytest.raises(AssertionError, match="traced again"):
        trace_known(model, tok, recs, cache_dir=tmp_path / "cases", **{**opts, "samples": 3})
    monkeypatch.undo()

    lim = trace_known(model, tok, recs, limit=1, **{**opts, "kinds": ("hidden",)})
    assert lim.n_facts == 1 and lim.kinds == ("hidden",)


def test_load_known_formats(tmp_path):
    known = [{"known_id": 5, "subject": "A", "attribute": "B", "template": "{} is in", "prompt": "A is in"}]
    cf = [
        {
            "case_id": 7,
            "requested_rewrite": {
                "prompt": "{} is in",
                "subject": "X",
                "target_new": {"str": "Y"},
                "target_true": {"str": "Z"},
            },
        }
    ]
    assert load_known(known)[0].key == "5"
    f = load_known(cf)[0]
    assert (f.prompt, f.subject, f.attribute, f.key) == ("X is in", "X", "Z", "7")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "A"}]))
    with pytest.raises(TraceError, match="record 0"):
        load_known(bad)
    with pytest.raises(TraceError, match="not found"):
        load_known(tmp_path / "missing.json")
