"""CounterFact evaluation on a tiny model: before/after scores with fluency and consistency, summaries,
reading records, and a resumed run."""

from __future__ import annotations

import json

import pytest

import rompatch.evaluation.edits as edits_mod
from rompatch.errors import EvalError
from rompatch.evaluation.evaluate import detect_kind, load_records, run_evaluation, summarize
from rompatch.evaluation.fluency import Consistency
from rompatch.evaluation.metrics import tfidf_similarity
from tests.helpers.evaluation import CF, GEN, HP, model_state


def test_counterfact_before_after_with_fluency_and_consistency(tiny, tmp_path):
    model, tok, stats = tiny
    before = model_state(model)
    snips = tmp_path / "snippets.json"
    snips.write_text(json.dumps([
        {"relation_id": "P1", "target_id": "Q1", "samples": [{"name": "x", "text": "Rome is the capital of Italy."}]},
        {"relation_id": "P1", "target_id": "Q9", "samples": [{"name": "y", "text": "Seattle has the Space Needle."}]},
    ]))  # fmt: skip
    cons = Consistency.load(snips)
    res = run_evaluation(
        model, tok, CF[:2], kind="counterfact", hparams=HP, stats=stats, generation=GEN, consistency=cons
    )
    assert model_state(model) == before, "evaluation must leave the model unchanged"
    c = res["cases"][0]
    assert set(c["pre"]) == {"ES", "EM", "PS", "PM", "NS", "NM", "GE", "RS"} == set(c["post"])
    expected_rs = tfidf_similarity(
        " ".join(c["generations"]["post"]), "Rome is the capital of Italy.", cons.tfidf
    )
    assert c["post"]["RS"] == pytest.approx(expected_rs)
    assert c["post"]["ES"] == 1.0 and c["post"]["EM"] > c["pre"]["EM"]
    assert len(c["generations"]["pre"]) == len(CF[0]["generation_prompts"])
    assert c["generations"]["pre"][0].startswith("The Space Needle is")
    assert c["pre"]["GE"] > 0
    s = res["summary"]
    assert s["n"] == 2 and "S" in s["pre"] and "S" in s["post"] and "GE" in s["post"]
    assert s["post"]["ES"] == pytest.approx(100 * sum(x["post"]["ES"] for x in res["cases"]) / 2)
    md = res["markdown"]
    assert "| Editor | Score S | Efficacy ES" in md and "model (unedited)" in md and "ROME (layer 1)" in md
    assert "RS: TF-IDF cosine" in md and res["summary"]["post"]["RS"] is not None
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(EvalError, match="attribute_snippets format"):
        Consistency.load(tmp_path / "bad.json")


def test_summarize_keeps_old_records_working():
    old = {"pre": {"ES": 0.0, "EM": -0.1, "PS": 0.5, "PM": 0.0, "NS": 1.0, "NM": 0.2},
           "post": {"ES": 1.0, "EM": 0.6, "PS": 1.0, "PM": 0.3, "NS": 0.5, "NM": 0.1}}  # fmt: skip
    s = summarize([old, old])
    assert s["post"]["ES"] == 100.0 and s["post"]["S"] == pytest.approx(
        3 / (1 / 100 + 1 / 100 + 1 / 50), abs=0.01
    )
    assert s["pre"]["S"] == 0.0 and "GE" not in s["pre"]


def test_load_records_detects_and_refuses(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(CF))
    assert load_records(str(p), limit=2)[0] == "counterfact" and len(load_records(str(p), limit=2)[1]) == 2
    with pytest.raises(EvalError, match="holds counterfact records, not zsre"):
        load_records(str(p), kind="zsre")
    with pytest.raises(EvalError, match="cannot tell the data kind"):
        detect_kind([{"foo": 1}])
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(EvalError, match="not valid JSON"):
        load_records(str(bad))


def test_resume_after_interruption_recomputes_nothing(tiny, tmp_path, monkeypatch):
    model, tok, stats = tiny
    out = tmp_path / "run"
    calls = []
    real = edits_mod.edit_patch
    monkeypatch.setattr(edits_mod, "edit_patch", lambda *a, **k: calls.append(1) or real(*a, **k))

    class Interrupt(Exception):
        pass

    def stop_after(k):
        seen = []

        def on_case(c):
            seen.append(c)
            if len(seen) == k:
                raise Interrupt

        return on_case

    cfg = {"test": 1}
    with pytest.raises(Interrupt):
        run_evaluation(model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config=cfg,
                       on_case=stop_after(1))  # fmt: skip
    lines = (out / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 1 and len(calls) == 1 and not (out / "results.json").exists()
    first = json.loads(lines[0])
    # a write cut off mid-line is dropped and that case recomputed
    with open(out / "cases.jsonl", "a") as f:
        f.write('{"case_id": 9, "pre": {')
    res = run_evaluation(model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config=cfg)
    assert len(calls) == 3 and res["computed"] == 2
    assert [c["case_id"] for c in res["cases"]] == [7, 9, 11] and res["cases"][0] == first
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == res["summary"] and (out / "summary.md").read_text().startswith("| Editor |")
    # a complete rerun computes nothing
    again = run_evaluation(
        model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config=cfg
    )
    assert again["computed"] == 0 and len(calls) == 3 and again["summary"] == res["summary"]
    # another configuration is refused instead of mixed in
    with pytest.raises(EvalError, match="different evaluation"):
        run_evaluation(
            model, tok, CF, kind="counterfact", hparams=HP, stats=stats, out_dir=out, config={"test": 2}
        )
