"""`rompatch push`, `pull` and `export-peft` (against the test Hub, tests/helpers/hubserver/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.hub.peft import ADAPTER_CONFIG
from rompatch.patch import save_patch
from tests.helpers import mixed_patch
from tests.helpers.tiny import make_model
from tests.helpers.tiny_folder import steer_patches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return steer_patches(tmp_path_factory.mktemp("hubtiny"))


def test_cli_push_pull_show(hub_env, tiny, tmp_path):
    runner = CliRunner()
    repo = f"{hub_env.user}/cli-edits"
    res = runner.invoke(
        cli, ["push", str(tiny["paths"]["a"]), str(tiny["paths"]["b"]), repo, "-m", "two edits"]
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().startswith(hub_env.endpoint) and "/commit/" in res.stdout
    assert "pushed 2 patch(es)" in res.stderr
    res = runner.invoke(cli, ["pull", f"{repo}/eiffel-rome.safetensors", "-o", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip())
    assert (
        path == tmp_path / "p" / "eiffel-rome.safetensors"
        and path.read_bytes() == tiny["paths"]["a"].read_bytes()
    )
    res = runner.invoke(cli, ["pull", f"{repo}@main", "-o", str(tmp_path / "q")])
    assert res.exit_code == 1 and "holds 2 patches" in res.stderr
    res = runner.invoke(cli, ["show", f"{repo}/darrieux-german.safetensors", "--json"])
    assert res.exit_code == 0 and tiny["b"].id in res.stdout
    res = runner.invoke(cli, ["push", str(tiny["paths"]["a"]), f"{repo}-private", "--private", "--json"])
    assert res.exit_code == 0 and hub_env.server.is_private(f"{repo}-private")
    res = runner.invoke(cli, ["push", repo])
    assert res.exit_code == 2  # usage error: no patch given


def test_cli_export_peft(tmp_path):
    model = make_model("gpt2")
    p = save_patch(mixed_patch(model), tmp_path / "edit.safetensors")
    res = CliRunner().invoke(cli, ["export-peft", str(p), "-o", str(tmp_path / "adapter")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    res = CliRunner().invoke(
        cli, ["export-peft", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "x")]
    )
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_push_audit_puts_the_audit_on_the_card(hub_env, tiny):
    repo = f"{hub_env.user}/cli-audited"
    res = CliRunner().invoke(cli, ["push", str(tiny["paths"]["b"]), repo, "--audit", "--audit-tokens", "200"])
    assert res.exit_code == 0, res.output
    card = hub_env.server.repo_files(repo)["README.md"].decode()
    assert "## Audit" in card and "| darrieux-german.safetensors |" in card.split("## Audit")[1]
