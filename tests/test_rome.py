"""The ROME engine (rompatch/rome.py): compute_delta, the suffix replay, the spectral-norm cap, and no
module-level memos."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rompatch.fingerprint import TensorMemo
from rompatch.request import EditRequest
from rompatch.rome import compute_delta
from rompatch.stats import get_second_moment
from rompatch.tokens import subject_span
from tests.helpers import HP, INIT, REQ, edit_model, edit_tokenizer
from tests.helpers.tiny import ARCHS, make_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def test_subject_at_position_zero_without_bos(text_file):
    model, tok = make_model("gpt2", init_range=INIT), edit_tokenizer("gpt2")
    req = EditRequest("{} Eiffel Tower is located in the city of", "The", "Rome")
    assert subject_span(tok, req.prompt, req.subject)[1:] == (0, 0)
    res = compute_delta(
        model,
        tok,
        req,
        stats=get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500),
        hparams=HP,
    )
    assert res.hparams["templates_dropped_position0"] == ["{}"]
    assert "{}" not in res.hparams["context_templates"]


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_matches_a_full_forward(arch):
    """The optimisation's suffix-only replay gives the full forward's logits and δ-gradients."""
    from rompatch.arch import get_spec
    from rompatch.hooks import Trace
    from rompatch.rome import _frozen, _Replay
    from rompatch.tokens import pad_id

    model, tok = edit_model(arch), edit_tokenizer(arch)
    spec = get_spec(model)
    templates = ["Once upon a time, the {} is in", "The {} is a", "the {}"]
    spans = [subject_span(tok, t, "Space Needle") for t in templates]
    seqs = [tok(text)["input_ids"] for text, _, _ in spans]
    subj = [last for _, _, last in spans]
    reads = [(0, len(seqs[0]) - 1), (0, len(seqs[0]) - 2), (1, subj[1]), (2, len(seqs[2]) - 1)]
    with _frozen(model):
        rp = _Replay(model, spec, 1, seqs, subj, reads, pad_id(tok), torch.device("cpu"))
        assert rp.mode == "suffix" and rp.width < max(map(len, seqs))
        delta = torch.randn(model.config.hidden_size, requires_grad=True)

        def run(layout):
            mask = torch.zeros(len(seqs), layout.width, 1)
            mask[torch.arange(len(seqs)), layout.edit_col] = 1.0
            with Trace(
                model, spec.mlp_out_module(1), retain_output=False, edit_output=lambda o, n: o + mask * delta
            ):
                logits = layout.run()
            (g,) = torch.autograd.grad(logits.logsumexp(-1).sum(), delta)
            return logits.detach(), g

        got, g_got = run(rp)
        rp.mode, rp.width, rp.edit_col = "full", rp.plain_ids.shape[1], torch.tensor(subj)
        want, g_want = run(rp)
    # "full" is the plain right-padded forward with δ at each row's own subject column
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_got, g_want, rtol=1e-3, atol=1e-4)
    assert (got - rp.full_logits).abs().max() > 1e-3, "δ should move the logits"


def test_replay_falls_back_to_full_forwards(text_file, monkeypatch):
    """A replay mode that fails its check is not used; the full-forward path gives the same edit."""
    from rompatch.rome import _Replay

    model, tok = edit_model("llama"), edit_tokenizer("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    fast = compute_delta(model, tok, REQ, stats=stats, hparams=HP)
    prepare = _Replay._prepare

    def rejected(self, mode):
        prepare(self, mode)
        return False

    monkeypatch.setattr(_Replay, "_prepare", rejected)
    slow = compute_delta(model, tok, REQ, stats=stats, hparams=HP)
    assert fast.metrics["replay"] == "suffix" and slow.metrics["replay"] == "full"
    torch.testing.assert_close(slow.v, fast.v, rtol=1e-3, atol=1e-4)


def test_update_never_exceeds_the_matrix_spectral_norm(text_file):

    model, tok = edit_model("llama"), edit_tokenizer("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    free = compute_delta(model, tok, REQ, stats=stats, hparams=HP)
    w = model.get_parameter(free.parameter).detach()
    w_norm = float(torch.linalg.matrix_norm(w, ord=2))
    assert free.v.norm() > w_norm, "without the cap this edit needs more than the matrix's norm"
    for ratio in (1.0, 0.5):
        res = compute_delta(
            model, tok, REQ, stats=stats, hparams=dataclasses.replace(HP, max_update_ratio=ratio)
        )
        upd = float(torch.linalg.matrix_norm(torch.outer(res.v, res.u), ord=2))
        assert upd == pytest.approx(ratio * w_norm, rel=1e-4)
        assert res.metrics["delta_capped"] and res.hparams["max_update_ratio"] == ratio


def test_replay_tolerance_by_dtype_and_depth():
    from rompatch.rome import replay_tolerance

    assert replay_tolerance(torch.float32, 48) == 1e-3
    bf16 = replay_tolerance(torch.bfloat16, 32)
    assert bf16 == pytest.approx(4 * 2**-7 * 32**0.5)
    assert replay_tolerance(torch.bfloat16, 2) < bf16 and replay_tolerance(torch.float16, 32) < bf16


def test_no_module_level_memos():
    """Caches live on objects passed explicitly (an Editor, the statistics), not on modules."""
    import rompatch.context
    import rompatch.rome
    import rompatch.stats

    for mod in (rompatch.rome, rompatch.context, rompatch.stats):
        assert not [k for k, v in vars(mod).items() if isinstance(v, TensorMemo)], mod.__name__
