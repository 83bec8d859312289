"""`rompatch show`: text, JSON, and one-line errors for files that are not patches."""

from __future__ import annotations

import json

import pytest

from rompatch.cli.main import cli
from rompatch.patch import save_patch
from tests.helpers import vector_patch
from tests.helpers.tiny import make_model


@pytest.fixture
def patch_file(tmp_path):
    model = make_model("llama")
    return save_patch(vector_patch(model, layer=1, n=2), tmp_path / "p.safetensors")


def test_show_text(runner, patch_file):
    r = runner.invoke(cli, ["show", str(patch_file)])
    assert r.exit_code == 0, r.output
    assert "base     unknown" in r.output or "base     " in r.output
    assert "'Alice0 works in the city of': Paris → Rome" in r.output
    assert "layer 1  model.layers.1.mlp.down_proj.weight [64, 96]" in r.output
    assert "lineage  none" in r.output


def test_show_json(runner, patch_file):
    r = runner.invoke(cli, ["show", str(patch_file), "--json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["n_deltas"] == 2 and len(data["id"]) == 64
    assert data["edits"][1]["subject"] == "Alice1" and data["edits"][1]["target_new"] == "Rome"
    assert data["tensor_bytes"] == 2 * 4 * (96 + 64)


def test_show_truncated_file_one_line_error(runner, patch_file):
    data = patch_file.read_bytes()
    patch_file.write_bytes(data[:100])
    r = runner.invoke(cli, ["show", str(patch_file)])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable safetensors file" in lines[0]
    assert "Traceback" not in r.output


def test_show_random_file_one_line_error(runner, tmp_path):
    f = tmp_path / "junk.safetensors"
    f.write_bytes(b"\x89PNG\r\n" + bytes(1000))
    r = runner.invoke(cli, ["show", str(f)])
    assert r.exit_code != 0
    assert len(r.stderr.strip().splitlines()) == 1
