"""Figures of causal tracing (rompatch.tracing.plotting) and the matplotlib guard."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from rompatch.errors import MissingDependencyError, require_matplotlib
from rompatch.tracing.known_facts import save_average, trace_known
from rompatch.tracing.plotting import plot_average, plot_layer_curves, plot_trace_all, save_with_figures
from rompatch.tracing.trace import CATEGORIES, trace_fact
from tests.helpers.tracing import PROMPT, SUBJECT, known_records, tiny


def test_plots_written(tok, tmp_path):
    model = tiny("llama")
    r = trace_fact(model, tok, PROMPT, SUBJECT, noise_std=1.0, samples=2, window=2)
    files = plot_trace_all(r, tmp_path)
    assert [f.name for f in files] == ["trace-hidden.png", "trace-mlp.png", "trace-attn.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = known_records(model, tok, n=2)
    avg = trace_known(model, tok, recs, noise_std=1.0, samples=2, window=2)
    files = plot_average(avg, tmp_path)
    assert {f.name for f in files} == {
        "average-hidden.png",
        "average-mlp.png",
        "average-attn.png",
        "average-lines.png",
    }
    f = plot_layer_curves(
        {"a": (np.arange(4.0), np.ones(4)), "b": (np.zeros(4), None)}, tmp_path / "c.png", title="t"
    )
    assert f.read_bytes()[:4] == b"\x89PNG"
    save_average(avg, tmp_path)
    d = json.loads((tmp_path / "average.json").read_text())
    assert d["n_facts"] == avg.n_facts and len(d["effect"]["mlp"]) == len(CATEGORIES)


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tok, tmp_path):
    r = trace_fact(tiny("gpt2"), tok, PROMPT, SUBJECT, noise_std=1.0, samples=1, window=2, kinds=("mlp",))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'rompatch\[plot\]' \(or pass --no-plot\)"):
        require_matplotlib()
    with pytest.raises(MissingDependencyError, match="plots need matplotlib"):
        plot_trace_all(r, tmp_path)
    assert not list(tmp_path.iterdir())


def test_save_with_figures(tok, tmp_path):
    r = trace_fact(tiny("gpt2"), tok, PROMPT, SUBJECT, noise_std=1.0, samples=1, window=2, kinds=("mlp",))
    names = [f.name for f in save_with_figures(r, tmp_path, plot=False)]
    assert names == ["scores.json", "scores.npz"]
    names = [f.name for f in save_with_figures(r, tmp_path / "p", model_name="tiny")]
    assert names == ["scores.json", "scores.npz", "trace-mlp.png"]
