"""Fixtures of the evaluation tests: a tiny model with statistics, in a cache of their own."""

from __future__ import annotations

import pytest

from rompatch.stats import get_second_moment
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import make_tokenizer


@pytest.fixture(scope="package", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROMPATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="package")
def tiny(text_file, _cache):
    model, tok = make_model("llama", init_range=0.3), make_tokenizer(bos=True)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=2000)
    return model, tok, stats
