"""pull_patch and resolve_hub_patch: references, revisions, offline from the cache, missing files."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.errors import HubError
from rompatch.hub.pull import pull_patch, resolve_hub_patch
from rompatch.hub.push import push_patch
from rompatch.loading import load_patched
from rompatch.patch import Patch, load_patch
from tests.helpers.hub import cache_leftovers, one_line_error, plain_safetensors
from tests.helpers.hubserver import list_files
from tests.helpers.tiny_folder import PROMPT_A, PROMPT_B, top1


def test_offline_from_cache(hub_env, tiny):
    repo = f"{hub_env.user}/offline-edits"
    single = f"{hub_env.user}/offline-single"
    push_patch([tiny["paths"]["a"], tiny["paths"]["b"]], repo)
    push_patch(tiny["paths"]["a"], single)
    refs = [f"{repo}/eiffel-rome.safetensors", f"{repo}/darrieux-german.safetensors"]
    load_patched(str(tiny["folder"]), refs, device="cpu")  # online: fills the cache
    assert pull_patch(single).name == "eiffel-rome.safetensors"

    hub_env.server.stop()  # network gone
    hub_env.set_offline(True)  # HF_HUB_OFFLINE=1 (constant and environment)
    n_requests = len(hub_env.server.requests)
    model, tok = load_patched(str(tiny["folder"]), refs, device="cpu")
    assert top1(model, tok, PROMPT_A) == "Rome" and top1(model, tok, PROMPT_B) == "German"
    assert resolve_hub_patch(single).id == tiny["a"].id  # REPO_ID alone, from the cache
    assert len(hub_env.server.requests) == n_requests

    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1") as ei:
        pull_patch(f"{repo}/other.safetensors")
    one_line_error(ei.value)
    with pytest.raises(HubError, match=r"holds 2 patches in the cache .*darrieux-german.safetensors") as ei:
        pull_patch(repo)
    one_line_error(ei.value)
    assert ei.value.repo_id == repo
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1") as ei:
        push_patch(tiny["paths"]["a"], repo)
    one_line_error(ei.value)


def test_offline_env_var_alone_is_respected(hub_env, tiny, monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported: rompatch still makes no request."""
    from huggingface_hub import constants

    repo = f"{hub_env.user}/env-offline"
    push_patch(tiny["paths"]["a"], repo)
    pull_patch(repo)
    assert constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub_env.server.requests)
    assert resolve_hub_patch(repo).id == tiny["a"].id
    assert resolve_hub_patch(f"{repo}/eiffel-rome.safetensors").id == tiny["a"].id
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1"):
        pull_patch(f"{repo}/missing.safetensors")
    assert len(hub_env.server.requests) == n


def test_repo_id_alone(hub_env, tiny):
    one = f"{hub_env.user}/one"
    push_patch(tiny["a"], one)
    # a non-patch safetensors file in the same repo is not counted
    hub_env.server.seed_repo(one, {"weights/extra.safetensors": plain_safetensors()})
    p = Patch.from_pretrained(one)
    assert p.id == tiny["a"].id
    two = f"{hub_env.user}/two"
    push_patch([tiny["paths"]["a"], tiny["paths"]["b"]], two)
    with pytest.raises(
        HubError, match=r"holds 2 patches \(darrieux-german.safetensors, eiffel-rome.safetensors\); name one"
    ) as ei:
        pull_patch(two)
    one_line_error(ei.value)
    none = f"{hub_env.user}/none"
    hub_env.server.seed_repo(none, {"x.safetensors": plain_safetensors()})
    with pytest.raises(HubError, match="holds no rompatch patch"):
        pull_patch(none)


def test_pull_local_dir_and_revision(hub_env, tiny, tmp_path):
    repo = f"{hub_env.user}/branchy"
    push_patch(tiny["paths"]["a"], repo)
    push_patch(tiny["paths"]["b"], repo, revision="german", message="German edit on a branch")
    assert "darrieux-german.safetensors" not in hub_env.server.repo_files(repo, "main")
    assert "darrieux-german.safetensors" in hub_env.server.repo_files(repo, "german")
    out = pull_patch(f"{repo}/darrieux-german.safetensors@german", local_dir=tmp_path / "dl")
    assert out == tmp_path / "dl" / "darrieux-german.safetensors"
    assert load_patch(out).id == tiny["b"].id
    assert pull_patch(f"{repo}/darrieux-german.safetensors", revision="german").is_file()
    with pytest.raises(HubError, match="does not exist in .* at revision 'main'") as ei:
        pull_patch(f"{repo}/darrieux-german.safetensors", local_dir=tmp_path / "dl2")
    one_line_error(ei.value)
    assert not (tmp_path / "dl2").exists()


@pytest.mark.parametrize(
    "ref, match",
    [
        ("alice/does-not-exist", "repository alice/does-not-exist not found"),
        ("alice/does-not-exist/x.safetensors", "repository alice/does-not-exist not found"),
        ("alice/{repo}/missing.safetensors", "missing.safetensors does not exist in alice/"),
        ("alice/{repo}/eiffel-rome.safetensors@no-such-branch", "revision 'no-such-branch' does not exist"),
    ],
)
def test_pull_missing_leaves_nothing(hub_env, tiny, tmp_path, ref, match):
    repo = "pull-missing"
    push_patch(tiny["paths"]["a"], f"alice/{repo}")
    cache_before = list_files(hub_env.cache_dir)
    out = tmp_path / "out"
    with pytest.raises(HubError, match=re.escape(match)) as ei:
        pull_patch(ref.format(repo=repo), local_dir=out)
    one_line_error(ei.value, hub_env.token)
    assert not out.exists()
    assert cache_leftovers(hub_env.cache_dir) == [f for f in cache_before if not f.startswith(".locks")]
    res = CliRunner().invoke(cli, ["pull", ref.format(repo=repo), "-o", str(out)])
    assert (
        res.exit_code == 1 and res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
    )
    assert not out.exists()
