"""rompatch.neighbours: names near a subject, and the edit option that keeps the update away from
their keys (``ROMEHyperParams.neighbours``), on tiny models of every architecture."""

from __future__ import annotations

import dataclasses

import pytest

from rompatch.arch import NEIGHBOUR_DEFAULTS, default_neighbours
from rompatch.create import Editor
from rompatch.errors import RequestError
from rompatch.generate import sample_topk_ids, sample_topk_rounds
from rompatch.neighbours import (
    candidate_subject,
    names_in,
    near_names,
    near_subject_texts,
    neighbour_pairs,
    neighbour_template,
)
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams, compute_deltas, filled_keys
from rompatch.stats import get_second_moment
from tests.helpers import HP, REQ, edit_model, edit_tokenizer
from tests.helpers.tiny import ARCHS


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "text, name",
    [
        ("The match between Kobe Bryant", "Kobe Bryant"),
        ("he played basketball", "basketball"),
        ("during this decade: Kobe Bryant, LeBron", "LeBron"),
        ("a film by Jean-Luc Godard,", "Jean-Luc Godard"),
        ("", ""),
    ],
)
def test_candidate_subject(text, name):
    assert candidate_subject(text) == name


def test_names_in_skips_the_subject_and_sentence_openers():
    text = "Michael Jordan and Kobe Bryant. The Bulls won. He met LeBron James and Michael Jordan again."
    assert names_in(text, "Michael Jordan") == ["Kobe Bryant", "Bulls", "LeBron James"]


def test_names_in_skips_words_that_only_open_a_sentence():
    text = "Although he won. It's late. Today Kobe Bryant ran. Bulls fans cheered with Wade's team"
    assert names_in(text, "Michael Jordan") == ["Kobe Bryant", "Wade"]
    assert names_in("He met Jordan's team and Jordan", "Michael Jordan") == []


def test_neighbour_template_puts_a_sentence_before_a_leading_subject():
    assert neighbour_template(EditRequest("{} plays", "A", "b")) == "Here is a fact. {} plays"
    assert neighbour_template(EditRequest("The sport of {} is", "A", "b")) == "The sport of {} is"
    assert neighbour_pairs(EditRequest("{} plays", "A", "b"), ["X"]) == [
        ("{} plays", "X"),
        ("Here is a fact. {} plays", "X"),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_neighbour_keys_are_left_unchanged(arch, text_file):
    model, tok = edit_model(arch), edit_tokenizer(arch)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    hp = dataclasses.replace(HP, v_steps=4, neighbours=8)
    (d,) = Editor(model, tok, hparams=hp, stats=stats).patch([REQ]).deltas
    names = d.metrics["neighbours"]
    assert names, "the tiny model named no neighbours: the test would not test anything"
    assert d.hparams["neighbours"] == 8
    keys = filled_keys(model, tok, neighbour_pairs(REQ, names), 1).double()
    reach = (keys @ d.u.double()) / float(d.u.double() @ d.key.double())
    assert float(reach.abs().max()) < 1e-6  # zero up to float32 rounding of u
    assert d.metrics["neighbour_reach_before"] > 1e-3  # ... where the plain update did reach them
    assert d.metrics["neighbour_reach_after"] < 1e-6


def test_aliases_are_left_out(text_file):
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    hp = dataclasses.replace(HP, v_steps=2, neighbours=8, neighbour_max_cosine=1e-9)
    (d,) = Editor(model, tok, hparams=hp, stats=stats).patch([REQ]).deltas
    assert d.metrics["neighbours"] == [] and d.metrics["neighbours_left_out"]
    assert d.metrics["neighbour_reach_after"] == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        {"neighbours": -1},
        {"neighbour_max_cosine": 0.0},
        {"neighbour_max_cosine": 2},
        {"neighbour_min_p": -0.1},
        {"neighbour_min_p": 1.5},
    ],
)
def test_bad_neighbour_settings_are_refused(bad):
    with pytest.raises(RequestError, match="neighbour"):
        ROMEHyperParams(**bad)


def test_neighbours_default_to_the_models_measured_choice():
    """On only for the models in arch.NEIGHBOUR_DEFAULTS (Gemma-3-270m's shape); 0 for any other."""
    from transformers import Gemma3TextConfig, LlamaConfig

    assert ROMEHyperParams().neighbours is None  # resolved per model when an edit is made
    assert default_neighbours(Gemma3TextConfig(num_hidden_layers=18, hidden_size=640)) == 64
    assert default_neighbours(Gemma3TextConfig(num_hidden_layers=18, hidden_size=1152)) == 0
    assert default_neighbours(LlamaConfig(num_hidden_layers=30, hidden_size=576)) == 0  # SmolLM2-135M
    for arch in ARCHS:
        assert default_neighbours(edit_model(arch)) == 0


def test_an_edit_records_the_resolved_default(text_file, monkeypatch):
    """An edit with neighbours=None takes the model's default and records the number it used."""
    model, tok = edit_model("gemma3_text"), edit_tokenizer("gemma3_text")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    hp = dataclasses.replace(HP, v_steps=2, neighbours=None)
    (plain,) = Editor(model, tok, hparams=hp, stats=stats).patch([REQ]).deltas
    assert plain.hparams["neighbours"] == 0 and "neighbours" not in plain.metrics
    key = (model.config.model_type, model.config.num_hidden_layers, model.config.hidden_size)
    monkeypatch.setitem(NEIGHBOUR_DEFAULTS, key, 8)
    ed = Editor(model, tok, hparams=hp, stats=stats)
    assert ed.hparams.neighbours == 8
    (d,) = ed.patch([REQ]).deltas
    assert d.hparams["neighbours"] == 8 and d.metrics["neighbours"]
    explicit = dataclasses.replace(hp, neighbours=0)  # an explicit number wins over the default
    (off,) = Editor(model, tok, hparams=explicit, stats=stats).patch([REQ]).deltas
    assert off.hparams["neighbours"] == 0 and "neighbours" not in off.metrics
    (direct,) = compute_deltas(model, tok, [REQ], stats=stats, hparams=hp)  # the engine resolves it too
    assert direct.hparams["neighbours"] == 8


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("n_prompts, batch_size", [(3, 16), (5, 4)])  # one batch; more prompts than a batch
def test_rounds_sample_what_separate_calls_sample(arch, n_prompts, batch_size):
    model, tok = edit_model(arch), edit_tokenizer(arch)
    prompts = ["The Eiffel Tower is in", "Paris", "Michael Jordan plays the sport of", "A", "B c"][:n_prompts]
    kw = dict(max_out_len=12, top_k=5, batch_size=batch_size)
    rounds = sample_topk_rounds(model, tok, prompts, seeds=[3, 4, 9], **kw)
    alone = [sample_topk_ids(model, tok, prompts, seed=s, **kw) for s in (3, 4, 9)]
    assert rounds == alone
    assert rounds[0] != rounds[1]  # the rounds differ: each has its own seed


@pytest.mark.parametrize("limit", [1, 5, 40])
def test_near_names_are_the_names_of_round_after_round(limit):
    """Batching the rounds changes nothing: the names are those of rounds sampled one by one,
    stopped at the first round that reaches ``limit``."""
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    expected: list[str] = []
    for r in range(8):
        for seq in near_subject_texts(model, tok, "Michael Jordan", samples=2, new_tokens=32, seed=7 + r):
            text = tok.decode(seq, skip_special_tokens=True)
            expected += [n for n in names_in(text, "Michael Jordan") if n not in expected]
        if len(expected) >= limit:
            break
    assert expected, "the tiny model named nobody: the test would not test anything"
    assert near_names(model, tok, "Michael Jordan", limit=limit, seed=7) == expected[:limit]


def _edit(text_file, **kw):
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    # a tight cap: every update ends at it, so an edit kept away from its neighbours misses its fact
    hp = dataclasses.replace(HP, v_steps=6, neighbours=8, max_update_ratio=0.5, **kw)
    (d,) = Editor(model, tok, hparams=hp, stats=stats).patch([REQ]).deltas
    return model, tok, d


def test_an_edit_that_misses_its_fact_lets_go_of_its_neighbours(text_file):
    _, _, kept = _edit(text_file, neighbour_min_p=0.0)  # never let go: today's constrained edit
    model, tok, d = _edit(text_file, neighbour_min_p=1.0)  # every capped edit has missed
    m, first = d.metrics, kept.metrics
    assert first["delta_capped"] and "neighbours_released" not in first
    assert m["neighbours_released"], "nothing was let go: the test would not test anything"
    assert sorted(m["neighbours"] + m["neighbours_released"]) == sorted(first["neighbours"])
    assert m["p_prompt_with_all_neighbours"] == first["p_prompt_after_opt"]
    assert m["p_prompt_after_opt"] > first["p_prompt_after_opt"]  # the attempt kept is the better one
    if m["neighbours"]:  # the names still kept are still left exactly unchanged
        keys = filled_keys(model, tok, neighbour_pairs(REQ, m["neighbours"]), 1).double()
        reach = (keys @ d.u.double()) / float(d.u.double() @ d.key.double())
        assert float(reach.abs().max()) < 1e-6
    assert d.seconds > 0


def test_an_edit_that_reaches_its_fact_keeps_every_neighbour(text_file):
    _, _, d = _edit(text_file, neighbour_min_p=1e-9)  # P(target) is above this after any attempt
    assert d.metrics["neighbours"] and "neighbours_released" not in d.metrics
