"""bench/opening_subjects.py (issue 15, point 3) and its RESULTS.md section, on a tiny random model
whose tokenizer adds no BOS (no $ROMPATCH_DATA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import bench_counterfact, bench_opening_subjects, opening_subjects
from rompatch.arch import get_spec
from rompatch.stats import get_second_moment
from tests.helpers import HP, edit_model, edit_tokenizer
from tests.helpers.evaluation import cf_record


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def test_second_delta_at_the_opening_leaves_the_context_keys_alone(text_file):
    model, tok = edit_model("gpt2"), edit_tokenizer("gpt2")
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]  # no BOS
    spec, hp = get_spec(model), dataclasses.replace(HP, v_steps=3)
    stats = get_second_moment(model, tok, hp.layer, stats_data=str(text_file))
    rec = cf_record(3, "{} is located in", "The Space Needle", "Rome", "Seattle")
    openings = [
        tok(t)["input_ids"][:4]
        for t in ("The city of Rome is", "Lionel Messi plays the sport", "The Eiffel Tower is located")
    ]
    okeys = opening_subjects.keys_of(model, spec, hp.layer, openings)
    rkeys = okeys.reshape(-1, okeys.shape[-1])
    w0 = model.get_submodule(spec.mlp_out_module(hp.layer)).weight.detach().clone()
    c = opening_subjects.case(model, tok, rec, stats=stats, hp=hp, spec=spec, layer=hp.layer,
                              openings=openings, okeys=okeys, rkeys=rkeys)  # fmt: skip
    assert torch.equal(model.get_submodule(spec.mlp_out_module(hp.layer)).weight, w0)  # model left as it was
    assert c["subject_last_position"] == len(tok("The Space Needle")["input_ids"]) - 1 > 0
    assert c["u2_reach_at_context_keys"] < 1e-4  # u₂ ⟂ every context template's key
    for k in ("one_delta", "two_deltas", "pre"):
        assert set(c[k]) >= {"ES", "PS", "NS"}
    assert [v["change"] for v in c["rank_one_variants"]] == list(opening_subjects.VARIANTS)
    assert set(c["u2_reach_openings_by_position"]) == {"0", "1", "2", "3"}
    # The section renders one row per case and the variants below it.
    d = {"model": "tiny", "layer": hp.layer, "openings": 3, "running_tokens": len(rkeys), "cases": [c]}
    md = bench_opening_subjects.markdown(d)
    assert md.count(f"| 3 | The Space Needle ({c['subject_last_position']}) |") == 1
    assert md.count("- 3 The Space Needle, ") == len(opening_subjects.VARIANTS)


@pytest.mark.parametrize(
    "name, model",
    [("L4", "smollm2-135m"), ("L6-nocap-ablation", "smollm2-135m"), ("L4-nb64", "smollm2-135m"),
     ("gemma3-270m-L3", "gemma3-270m"), ("gemma3-270m-L3-nb64", "gemma3-270m")],
)  # fmt: skip
def test_counterfact_runs_are_compared_within_their_model(name, model):
    assert bench_counterfact.run_model(name) == model
