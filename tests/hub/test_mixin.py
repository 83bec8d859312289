"""Patch.from_pretrained and Patch.push_to_hub (rompatch/hub/mixin.py)."""

from __future__ import annotations

import pytest

from rompatch.errors import (
    PatchFormatError,
)
from rompatch.patch import Patch, load_patch, save_patch


def test_patch_push_to_hub_and_from_pretrained(hub_env, tiny):
    repo = f"{hub_env.user}/methods"
    info = tiny["doc"].push_to_hub(repo, commit_message="one edit")
    files = hub_env.server.repo_files(repo)
    name = f"patch-{tiny['doc'].short_id}.safetensors"
    assert name in files and "README.md" in files
    assert Patch.from_pretrained(repo).id == tiny["doc"].id
    assert Patch.from_pretrained(f"{repo}/{name}", revision=info.oid).id == tiny["doc"].id
    tiny["a"].push_to_hub(repo, filename="named.safetensors")
    assert "named.safetensors" in hub_env.server.repo_files(repo)


def test_patch_from_pretrained_local(tiny, tmp_path):
    p = Patch.from_pretrained(tiny["paths"]["a"])
    assert p.id == tiny["a"].id
    d = tmp_path / "one"
    d.mkdir()
    save_patch(tiny["b"], d / "edit.safetensors")
    (d / "notes.txt").write_text("not a patch")
    assert Patch.from_pretrained(str(d)).id == tiny["b"].id
    save_patch(tiny["a"], d / "other.safetensors")
    with pytest.raises(PatchFormatError, match="holds 2 patches"):
        Patch.from_pretrained(d)
    assert load_patch(d / "other.safetensors").id == tiny["a"].id
