"""`rompatch predict` on the real default model, with and without a patch."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.patch import save_patch
from tests.helpers import vector_patch

pytestmark = pytest.mark.slow


def test_predict_cli_with_and_without_patch(smollm2, tmp_path):
    model, _ = smollm2
    patch = vector_patch(model, layer=6, scale=200.0)
    path = save_patch(patch, tmp_path / "p.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "predict",
            "smollm2-135m",
            "--prompt",
            "The Eiffel Tower is located in the city of",
            "--patch",
            str(path),
            "--json",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    res = data["results"][0]
    assert res["base"]["top"][0]["token"] == " Paris"
    assert res["patched"] != res["base"], "a large random delta must change the output"
