"""bench/bench_zsre_gemma.py (issue 15, point 4): how it tabulates a partial and a complete run
(fake per-record results; no model, no $ROMPATCH_DATA)."""

from __future__ import annotations

import json

from bench import bench_zsre_gemma


def _case(i: int) -> dict:
    return {
        "kind": "zsre",
        "case_id": i,
        "pre": {"efficacy": 0.0, "paraphrase": 0.5, "specificity": 0.25},
        "post": {"efficacy": 1.0, "paraphrase": 1.0, "specificity": 0.25},
        "edit": {"seconds": 10.0 + i, "delta_capped": i % 2 == 0},
    }


def _run_with(tmp_path, monkeypatch, ids):
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(_case(i)) + "\n" for i in ids))
    monkeypatch.setattr(bench_zsre_gemma, "RUN", tmp_path)
    out = bench_zsre_gemma.run()
    return out, {r["metric"]: r for r in out["rows"]}


def test_partial_run_names_the_records_it_holds_and_how_to_resume(tmp_path, monkeypatch):
    out, rows = _run_with(tmp_path, monkeypatch, [0, 1, 2, 5])
    assert "Partial: 4 of 737 records (ids 0-2, 5;" in out["setup"]
    assert rows["records evaluated"]["value"] == 4
    assert rows["records evaluated"]["note"].startswith("the run resumes: ")
    assert rows["zsRE Efficacy"]["value"] == "0.0 → 100.0"
    assert rows["updates at the size cap (‖ΔW‖₂ = ‖W‖₂)"]["value"] == "2 of 4"


def test_complete_run_gives_the_command_to_reproduce_it(tmp_path, monkeypatch):
    out, rows = _run_with(tmp_path, monkeypatch, range(bench_zsre_gemma.TOTAL))
    assert "Partial" not in out["setup"]
    assert rows["records evaluated"]["note"].startswith("reproduce: ")
    assert "resumes: " not in rows["records evaluated"]["note"].split("`")[0]
    assert rows["zsRE Specificity"]["value"] == "25.0 → 25.0"
