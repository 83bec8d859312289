"""EditRequest: bad requests are refused when they are made."""

from __future__ import annotations

import pytest

from rompatch.errors import RequestError
from rompatch.request import EditRequest


def test_prompt_without_placeholder():
    with pytest.raises(RequestError, match=r"must contain exactly one '\{\}'"):
        EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome")


def test_empty_target():
    with pytest.raises(RequestError, match="target_new is empty"):
        EditRequest("{} is in", "The Eiffel Tower", "  ")
