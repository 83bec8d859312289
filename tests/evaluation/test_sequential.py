"""Sequential editing: the chain, resume, the time limit, checkpoints and the update diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

import rompatch.evaluation.sequential as seq
from rompatch.apply import patched
from rompatch.arch import get_spec
from rompatch.evaluation.sequential import checkpoint_schedule, run_sequential, update_diagnostics
from rompatch.patch import load_patch
from rompatch.stats import SecondMoment, key_weights_sha
from tests.helpers.evaluation import CF, GEN, HP, ZSRE_PREPARED, model_state


def test_sequential_editing_with_resume(tiny, tmp_path, monkeypatch):
    model, tok, stats = tiny
    before = model_state(model)
    out = tmp_path / "seq"
    calls = []
    real = seq.edit_patch

    def counting(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted while computing the third edit
        return real(*a, **k)

    monkeypatch.setattr(seq, "edit_patch", counting)
    kw = dict(kind="counterfact", n=3, hparams=HP, stats=stats, every=1, out_dir=out, generation=GEN,
              fluency_prompts=["The capital of Japan is"])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sequential(model, tok, CF, **kw)
    assert model_state(model) == before, "an interrupted run must leave the model unchanged"
    assert len((out / "edits.jsonl").read_text().splitlines()) == 2
    res = run_sequential(model, tok, CF, **kw)
    assert len(calls) == 4, "the resumed run computes only the missing edit"
    assert model_state(model) == before
    cps = res["checkpoints"]
    assert [c["n"] for c in cps] == [0, 1, 2, 3] and cps[0]["GE"] > 0
    for c in cps[1:]:
        assert len(c["ES_by_edit"]) == c["n"] and c["pre_ES"] is not None and "GE" in c
        assert c["update_ratio"] > 0
    assert "interference_median" in cps[2] and "key_overlap_whitened_mean" in cps[3]
    assert res["edits"][0]["immediate"]["ES"] == 1.0
    # the chain on disk: each patch lists its predecessors; all computed with the base statistics
    p = [load_patch(out / "patches" / f"{i:04d}.safetensors") for i in (1, 2, 3)]
    assert p[0].lineage == [] and p[1].lineage == [p[0].id] and p[2].lineage == [p[0].id, p[1].id]
    assert {d.stats["sha256"] for q in p for d in q.deltas} == {stats.sha256}

    spec = get_spec(model)
    with patched(model, *p):  # an edit at layer 1 leaves layer 1's keys, hence C, unchanged
        assert key_weights_sha(model, 1, spec) == stats.identity["weights_sha256"]
    assert "| edits N |" in res["markdown"] and "‖ΣΔ‖₂/‖W‖₂" in res["markdown"]
    # a finished run re-applies the chain and computes nothing
    again = run_sequential(model, tok, CF, **kw)
    assert len(calls) == 4 and again["checkpoints"] == cps


def test_sequential_time_limit_stops_with_a_checkpoint_and_resumes(tiny, tmp_path):
    model, tok, stats = tiny
    out = tmp_path / "seq"
    kw = dict(kind="zsre", n=2, hparams=HP, stats=stats, checkpoints=[2], out_dir=out)
    first = run_sequential(model, tok, ZSRE_PREPARED, max_seconds=0.0, **kw)
    assert first["stopped_early"] and first["completed"] == 1
    assert [c["n"] for c in first["checkpoints"]] == [1]  # measured where it stopped, not only at marks
    c = first["checkpoints"][0]
    assert set(c) >= {"efficacy", "pre_efficacy", "specificity", "update_ratio", "efficacy_by_edit"}
    assert "Stopped early after 1 edits" in first["markdown"]
    done = run_sequential(model, tok, ZSRE_PREPARED, **kw)
    assert not done["stopped_early"] and done["completed"] == 2
    assert [c["n"] for c in done["checkpoints"]] == [1, 2] and done["edits"][0] == first["edits"][0]


def test_checkpoint_schedule():
    assert checkpoint_schedule(100, 25) == [1, 25, 50, 75, 100]
    assert checkpoint_schedule(7, 3) == [1, 3, 6, 7]
    assert checkpoint_schedule(1, 10) == [1]


class _D:
    def __init__(self, u, v):
        self.u, self.v = torch.tensor(u, dtype=torch.float32), torch.tensor(v, dtype=torch.float32)


def test_update_diagnostics_on_constructed_edits():
    # keys k1 = e1, k2 = (1, 1); u1 = e1, u2 = (0.6, 0.8); v1 = (1, 0), v2 = (0, 2); W = I.
    d1, d2 = _D([1.0, 0.0], [1.0, 0.0]), _D([0.6, 0.8], [0.0, 2.0])
    keys = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    out = update_diagnostics([d1, d2], keys, torch.eye(2), None)
    total = torch.tensor([[1.0, 0.0], [1.2, 1.6]], dtype=torch.float64)  # v1 u1ᵀ + v2 u2ᵀ
    assert out["update_ratio"] == pytest.approx(float(torch.linalg.matrix_norm(total, ord=2)), abs=1e-5)
    assert out["max_single_update_ratio"] == pytest.approx(2.0)
    # edit 2 fires on key 1 with u2·k1 = 0.6, adding 0.6·v2 (norm 1.2) where edit 1 changed ‖v1‖·1 = 1
    assert out["interference_median"] == pytest.approx(1.2) and out["interference_max"] == pytest.approx(1.2)
    assert out["key_overlap_raw_mean"] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    # whitened overlap with C = I equals the raw one

    sm = SecondMoment(mom2=torch.eye(2), count=1, identity={})
    assert update_diagnostics([d1, d2], keys, torch.eye(2), sm)["key_overlap_whitened_mean"] == pytest.approx(
        1 / math.sqrt(2), abs=1e-5
    )
    # orthogonal later edit: no interference
    d3 = _D([0.0, 1.0], [5.0, 5.0])
    out = update_diagnostics(
        [d1, d3], [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], torch.eye(2), None
    )
    assert out["interference_max"] == 0.0
