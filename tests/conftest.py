from __future__ import annotations

import os
from pathlib import Path

import pytest

from rompatch.constants import data_dir

pytest_plugins = ["tests.conftest_hub"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "counterfact").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data not found at {d}; CI must provide it (set ROMPATCH_DATA)")
        pytest.skip(
            f"shared data not found at {d}: set ROMPATCH_DATA to the folder holding counterfact/ and known_1000.json"
        )
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (fetched and converted once into ROMPATCH_CACHE), float32 on CPU."""
    from rompatch.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small statistics corpus in the tiny tokenizer's words (for --stats-data on tiny models)."""
    import random

    from tests.tiny_tokenizer import CORPUS

    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    path = tmp_path_factory.mktemp("stats") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(200)))
    return path
