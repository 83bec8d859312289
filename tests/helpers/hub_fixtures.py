"""Pytest plugin: a fake Hugging Face Hub (``tests/helpers/hubserver/``) and an environment pointing at it.

Register it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.helpers.hub_fixtures"]``.

Fixtures:

* ``hub_server``: a started :class:`~tests.helpers.hubserver.HubServer` on ``127.0.0.1`` (free port), with the
  users of :data:`HUB_TOKENS`; stopped at teardown.
* ``hub_env``: ``hub_server`` plus an isolated ``huggingface_hub`` configuration (endpoint, token, caches
  in ``tmp_path``, telemetry and progress bars off); yields a :class:`HubEnv`.

Why patching ``HF_ENDPOINT`` is not enough with huggingface_hub 2.4.0: ``huggingface_hub.constants`` reads
the environment once, at import. Everything derived from it is frozen then: ``ENDPOINT``,
``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``/``hf_hub_download``), ``HF_URL_HOSTS``, the cache
and token paths, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_TELEMETRY``... and a few modules copied values out of
it (``utils._http._HUB_ORIGINS``, ``utils._cache_manager.HF_HUB_CACHE``, ``utils._cache_assets.HF_ASSETS_CACHE``,
``utils.tqdm.HF_HUB_DISABLE_PROGRESS_BARS``), and the module-level ``huggingface_hub.hf_api.api = HfApi()``
behind ``huggingface_hub.create_repo``, ``upload_file``... captured ``ENDPOINT`` in ``api.endpoint``.
``hub_env`` patches all of those (and sets the environment variables too, for subprocesses).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers.hubserver import HubServer

# token -> username. Tokens look like real ones so that leak checks are meaningful.
HUB_TOKENS = {
    "hf_testALICEwrite0123456789abcdefghij": "alice",
    "hf_testBOBwrite0123456789abcdefghijkl": "bob",
}
ALICE_TOKEN = "hf_testALICEwrite0123456789abcdefghij"
BOB_TOKEN = "hf_testBOBwrite0123456789abcdefghijkl"


@dataclass
class HubEnv:
    """What ``hub_env`` yields. ``HF_TOKEN`` is ``token`` (user ``user``); ``other_token`` is a second user's."""

    server: HubServer
    endpoint: str
    token: str
    user: str
    other_token: str
    other_user: str
    hf_home: Path
    cache_dir: Path
    monkeypatch: pytest.MonkeyPatch

    def set_offline(self, offline: bool = True) -> None:
        """Toggle offline mode the way huggingface_hub 2.4.0 actually reads it.

        Setting ``HF_HUB_OFFLINE`` in the environment after import has no effect on this process: the
        client checks ``huggingface_hub.constants.HF_HUB_OFFLINE`` (through ``constants.is_offline_mode()``).
        Both are set here (the environment variable for subprocesses). Restored at teardown.
        """
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)

    def api(self, token: str | bool | None = None):
        """An ``HfApi`` bound to the fake Hub (``token=None``: the ``HF_TOKEN`` one, ``False``: anonymous)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=token)


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    server = HubServer(tokens=dict(HUB_TOKENS)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_env(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubEnv]:
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import (
        _auth,
        _cache_assets,
        _cache_manager,
        _detect_agent,
        _http,
        close_session,
    )

    # `huggingface_hub.utils.tqdm` is shadowed by the `tqdm` class re-exported from `huggingface_hub.utils`.
    hf_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")

    endpoint = hub_server.endpoint
    hf_home = tmp_path / "hf_home"
    cache_dir = hf_home / "hub"
    assets_dir = hf_home / "assets"
    xet_dir = hf_home / "xet"
    token_path = hf_home / "token"
    cache_dir.mkdir(parents=True)

    # Environment (read by subprocesses; this process only sees it through the patches below).
    for name in (
        "HUGGING_FACE_HUB_TOKEN",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "HUGGINGFACE_CO_STAGING",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE",
        "HF_OIDC_ID_TOKEN",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": ALICE_TOKEN,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache_dir),
        "HF_ASSETS_CACHE": str(assets_dir),
        "HF_XET_CACHE": str(xet_dir),
        "HF_TOKEN_PATH": str(token_path),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }.items():
        monkeypatch.setenv(name, value)

    # Constants frozen at import time.
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache_dir),
        "HUGGINGFACE_HUB_CACHE": str(cache_dir),
        "HF_ASSETS_CACHE": str(assets_dir),
        "HUGGINGFACE_ASSETS_CACHE": str(assets_dir),
        "HF_XET_CACHE": str(xet_dir),
        "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,  # also skips the agent-harness registry fetch done for the user-agent
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }.items():
        monkeypatch.setattr(constants, name, value)

    # Values other modules copied out of `constants` at import time.
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets_dir))
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # Process-wide caches that could leak state between tests.
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    monkeypatch.setattr(_auth, "_OIDC_TOKEN_CACHE", None)
    monkeypatch.setattr(_auth, "_OAUTH_REFRESH_CACHE", None)
    monkeypatch.setattr(hf_tqdm, "progress_bar_states", {"_global": False})

    # The shared httpx2 client keeps connections alive: start and end with a fresh one.
    close_session()
    try:
        yield HubEnv(
            server=hub_server,
            endpoint=endpoint,
            token=ALICE_TOKEN,
            user=HUB_TOKENS[ALICE_TOKEN],
            other_token=BOB_TOKEN,
            other_user=HUB_TOKENS[BOB_TOKEN],
            hf_home=hf_home,
            cache_dir=cache_dir,
            monkeypatch=monkeypatch,
        )
    finally:
        close_session()
