"""rompatch/hub/commit.py: one commit per push, the token, existing repos and their cards, races."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.errors import HubError
from rompatch.hub.push import push_patch
from tests.helpers.hub import one_line_error
from tests.helpers.hubserver import list_files


def test_push_to_existing_repo_keeps_files_and_owner_text(hub_env, tiny):
    from huggingface_hub import ModelCard

    repo = f"{hub_env.user}/existing"
    owner_card = "---\nlicense: apache-2.0\n---\n# Alice's edits\n\nHand-written notes.\n"
    hub_env.server.seed_repo(repo, {"notes.txt": "keep me", "README.md": owner_card})
    push_patch(tiny["paths"]["a"], repo)
    push_patch(tiny["paths"]["b"], repo)
    files = hub_env.server.repo_files(repo)
    assert {"notes.txt", "eiffel-rome.safetensors", "darrieux-german.safetensors"} <= set(files)
    assert files["notes.txt"] == b"keep me"
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.library_name == "rompatch"
    assert "Hand-written notes." in card.text
    # the card describes every patch in the repo, not only the last push
    assert "| eiffel-rome.safetensors |" in card.text and "| darrieux-german.safetensors |" in card.text


def test_push_private_to_existing_public_repo_is_refused(hub_env, tiny):
    repo = f"{hub_env.user}/public"
    push_patch(tiny["paths"]["a"], repo)
    before = hub_env.server.commit_history(repo)
    with pytest.raises(HubError, match="already exists and is public"):
        push_patch(tiny["paths"]["b"], repo, private=True)
    assert hub_env.server.commit_history(repo) == before


def test_concurrent_push_is_refused_not_lost(hub_env, tiny, monkeypatch):
    """Someone pushes between our read of the repo and our commit: refused, their file kept."""
    import rompatch.hub.commit as hub_mod

    repo = f"{hub_env.user}/race"
    push_patch(tiny["paths"]["a"], repo)
    real = hub_mod.render_card

    def racing(*a, **k):
        hub_env.server.seed_repo(repo, {"theirs.txt": "pushed meanwhile"})
        return real(*a, **k)

    monkeypatch.setattr(hub_mod, "render_card", racing)
    with pytest.raises(HubError, match="changed while pushing") as ei:
        push_patch(tiny["paths"]["b"], repo)
    one_line_error(ei.value, hub_env.token)
    files = hub_env.server.repo_files(repo)
    assert "theirs.txt" in files and "darrieux-german.safetensors" not in files


def test_invalid_token_never_leaks(hub_env, tiny, monkeypatch):
    bad = "hf_testINVALIDtoken0123456789abcdefgh"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(HubError, match="401") as ei:
        push_patch(tiny["paths"]["a"], f"{hub_env.user}/x")
    one_line_error(ei.value, bad)
    with pytest.raises(HubError) as ei:
        push_patch(tiny["paths"]["a"], f"{hub_env.user}/x", token=bad)
    one_line_error(ei.value, bad)


def test_push_without_token_writes_nothing(hub_env, tiny, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not Path(hub_env.hf_home / "token").exists()
    n = len(hub_env.server.requests)
    cache_before = list_files(hub_env.cache_dir)
    with pytest.raises(HubError, match="no Hugging Face token") as ei:
        push_patch([tiny["paths"]["a"], tiny["b"]], f"{hub_env.user}/no-token")
    one_line_error(ei.value)
    assert len(hub_env.server.requests) == n  # refused before any network call
    assert not hub_env.server.repo_exists(f"{hub_env.user}/no-token")
    assert list_files(tmp_path) == [] and list_files(hub_env.cache_dir) == cache_before
    res = CliRunner().invoke(cli, ["push", str(tiny["paths"]["a"]), f"{hub_env.user}/no-token"])
    assert res.exit_code == 1 and res.stderr.startswith("Error: no Hugging Face token")
    assert len(res.stderr.strip().splitlines()) == 1
