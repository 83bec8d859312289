"""Next-token predictions on the real default model."""

from __future__ import annotations

import pytest

from rompatch.predict import top_next_tokens

pytestmark = pytest.mark.slow


def test_top_next_tokens_are_probabilities(smollm2):
    model, tok = smollm2
    top = top_next_tokens(model, tok, "The capital of France is", k=5)
    assert len(top) == 5 and all(0 < p <= 1 for _, p in top) and sum(p for _, p in top) <= 1.0001
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
