"""End-to-end edits on the real embedded models (SmolLM2-135M and Gemma-3-270m), with the statistics
that are always there (text the model samples itself), so they run alike with or without data."""

from __future__ import annotations

import pytest

from rompatch.apply import patched
from rompatch.create import create_patch
from rompatch.fingerprint import tensor_sha256
from rompatch.predict import greedy
from rompatch.request import EditRequest

pytestmark = pytest.mark.slow

EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def test_smollm2_eiffel_tower_to_rome(smollm2):
    model, tok = smollm2
    before = {k: tensor_sha256(v) for k, v in model.state_dict().items()}
    japan = greedy(model, tok, "The capital of Japan is", max_new_tokens=2)
    assert greedy(model, tok, EIFFEL.text, max_new_tokens=2).startswith(" Paris")
    patch = create_patch(model, tok, EIFFEL, stats_data="sampled")
    assert patch.deltas[0].stats["data_source"] == "sampled"
    assert {k: tensor_sha256(v) for k, v in model.state_dict().items()} == before, (
        "create must not change the model"
    )
    d = patch.deltas[0]
    assert d.layer == 4 and d.parameter == "model.layers.4.mlp.down_proj.weight"
    assert d.metrics["p_new_after"] > 0.5 > d.metrics["p_new_before"]
    assert d.metrics["update_spectral_norm"] < d.metrics["weight_spectral_norm"]
    with patched(model, patch):
        assert greedy(model, tok, EIFFEL.text, max_new_tokens=2).startswith(" Rome")
        assert greedy(model, tok, "The capital of Japan is", max_new_tokens=2) == japan
    assert greedy(model, tok, EIFFEL.text, max_new_tokens=2).startswith(" Paris")


@pytest.fixture(scope="module")
def gemma():
    from rompatch.models import load_model

    return load_model("gemma3-270m", device="cpu")


def test_gemma3_bos_and_left_padding_edit(gemma):
    """Gemma's tokenizer adds <bos> and pads on the left: subject lookup and targets must still be right."""
    model, tok = gemma
    assert tok.padding_side == "left" and tok("x")["input_ids"][0] == tok.bos_token_id
    assert greedy(model, tok, EIFFEL.text, max_new_tokens=2).startswith(" Paris")
    patch = create_patch(model, tok, EIFFEL, stats_data="sampled")
    d = patch.deltas[0]
    assert d.hparams["neighbours"] == 64 and d.metrics["neighbours"], (
        "Gemma-3-270m's default keeps neighbours"
    )
    with patched(model, patch):
        assert greedy(model, tok, EIFFEL.text, max_new_tokens=2).startswith(" Rome")
        assert greedy(model, tok, "The capital of Japan is", max_new_tokens=2).startswith(" Tokyo")
