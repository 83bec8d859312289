"""bench/local_edits.py and its RESULTS.md section on a tiny random model (no $ROMPATCH_DATA)."""

from __future__ import annotations

import dataclasses

import pytest

from bench import bench_local_edits, local_edits
from tests.helpers import HP, edit_model, edit_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def test_a_table_with_and_without_neighbours(text_file):
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    hp = dataclasses.replace(HP, v_steps=3)
    entries = []
    for n in (0, 4):
        out = local_edits.run_table(model, tok, "athletes", n, hparams=hp, stats_data=str(text_file))
        names = local_edits.TABLES["athletes"]["neighbours"]
        for k in ("bare", "in context"):
            assert 0 <= out[k]["n_flipped"] == len(out[k]["flipped"]) <= len(names)
            assert set(out[k]["flipped"]) <= set(names)
            assert len(out[k]["p_target_after"]) == len(names)
        assert len(out["own"]["p_target_after"]) == 2
        assert (out["neighbours_used"] == []) == (n == 0)
        entries.append(
            {"config": {"model": "tiny", "table": "athletes", "neighbours": n, "names": names}, **out}
        )
    table = bench_local_edits.markdown(entries)
    assert table.count("| tiny | athletes |") == 2
