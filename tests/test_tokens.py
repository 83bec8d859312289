"""Tokenization of prompts, subjects and targets (rompatch.tokens), and the one rule that editing and
tracing share: a trace measures the target ids an edit would write, at the subject tokens it keys on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rompatch.errors import RequestError
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams, _build_prompts
from rompatch.tokens import find_subject, subject_span, target_ids, token_spans
from rompatch.tracing.known_facts import predicts_attribute
from rompatch.tracing.trace import CausalTracer
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import make_tokenizer

# (template, subject, target as a user or a fact file writes it). The last ones are where tracing's
# former copy differed: it kept a target's own spaces and added none after a prompt ending in one.
CASES = [
    ("{} is located in the city of", "The Eiffel Tower", "Paris"),
    ("The mother tongue of {} is", "Danielle Darrieux", "French"),
    ("{} is owned by", "Beats Music", "Apple"),
    ("{} plays the sport of", "Michael Jordan", "basketball"),
    ("The capital of {} is", "Japan", "Tokyo"),
    ("{} is located in the continent of", "Vinson Massif", " Antarctica"),
    ("{} is located in the city of", "The Space Needle", "Seattle "),
    ("{} was founded by", "Apple", "  Steve Jobs"),
    ("{} is located in the city of ", "The Colosseum", "Rome"),
]


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tok(request):
    return make_tokenizer(bos=request.param)


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.mark.parametrize("template, subject, target", CASES)
def test_tracing_and_editing_tokenize_alike(tok, model, template, subject, target):
    """Fails if tracing measures other target ids, or restores other subject tokens, than editing uses."""
    req = EditRequest(template, subject, target)
    editing = _build_prompts(tok, req, ["{}"], ROMEHyperParams())
    _, first, last = subject_span(tok, template, subject)
    tracer = CausalTracer(
        model, tok, req.text, subject, target=target, noise_std=1.0, samples=1, kinds=("hidden",)
    )
    assert tracer.answer_ids == editing.target
    assert tracer.subject_range == (first, last + 1)
    assert tracer.subject_range[1] - 1 == editing.subj_idx[0]
    assert tracer.token_ids == editing.seqs[0][: len(tracer.token_ids)]


def test_known_facts_check_the_editing_target(tok, model, monkeypatch):
    """``predicts_attribute`` (which facts a known-facts average keeps) teacher-forces editing's ids."""
    seen = []

    def forward(input_ids, **kw):
        seen.append(input_ids[0].tolist())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 8))

    monkeypatch.setattr(model, "forward", forward)
    prompt, target = "The Colosseum is located in the city of ", "Rome"
    predicts_attribute(model, tok, prompt, target)
    ids = target_ids(tok, prompt, target)[0]
    assert seen == [tok(prompt)["input_ids"] + ids[:-1]]


def test_token_spans_mark_special_tokens():
    tok = make_tokenizer(bos=True)
    ids, spans = token_spans(tok, "The Eiffel Tower")
    assert ids[0] == tok.bos_token_id and spans[0] == (0, 0)
    assert all(e > s for s, e in spans[1:])
    assert "".join("The Eiffel Tower"[s:e] for s, e in spans) == "The Eiffel Tower"


def test_find_subject():
    tok = make_tokenizer(bos=True)
    text = "The Eiffel Tower is located in the city of"
    assert (
        find_subject(tok, text, "The Eiffel Tower")
        == subject_span(tok, "{} is located in the city of", "The Eiffel Tower")[1:]
    )
    first, last = find_subject(tok, text, "Eiffel")
    assert tok.decode(tok(text)["input_ids"][first : last + 1]).strip() == "Eiffel"
    with pytest.raises(RequestError, match="does not occur"):
        find_subject(tok, text, "Colosseum")
    with pytest.raises(RequestError, match="empty"):
        find_subject(tok, text, " ")


def test_target_ids_one_space_rule():
    tok = make_tokenizer()
    ids, how = target_ids(tok, "The capital of Japan is", "Tokyo")
    assert how == "continuation" and ids == tok(" Tokyo")["input_ids"]
    assert target_ids(tok, "The capital of Japan is", " Tokyo ")[0] == ids
    # a prompt that ends in a space: the target is still " Tokyo", tokenized on its own
    assert target_ids(tok, "The capital of Japan is ", "Tokyo") == (ids, "separate")
