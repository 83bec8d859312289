"""Fixtures of the tracing tests: the tiny byte-level BPE tokenizer, without and with BOS."""

from __future__ import annotations

import pytest

from tests.helpers.tiny_tokenizer import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_bos():
    return make_tokenizer(bos=True)
