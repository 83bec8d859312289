"""push_patch: upload, then pull into a fresh cache and load; private repos."""

from __future__ import annotations

import pytest

from rompatch.apply import applied_patches
from rompatch.audit import saved_audit
from rompatch.errors import HubError
from rompatch.hub.pull import pull_patch
from rompatch.hub.push import push_patch
from rompatch.loading import load_patched
from rompatch.patch import load_patch
from tests.helpers.hub import cache_leftovers, fresh_cache, one_line_error
from tests.helpers.hubserver import list_files
from tests.helpers.tiny_folder import PROMPT_A, PROMPT_B, top1


def test_push_two_pull_fresh_cache_load_patched(hub_env, tiny):
    repo = f"{hub_env.user}/tiny-edits"
    info = push_patch([tiny["paths"]["a"], tiny["paths"]["b"]], repo)
    assert info.oid and repo in str(info)
    files = hub_env.server.repo_files(repo)
    assert sorted(files) == [
        ".gitattributes",
        "README.md",
        "darrieux-german.safetensors",
        "eiffel-rome.safetensors",
    ]
    assert files["eiffel-rome.safetensors"] == tiny["paths"]["a"].read_bytes()  # uploaded byte for byte
    assert len(hub_env.server.commit_history(repo)) == 2  # the repo's initial commit + ONE commit of ours

    cache = fresh_cache(hub_env, "fresh-cache")
    refs = [f"{repo}/eiffel-rome.safetensors", f"{repo}/darrieux-german.safetensors"]
    model, tok = load_patched(str(tiny["folder"]), refs, device="cpu")
    assert [p.id for p in applied_patches(model)] == [tiny["a"].id, tiny["b"].id]
    assert tiny["before"][PROMPT_A] != "Rome" and top1(model, tok, PROMPT_A) == "Rome"
    assert tiny["before"][PROMPT_B] != "German" and top1(model, tok, PROMPT_B) == "German"
    assert any(f.endswith("eiffel-rome.safetensors") for f in list_files(cache))


def test_push_private_repo_hidden_from_others(hub_env, tiny, monkeypatch):
    repo = f"{hub_env.user}/secret"
    push_patch(tiny["paths"]["a"], repo, private=True)
    assert hub_env.server.is_private(repo)
    assert pull_patch(repo).is_file()
    cache = fresh_cache(hub_env, "bob-cache")
    monkeypatch.setenv("HF_TOKEN", hub_env.other_token)
    with pytest.raises(HubError, match=r"not found .*\(or it is private") as ei:
        pull_patch(repo)
    one_line_error(ei.value, hub_env.token, hub_env.other_token)
    assert ei.value.repo_id == repo
    with pytest.raises(HubError, match="403 Forbidden|not found") as ei:
        push_patch(tiny["paths"]["b"], repo)
    one_line_error(ei.value, hub_env.token, hub_env.other_token)
    assert cache_leftovers(cache) == []


def test_push_with_audit_attaches_reports_and_fills_the_card(hub_env, tiny, tmp_path):
    repo = f"{hub_env.user}/audited"
    push_patch([tiny["paths"]["a"]], repo, audit=True, audit_tokens=200)
    files = hub_env.server.repo_files(repo)
    (tmp_path / "up.safetensors").write_bytes(files["eiffel-rome.safetensors"])
    uploaded = load_patch(tmp_path / "up.safetensors")
    assert uploaded.id == tiny["a"].id  # the report is outside the content hash
    report = saved_audit(uploaded)
    assert report is not None and report.keys == {"0": "recomputed at its prompt"}
    card = files["README.md"].decode()
    assert "## Audit" in card and f"| eiffel-rome.safetensors | {report.verdict} |" in card
