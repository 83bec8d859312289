"""Files of an evaluation: JSON inputs and the JSONL records of a resumable run."""

from __future__ import annotations

import json

import pytest

from rompatch.errors import EvalError, RequestError
from rompatch.evaluation.records import append_record, read_cases, read_json, write_results


def test_read_cases_repairs_an_interrupted_jsonl(tmp_path):
    p = tmp_path / "cases.jsonl"
    p.write_text('{"case_id": 1}\n{"case_id": 2')  # killed mid-line
    assert read_cases(p) == [{"case_id": 1}] and p.read_text() == '{"case_id": 1}\n'
    p.write_text('{"case_id": 1}\n{"case_id": 2}')  # killed before the newline
    assert read_cases(p) == [{"case_id": 1}, {"case_id": 2}] and p.read_text().endswith("}\n")
    p.write_text('{"case_id": 1\n{"case_id": 2}\n')  # damage in the middle is not guessed at
    with pytest.raises(EvalError, match="line 1 is not valid JSON"):
        read_cases(p)


def test_read_json_names_the_file_and_the_problem(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('[{"a": 1}]')
    assert read_json(good) == [{"a": 1}]
    with pytest.raises(EvalError, match=r"cannot read .*missing\.json: No such file"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(RequestError, match=r"bad\.json is not valid JSON \(.* at line 1\); fix it"):
        read_json(bad, error=RequestError, invalid="{path} is not valid JSON ({msg} at line {line}); fix it")


def test_append_record_and_write_results(tmp_path):
    append_record(tmp_path / "x.jsonl", {"case_id": 1})
    append_record(tmp_path / "x.jsonl", {"case_id": "é"})
    assert read_cases(tmp_path / "x.jsonl") == [{"case_id": 1}, {"case_id": "é"}]
    write_results(tmp_path, {"summary": {"n": 1}, "markdown": "| a |"})
    assert json.loads((tmp_path / "results.json").read_text()) == {"summary": {"n": 1}}
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == "| a |\n"
