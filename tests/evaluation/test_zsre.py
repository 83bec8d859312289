"""zsRE: teacher-forced token accuracy, the reference's edit request, before/after on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from rompatch.errors import EvalError
from rompatch.evaluation.evaluate import load_records, run_evaluation
from rompatch.evaluation.zsre import teacher_forced_correct, zsre_request
from rompatch.tokens import target_ids
from tests.helpers.evaluation import HP, ZSRE
from tests.helpers.tiny_tokenizer import make_tokenizer


class _Successor(torch.nn.Module):
    """A fake LM whose prediction after token t is table[t] (default t + 1)."""

    def __init__(self, vocab, table):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.table = vocab, table

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        nxt = torch.tensor(
            [[self.table.get(int(t), (int(t) + 1) % self.vocab) for t in row] for row in input_ids]
        )
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


def test_teacher_forced_token_accuracy_on_a_constructed_case():
    tok = make_tokenizer(bos=True)
    prompt, answer = "The capital of Japan is", "Steve Jobs founded Apple"
    p = tok(prompt)["input_ids"]
    t, _ = target_ids(tok, prompt, answer)
    assert len(t) >= 3
    # right after the prompt and after each answer token but the last one's predecessor: 1 miss
    table = {p[-1]: t[0]} | {t[i]: t[i + 1] for i in range(len(t) - 2)}
    table[t[-2]] = (t[-1] + 7) % len(tok)  # wrong prediction for the last answer token
    fake = _Successor(len(tok), table)
    (correct,) = teacher_forced_correct(fake, tok, [(prompt, answer)])
    assert correct == [True] * (len(t) - 1) + [False]


def test_zsre_request_follows_the_reference():
    req = zsre_request({**ZSRE[0], "case_id": 3})
    assert req.prompt == "The Space Needle is located in {}" and req.target_new == "Rome"
    assert zsre_request(ZSRE[0], target="alt").target_new == "Paris"
    with pytest.raises(EvalError):
        zsre_request(ZSRE[0], target="pred")


def test_zsre_token_accuracy_before_after(tiny, tmp_path):
    model, tok, stats = tiny
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(ZSRE))
    kind, recs = load_records(str(path))
    assert kind == "zsre" and [r["case_id"] for r in recs] == [0, 1]
    res = run_evaluation(model, tok, recs[:1], kind="zsre", hparams=HP, stats=stats, model_label="tiny")
    c = res["cases"][0]
    assert set(c["post"]) == {"efficacy", "paraphrase", "specificity"}
    assert c["post"]["efficacy"] == 1.0 and c["pre"]["efficacy"] < 1.0
    assert "| Editor | Efficacy | Paraphrase | Specificity |" in res["markdown"]
    assert res["summary"]["post"]["efficacy"] == 100.0 and "S" not in res["summary"]["post"]
