"""Statistics sources: the default chain ($ROMPATCH_DATA → Hub after one probe → sampled text), text
the model samples itself (seeded, cached per batch, extendable), and what a patch records."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from rompatch.create import create_patch
from rompatch.errors import StatsError
from rompatch.hub.transfer import hub_unavailable
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams
from rompatch.sampled import SamplerSettings, sampled_chunks, sampler_identity
from rompatch.stats import check_stats_data, get_second_moment, text_source
from tests.tiny import make_model
from tests.tiny_tokenizer import make_tokenizer


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROMPATCH_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama", init_range=0.3), make_tokenizer(bos=True)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------- the default chain


def test_default_without_data_or_hub_is_sampled_text_and_says_why(tiny):
    model, tok = tiny
    lines = []
    sm = get_second_moment(model, tok, 1, n_tokens=2048, notify=lines.append)
    assert sm.identity["data_source"] == "sampled" and sm.count == 2048
    assert len(lines) == 1
    assert "sampled from the model" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert "$ROMPATCH_DATA is not set" in lines[0]


def test_wikitext_under_rompatch_data_comes_first(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    root = tmp_path / "data" / "wikitext-2"
    (root / "raw").mkdir(parents=True)
    words = "the city of rome is located in italy and the tower".split()
    (root / "raw" / "wiki.test.raw").write_text(
        "\n".join(" ".join(words[i:] + words[:i]) for i in range(10)) * 40
    )
    (root / "wiki.valid.tokens").write_text(" the tower @-@ city \n" * 50)
    monkeypatch.setenv("ROMPATCH_DATA", str(tmp_path / "data"))
    src = text_source(None, model=model, tok=tok)
    assert src.identity["source"] == "wikitext-2:test-raw+valid" and "ROMPATCH_DATA" in src.reason


def test_rompatch_data_without_wikitext_falls_back_and_names_the_folder(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("ROMPATCH_DATA", str(tmp_path))
    src = text_source(None, model=model, tok=tok)
    assert src.identity["source"] == "sampled" and "no WikiText-2 under $ROMPATCH_DATA" in src.reason


def test_unreachable_hub_is_decided_by_one_quick_probe(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    why = hub_unavailable("Salesforce/wikitext", repo_type="dataset")
    assert time.perf_counter() - t0 < 5
    assert why is not None and "did not answer" in why
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


def test_offline_is_answered_without_a_request(monkeypatch):
    def no_request(*a, **k):
        raise AssertionError("no request may be sent when HF_HUB_OFFLINE is set")

    monkeypatch.setattr("huggingface_hub.get_session", no_request)
    assert hub_unavailable("Salesforce/wikitext", repo_type="dataset") == "HF_HUB_OFFLINE is set"


def test_hub_without_the_dataset_falls_back_to_sampled(hub_env, tiny, monkeypatch):
    """The project's test Hub answers, but holds no WikiText: the probe says so (HTTP 404)."""
    model, tok = tiny
    why = hub_unavailable("Salesforce/wikitext", repo_type="dataset")
    assert why is not None and "HTTP 404" in why
    monkeypatch.setattr("rompatch.stats.hub_unavailable", lambda *a, **k: why)
    assert text_source(None, model=model, tok=tok).identity["source"] == "sampled"


def test_no_model_and_no_source_is_a_clear_error():
    with pytest.raises(StatsError, match="no statistics text.*--stats-data"):
        text_source(None)


def test_check_stats_data_is_cheap_and_strict(tmp_path):
    check_stats_data(None)
    check_stats_data("sampled:3")
    with pytest.raises(StatsError, match="no such file"):
        check_stats_data(str(tmp_path / "missing.txt"))


# --------------------------------------------------------------------------------- sampled text


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


def test_patch_records_the_sampled_source(tiny):
    model, tok = tiny
    req = EditRequest("The Space Needle is located in {}", "the city of", "Rome", "Seattle")
    hp = ROMEHyperParams(layer=1, v_steps=3, context_length_params=((3, 1),), max_update_ratio=0)
    p = create_patch(model, tok, req, hparams=hp, stats_data="sampled:5", stats_tokens=1024)
    s = p.deltas[0].stats
    assert s["data_source"] == "sampled" and s["data_seed"] == 5 and s["tokens"] == 1024
    assert "seconds" not in s, "wall time is not part of the statistics' identity"
    assert p.summary()["edits"][0]["statistics"] == "text sampled from the model (seed 5), 1,024 tokens"
    assert p.deltas[0].timings["edit_seconds"] >= 0
