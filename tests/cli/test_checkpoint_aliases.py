"""`rompatch apply` and `revert` take the embedded model aliases (a tiny model stands in for the
converted SmolLM2 in ROMPATCH_CACHE)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rompatch.checkpoint.operations import checkpoint_log
from rompatch.cli.main import cli
from rompatch.models import SOURCE_FILE
from rompatch.patch import save_patch
from tests.helpers import vector_patch
from tests.helpers.ckpt import file_shas, save_sharded
from tests.helpers.tiny import make_model


@pytest.fixture
def alias_cache(tmp_path, monkeypatch):
    """``smollm2-135m`` already converted in ROMPATCH_CACHE, as a tiny sharded model (no download)."""
    import rompatch.checkpoint.reader as checkpoint

    def no_hub(*a, **k):
        raise AssertionError("an embedded alias must not be looked up on the Hub")

    monkeypatch.setattr(checkpoint, "_hub_snapshot", no_hub)
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))
    model = make_model("llama")
    folder = save_sharded(model, tmp_path / "cache" / "models" / "smollm2-135m")
    (folder / SOURCE_FILE).write_text(json.dumps({"alias": "smollm2-135m", "gguf_sha256": "0" * 64}))
    p = vector_patch(model, 1)
    path = save_patch(p, tmp_path / "p.safetensors")
    return {"folder": folder, "patch": path, "id": p.id, "shas": file_shas(folder)}


def test_cli_apply_takes_an_embedded_alias(alias_cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["apply", "smollm2-135m", str(alias_cache["patch"]), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    log = checkpoint_log(tmp_path / "out")
    assert log["base"]["model"] == "smollm2-135m" and log["base"]["revision"] == "gguf-sha256:" + "0" * 64
    assert [e["id"] for e in log["applied"]] == [alias_cache["id"]]
    assert file_shas(alias_cache["folder"]) == alias_cache["shas"]  # the converted model is untouched


def test_cli_revert_takes_an_embedded_alias(alias_cache, tmp_path):
    runner = CliRunner()
    patch = str(alias_cache["patch"])
    r = runner.invoke(cli, ["revert", "smollm2-135m", patch, "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "already equals patch" in r.stderr  # opened the alias's folder
    r = runner.invoke(cli, ["revert", "smollm2-135m", patch, "-o", str(tmp_path / "out"), "--force"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "config.json").is_file()
    r = runner.invoke(cli, ["revert", "smollm2-135m", patch, "--in-place", "--force"])
    assert r.exit_code == 1 and "--in-place needs a local folder" in r.stderr
    assert r.stderr.count("\n") == 1
    assert file_shas(alias_cache["folder"]) == alias_cache["shas"]
