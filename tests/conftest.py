from __future__ import annotations

import os
from pathlib import Path

import pytest

from rompatch.constants import data_dir

pytest_plugins = ["tests.helpers.hub_fixtures"]

REPO = Path(__file__).resolve().parent.parent


DATA_FILES = ("counterfact/counterfact_subset.json", "known_1000.json", "wikitext-2/wiki.test.tokens")


def require_data() -> Path:
    """The evaluation data folder ($ROMPATCH_DATA): skipped without it, a failure in CI (which has it)."""
    d = data_dir()
    missing = [f for f in DATA_FILES if d is None or not (d / f).is_file()]
    if missing:
        where = "$ROMPATCH_DATA is not set" if d is None else f"$ROMPATCH_DATA={d} lacks {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"{where}; CI must provide the evaluation data (.ci/run sets ROMPATCH_DATA)")
        pytest.skip(f"needs the evaluation data: {where} (set ROMPATCH_DATA to the folder with counterfact/)")
    return d


def pytest_collection_modifyitems(config, items):
    """A test that takes the ``shared_data`` fixture is a ``data`` test, and every ``data`` test
    goes through ``require_data`` (one rule for skipping here and failing in CI)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


def pytest_runtest_setup(item):
    if item.get_closest_marker("data") is not None:
        require_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_data()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (fetched and converted once into ROMPATCH_CACHE), float32 on CPU."""
    from rompatch.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small statistics corpus in the tiny tokenizer's words (for --stats-data on tiny models)."""
    import random

    from tests.helpers.tiny_tokenizer import CORPUS

    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    path = tmp_path_factory.mktemp("stats") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(200)))
    return path


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """A fresh ROMPATCH_CACHE, no $ROMPATCH_DATA, and HF_HUB_OFFLINE=1: the statistics' default chain
    with neither data nor Hub (tests/test_stats.py, test_sampled.py, hub/test_transfer.py)."""
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROMPATCH_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
