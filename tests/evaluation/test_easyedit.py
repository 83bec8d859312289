"""EasyEdit's CounterFact records converted to full CounterFact records (rompatch.evaluation.easyedit)."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from rompatch.constants import data_dir
from rompatch.errors import EvalError
from rompatch.evaluation.easyedit import (
    BRACE,
    MISSING_FIELD,
    SUBJECT_NOT_IN_PROMPT,
    from_easyedit,
    is_easyedit_counterfact,
    load_easyedit_counterfact,
)
from rompatch.request import EditRequest


def ee(case_id=8, prompt="What is the twin city of Wellington? It is", subject="Wellington", **kw):
    rec = {
        "case_id": case_id,
        "prompt": prompt,
        "target_new": "Sheffield",
        "subject": subject,
        "ground_truth": "Sydney",
        "rephrase_prompt": "Wellington's twin city has famous tourist attractions including",
        "locality_prompt": "The twin city of Seoul is",
        "locality_ground_truth": "Sydney",
    }
    rec.update(kw)
    return rec


def test_converts_to_the_counterfact_schema():
    [r] = from_easyedit([ee()])
    assert r == {
        "case_id": 8,
        "requested_rewrite": {
            "prompt": "What is the twin city of {}? It is",
            "subject": "Wellington",
            "target_new": {"str": "Sheffield"},
            "target_true": {"str": "Sydney"},
        },
        "paraphrase_prompts": ["Wellington's twin city has famous tourist attractions including"],
        "neighborhood_prompts": ["The twin city of Seoul is"],
    }
    req = EditRequest.from_dict(r)  # what the editors and measure_case read
    assert req.text == "What is the twin city of Wellington? It is"
    assert (req.target_new, req.target_true, req.case_id) == ("Sheffield", "Sydney", "8")


def test_first_occurrence_only_and_list_prompts():
    [r] = from_easyedit(
        [ee(prompt="Paris is in France; Paris is", subject="Paris", locality_prompt=["a", "b"])]
    )
    assert r["requested_rewrite"]["prompt"] == "{} is in France; Paris is"
    assert r["neighborhood_prompts"] == ["a", "b"]


def test_skips_with_counted_reasons(caplog):
    records = [
        ee(1),
        ee(2, prompt="The twin city of Auckland is"),  # subject absent
        ee(3, prompt="What is {Wellington}?"),
        ee(4, target_new=""),
        {"case_id": 5, "prompt": "x"},
        "not a record",
        ee(7, rephrase_prompt=[]),
    ]
    skipped = Counter()
    with caplog.at_level(logging.WARNING, logger="rompatch.evaluation.easyedit"):
        out = from_easyedit(records, skipped=skipped)
    assert [r["case_id"] for r in out] == [1]
    assert skipped == {SUBJECT_NOT_IN_PROMPT: 1, BRACE: 1, MISSING_FIELD: 4}
    assert "skipped 6 EasyEdit records" in caplog.text


def test_locality_ground_truth_that_differs_keeps_target_true(caplog):
    differs = []
    with caplog.at_level(logging.WARNING, logger="rompatch.evaluation.easyedit"):
        [r] = from_easyedit([ee(locality_ground_truth="Canberra")], locality_differs=differs)
    assert r["requested_rewrite"]["target_true"] == {"str": "Sydney"}
    assert r["locality_ground_truth"] == "Canberra" and differs == [8]
    assert "1 records have a locality_ground_truth" in caplog.text


def test_is_easyedit_counterfact():
    assert is_easyedit_counterfact(ee())
    assert not is_easyedit_counterfact({"case_id": 1, "requested_rewrite": {}})
    assert not is_easyedit_counterfact({k: v for k, v in ee().items() if k != "rephrase_prompt"})
    assert not is_easyedit_counterfact(["a"])


def test_load_and_one_line_errors(tmp_path):
    f = tmp_path / "cf.json"
    f.write_text(json.dumps([ee(1), ee(2, prompt="no subject here"), ee(3), ee(4)]))
    assert [r["case_id"] for r in load_easyedit_counterfact(f)] == [1, 3, 4]
    assert [r["case_id"] for r in load_easyedit_counterfact(f, limit=2)] == [1, 3]
    cases = {
        "missing.json": None,
        "bad.json": "[{",
        "dict.json": json.dumps({"a": 1}),
        "empty.json": "[]",
        "full.json": json.dumps([{"case_id": 1, "requested_rewrite": {}}]),
        "none.json": json.dumps([ee(1, prompt="no subject")]),
    }
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(EvalError) as e:
            load_easyedit_counterfact(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value), name


def test_the_real_file():
    d = data_dir()
    path = None if d is None else d / "counterfact" / "easyedit" / "counterfact-train.json"
    if path is None or not path.is_file():
        pytest.skip("needs $ROMPATCH_DATA/counterfact/easyedit/counterfact-train.json")
    raw = json.loads(path.read_text())
    skipped, differs = Counter(), []
    out = from_easyedit(raw, skipped=skipped, locality_differs=differs)
    # measured on the file: every record converts, and locality_ground_truth == ground_truth in all
    assert len(out) == len(raw) == 9903 and not skipped and not differs
    for r in out[:200]:
        req = EditRequest.from_dict(r)
        assert req.text == raw[out.index(r)]["prompt"]
    assert [r["case_id"] for r in load_easyedit_counterfact(path, limit=3)] == [x["case_id"] for x in raw[:3]]
