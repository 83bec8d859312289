"""Fixtures of the Hub tests: ``tiny`` (a tiny model folder and three saved steering patches) and
``no_backoff`` (huggingface_hub's retries without their sleeps).

The test Hub (tests/helpers/hubserver/) is a local HTTP server that the real huggingface_hub client talks to
through HF_ENDPOINT; ``hub_env`` (tests/helpers/hub_fixtures.py, registered by tests/conftest.py) points the
client at it with a fresh cache and HF_TOKEN set to alice's token."""

from __future__ import annotations

import pytest

from tests.helpers.hub import NoSleep
from tests.helpers.tiny_folder import steer_patches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama model folder and three saved patches that change three next-token predictions."""
    return steer_patches(tmp_path_factory.mktemp("hubtiny"))


@pytest.fixture
def no_backoff(monkeypatch):
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", NoSleep())
    monkeypatch.setattr(file_download, "time", NoSleep())
