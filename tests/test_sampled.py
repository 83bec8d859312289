"""Text the model samples itself (rompatch/sampled.py): seeded, cached per batch, extendable."""

from __future__ import annotations

import pytest
import torch

from rompatch.sampled import SamplerSettings, sampled_chunks, sampler_identity
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import make_tokenizer

pytestmark = pytest.mark.usefixtures("offline_env")


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama", init_range=0.3), make_tokenizer(bos=True)


def _chunks(model, tok, n, **kw):
    settings = SamplerSettings(seq_len=16, batch=4, **kw)
    ident = sampler_identity(model, tok, settings, "tok")
    return list(sampled_chunks(model, tok, ident, settings, n)), ident


def test_sampled_text_is_seeded_and_a_larger_budget_extends_a_smaller_one(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    small, ident = _chunks(model, tok, 16 * 4)
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "other"))  # recomputed, not read back
    large, _ = _chunks(model, tok, 16 * 10)
    assert large[: len(small)] == small and len(large) == 10
    assert all(len(c) == 16 for c in large)
    assert all(c[0] == tok.bos_token_id for c in large), "sequences start like the tokenizer's texts"
    other, _ = _chunks(model, tok, 16 * 4, seed=1)
    assert other != small
    assert ident["source"] == "sampled" and ident["seed"] == 0 and len(ident["model_sha256"]) == 64


def test_sampled_batches_are_cached_and_the_rng_is_left_alone(tiny, monkeypatch):
    model, tok = tiny
    first, _ = _chunks(model, tok, 16 * 4)
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)

    def no_generation(*a, **k):
        raise AssertionError("a cached batch must not be generated again")

    monkeypatch.setattr(model, "generate", no_generation)
    again, _ = _chunks(model, tok, 16 * 4)
    assert again == first
    assert torch.equal(torch.rand(3), expect), "sampling must not move the global RNG"


def test_sampled_text_depends_on_the_weights(tiny):
    model, tok = tiny
    other = make_model("llama", init_range=0.3, seed=1)
    a = sampler_identity(model, tok, SamplerSettings(), "t")
    b = sampler_identity(other, tok, SamplerSettings(), "t")
    assert a["model_sha256"] != b["model_sha256"]
