"""`rompatch show`: text, JSON, and one-line errors for files that are not patches."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from rompatch.cli.main import cli
from rompatch.patch import save_patch, to_metadata, to_tensors
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


# ------------------------------------------------- any patch that loads can be shown (issue 17)


@pytest.mark.parametrize(
    "metrics, expect",
    [
        ({"p_new_before": 0.1}, "P(new) 0.1 → ?"),
        ({"p_new_before": 0.1, "p_new_after": None}, "P(new) 0.1 → ?"),
        ({"p_new_before": 0.1, "p_new_after": 0.9, "p_true_before": 0.5}, "P(true) 0.5 → ?"),
        ({"neighbours": ["Bob"]}, "neighbours: 1 names kept unchanged (reach ? → ?): Bob"),
        (
            {"neighbours": [], "neighbours_released": ["Bob", "Al"], "p_prompt_with_all_neighbours": 0.02},
            "neighbours let go: 2 (kept away from all, P(new) on the prompt was 0.02 at the size cap)",
        ),
        (
            {"neighbours_released": ["Bob"]},
            "neighbours let go: 1 (kept away from all, P(new) on the prompt was ?",
        ),
        ({"update_spectral_norm": 1.0}, "‖ΔW‖₂ 1 vs ‖W‖₂ ?; ? steps"),
        ({"update_spectral_norm": None, "weight_spectral_norm": None}, "‖ΔW‖₂ ? vs ‖W‖₂ ?"),
    ],
)
def test_show_patches_with_missing_or_empty_metrics(runner, tmp_path, metrics, expect):
    """These crashed show with KeyError or TypeError."""
    p = vector_patch(make_model("llama"), layer=1)
    p.deltas[0].metrics = metrics
    path = save_patch(p, tmp_path / "p.safetensors")
    r = runner.invoke(cli, ["show", str(path)])
    assert r.exit_code == 0, r.output
    assert expect in r.output
    r = runner.invoke(cli, ["show", str(path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["edits"][0]["metrics"] == metrics


def test_show_patch_with_an_unreadable_audit(runner, tmp_path):
    """An audit is an annotation: one of another shape (no summary) is reported, not a crash."""
    p = vector_patch(make_model("llama"), layer=1)
    p.extra["audit"] = json.dumps({"patch_id": p.id, "tokens": "many"})
    path = save_patch(p, tmp_path / "p.safetensors")
    r = runner.invoke(cli, ["show", str(path)])
    assert r.exit_code == 0, r.output
    assert "audit    attached, but unreadable" in r.output


def test_show_malformed_merged_from_is_a_one_line_error(runner, tmp_path):
    p = vector_patch(make_model("llama"), layer=1)
    p.extra["merged_from"] = json.dumps({"inputs": "x"})
    p.format_version = "1.2"  # written before merged_from was inside the id
    p.created_at = "2026-01-01T00:00:00+00:00"
    path = tmp_path / "p.safetensors"  # written as is: save_patch checks what it writes
    save_file(to_tensors(p), str(path), metadata=to_metadata(p))
    r = runner.invoke(cli, ["show", str(path)])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "merged_from" in lines[0]


def test_show_prints_who_signed_a_patch(runner, tmp_path):
    from rompatch.signing import generate_key, sign_patch

    model = make_model("llama")
    patch = vector_patch(model, layer=1)
    path = save_patch(sign_patch(patch, generate_key("Alice")), tmp_path / "signed.safetensors")
    out = runner.invoke(cli, ["show", str(path)])
    assert out.exit_code == 0, out.output
    assert "signed   Alice (key ed25519:" in out.output and "the signature verifies" in out.output
    data = json.loads(runner.invoke(cli, ["show", str(path), "--json"]).stdout)
    assert data["signature"]["signer"] == "Alice" and data["signature"]["verifies"] is True
    unsigned = save_patch(vector_patch(model, layer=2), tmp_path / "plain.safetensors")
    assert "signed" not in runner.invoke(cli, ["show", str(unsigned)]).output
