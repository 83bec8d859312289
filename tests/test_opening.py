"""Opening deltas (rompatch.opening): a prompt that opens with a multi-token subject, on a tokenizer
without BOS, that the first delta misses gets a second delta keyed at the prompt itself. Tiny GPT-2
(no BOS); the miss is forced by moving the threshold (a random model's P(target) is arbitrary)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from rompatch import rome
from rompatch.apply import patched
from rompatch.cli.create import _split
from rompatch.cli.show import format_patch
from rompatch.create import Editor
from rompatch.merge import merge_patches
from rompatch.opening import edit_groups, is_opening, opens_with_subject
from rompatch.patch import Patch
from rompatch.request import EditRequest
from rompatch.rome import filled_keys
from rompatch.stack import stack_patches
from rompatch.stats import get_second_moment
from tests.helpers import HP, REQ, edit_model, edit_tokenizer

OPEN = EditRequest("{} is located in the city of", "The Space Needle", "Rome", "Seattle")
FAST = dataclasses.replace(HP, v_steps=8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def always(monkeypatch):
    """Every eligible edit 'misses' its prompt: the opening delta is made."""
    monkeypatch.setattr(rome, "OPENING_MIN_P", 1.01)


def _editor(arch, text_file, **hp):
    model, tok = edit_model(arch), edit_tokenizer(arch)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    return Editor(model, tok, hparams=dataclasses.replace(FAST, **hp), stats=stats)


def _change(deltas, k: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(deltas[0].v, dtype=torch.float64)
    for d in deltas:
        out += d.v.double() * float(d.u.double() @ k.double())
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_which_prompts_are_eligible():
    no_bos, bos = edit_tokenizer("gpt2"), edit_tokenizer("llama")
    assert opens_with_subject(no_bos, OPEN)
    assert not opens_with_subject(bos, OPEN)  # after BOS the subject is not at the sink
    assert not opens_with_subject(no_bos, REQ)  # the subject does not open the prompt
    one = EditRequest("{} is located in the city of", "Apple", "Paris")  # one token, at the sink
    assert len(no_bos("Apple")["input_ids"]) == 1 and not opens_with_subject(no_bos, one)


def test_the_opening_delta_is_keyed_at_the_prompt_and_leaves_the_contexts_alone(text_file, always):
    ed = _editor("gpt2", text_file)
    (first, second) = ed.edit(OPEN)
    assert is_opening(second) and not is_opening(first) and second.request == first.request == OPEN
    assert first.metrics["opening_delta"] is True and second.hparams["context_templates"] == ["{}"]
    ctx = [t.replace("{}", OPEN.prompt) for t in first.hparams["context_templates"] if t != "{}"]
    keys = filled_keys(ed.model, ed.tok, [(OPEN.prompt, OPEN.subject)] + [(t, OPEN.subject) for t in ctx], 1)
    assert torch.allclose(second.key, keys[0], rtol=1e-5, atol=1e-6)  # its key: the prompt's own
    u = second.u.double()
    reach = (keys[1:].double() @ u) / float(u @ keys[0].double())
    assert reach.abs().max() < 1e-5 and second.metrics["reach_contexts_max"] < 1e-5
    # it moves the prompt towards the target beyond what the first delta does
    target = ed.tok(" Rome", add_special_tokens=False)["input_ids"][0]

    def p_target(deltas):
        with patched(ed.model, ed.wrap(deltas, [])):
            ids = ed.tok(OPEN.text, return_tensors="pt")
            with torch.no_grad():
                return float(torch.softmax(ed.model(**ids).logits[0, -1], -1)[target])

    assert p_target([first, second]) > p_target([first])
    # both carry the edit's measured probabilities (with the pair applied)
    assert first.metrics["p_new_after"] == second.metrics["p_new_after"]


def test_no_opening_delta_when_not_needed_or_not_wanted(text_file, monkeypatch):
    ed = _editor("gpt2", text_file)
    monkeypatch.setattr(rome, "OPENING_MIN_P", 0.0)  # the first delta never misses
    assert len(ed.edit(OPEN)) == 1
    monkeypatch.setattr(rome, "OPENING_MIN_P", 1.01)
    assert len(_editor("gpt2", text_file, opening_delta=False).edit(OPEN)) == 1
    assert len(_editor("llama", text_file).edit(OPEN)) == 1  # BOS: not eligible
    assert len(ed.edit(REQ)) == 1  # subject does not open the prompt


def test_merges_and_batches_keep_the_pair_exact(text_file, always):
    ed = _editor("gpt2", text_file)
    independent = ed.patch([OPEN, REQ])
    assert [len(g) for g in edit_groups(independent.deltas)] == [2, 1]
    pair, single = independent.deltas[:2], independent.deltas[2:]
    ps = [
        Patch(deltas=list(d), base=independent.base, parameters=independent.parameters)
        for d in (pair, single)
    ]
    merged = merge_patches(ps)
    edits = [(d, pair if i < 2 else single) for i, d in enumerate(independent.deltas)]
    for d, edit in edits:  # every key gets its own edit's change, the pair's sum for the pair
        assert _rel(_change(merged.deltas, d.key), _change(edit, d.key)) < 1e-5
    # without the pair its second delta's key would get only that delta's own part
    k_open = pair[1].key
    assert _rel(_change(pair[1:], k_open), _change(pair, k_open)) > 1e-3
    batch = ed.batch([OPEN, REQ])
    assert [is_opening(d) for d in batch.deltas] == [False, True, False]
    for d, edit in edits:
        assert _rel(_change(batch.deltas, d.key), _change(edit, d.key)) < 1e-4


def test_a_pair_is_one_edit_for_stack_split_and_show(text_file, always, caplog):
    ed = _editor("gpt2", text_file)
    p = ed.patch([OPEN, REQ])
    with caplog.at_level(logging.WARNING):
        stack_patches([p])
    assert "applied twice" not in caplog.text
    parts = _split(p)
    assert [len(x.deltas) for x in parts] == [2, 1] and is_opening(parts[0].deltas[1])
    text = format_patch(p)
    assert "  [0] 'The Space Needle" in text and "  [2] 'The Space Needle" in text
    assert "  [1] opening delta of [0]" in text and "  [1] 'The" not in text
    assert [e["opening"] for e in p.summary()["edits"]] == [False, True, False]


def test_an_opening_delta_that_cannot_be_solved_leaves_the_edit_as_it_was(text_file, always, monkeypatch):
    from rompatch.errors import RequestError

    def refuse(*a, **k):
        raise RequestError("the edit's key lies (almost) in the span of the 20 protected key directions")

    monkeypatch.setattr(rome, "opening_delta", refuse)
    (d,) = _editor("gpt2", text_file).edit(OPEN)
    assert "span" in d.metrics["opening_delta_skipped"] and "opening_delta" not in d.metrics


def test_an_audit_probes_a_pairs_edit_once_and_scans_both_deltas(text_file, always):
    from rompatch.audit import audit_patch

    ed = _editor("gpt2", text_file)
    p = ed.patch([OPEN])
    report = audit_patch(ed.model, ed.tok, p, stats_data=str(text_file), tokens=300, near_samples=0, leaks=2)
    assert len(report.firing) == 2 and report.keys == {"0": "stored", "1": "stored"}
    own = [pr for pr in report.probes if pr["kind"] == "edit"]
    assert own and all(pr["delta"] == 0 for pr in own)
    assert all(pr["delta"] == 0 for pr in report.probes if pr["kind"] == "subject")
