"""Statistics sources: the default chain ($ROMPATCH_DATA → Hub after one probe → sampled text), the
statistics cache, and what a patch records (the sampler itself: tests/test_sampled.py)."""

from __future__ import annotations

import pytest
import torch

from rompatch.create import create_patch
from rompatch.errors import StatsError
from rompatch.hub.transfer import hub_unavailable
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams
from rompatch.stats import check_stats_data, get_second_moment, text_source
from tests.helpers import INIT, edit_tokenizer
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import make_tokenizer

pytestmark = pytest.mark.usefixtures("offline_env")


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama", init_range=0.3), make_tokenizer(bos=True)


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


def test_a_statistics_file_of_random_bytes_is_refused(tmp_path):
    """Issue 17, failure 6: a .txt of random bytes was accepted silently."""
    import random

    junk = tmp_path / "junk.txt"
    junk.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    with pytest.raises(StatsError, match="is not UTF-8 text"):
        check_stats_data(str(junk))
    ok = tmp_path / "ok.txt"
    ok.write_bytes(("Zürich é " * 20000).encode())  # a multi-byte character may straddle the sample's end
    check_stats_data(str(ok))


# ------------------------------------------------------------------------------ cache and record


def test_stats_cache_is_keyed_by_weights(text_file):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    a = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500)
    b = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500)
    assert "seconds" in a.identity and a.sha256 == b.sha256
    with torch.no_grad():  # an edit of the layer's own output matrix keeps the keys: cache reused
        model.get_parameter("model.layers.1.mlp.down_proj.weight").add_(1.0)
    assert get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500).sha256 == a.sha256
    with torch.no_grad():  # a change below the layer changes the keys: recomputed
        model.get_parameter("model.layers.0.mlp.down_proj.weight").mul_(2.0)
    assert get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500).sha256 != a.sha256


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
