"""`rompatch --help`, `show` and error handling through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.patch import save_patch
from tests.helpers import vector_patch
from tests.tiny import make_model


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def patch_file(tmp_path):
    model = make_model("llama")
    return save_patch(vector_patch(model, layer=1, n=2), tmp_path / "p.safetensors")


def test_help_lists_commands(runner):
    r = runner.invoke(cli, ["--help"])
    assert r.exit_code == 0
    for cmd in ("show", "predict"):
        assert cmd in r.output


def test_help_table_matches_the_commands():
    """``rompatch --help`` lists commands from main.COMMANDS without importing them; every entry
    names the module that defines the command and its real one-line help, and no command is missing."""
    import importlib
    import pkgutil

    import rompatch.cli as pkg
    from rompatch.cli.main import COMMANDS

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "main":
            continue
        mod = importlib.import_module(f"rompatch.cli.{info.name}")
        for cmd in getattr(mod, "COMMANDS", ()):
            found[cmd.name] = (info.name, cmd.get_short_help_str(limit=1000))
    assert found == COMMANDS


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


def test_verbose_shows_traceback(runner, tmp_path):
    f = tmp_path / "junk.safetensors"
    f.write_bytes(b"junk")
    r = runner.invoke(cli, ["-v", "show", str(f)])
    assert r.exit_code != 0 and "Traceback" in r.stderr
