"""diff: patch/patch, checkpoint/checkpoint (rank and size), checkpoint/patch; the stack, diff and extract CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rompatch.apply import apply_patch
from rompatch.arch import get_spec
from rompatch.checkpoint.diff import checkpoint_contains, diff, diff_checkpoints, diff_patches
from rompatch.checkpoint.operations import apply_to_checkpoint
from rompatch.checkpoint.reader import open_checkpoint
from rompatch.cli.main import cli
from rompatch.patch import save_patch
from rompatch.stack import stack_patches
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    DTYPES,
    make_ckpt,
    read_tensor,
    save_sharded,
    with_request,
)
from tests.helpers.tiny import make_model


def test_diff_patches():
    model = make_model("llama")
    a = vector_patch(model, layer=1, n=2, seed=1)
    b = vector_patch(model, layer=1, n=3, seed=1)  # same first two deltas (same seed), one more
    r = diff_patches(a, b)
    assert r["same_base"] and [e["subject"] for e in r["only_b"]] == ["Alice2"] and r["only_a"] == []
    assert [(e["a_index"], e["b_index"], e["identical"]) for e in r["both"]] == [(0, 0, True), (1, 1, True)]
    assert all(abs(e["cos_u"] - 1) < 1e-12 and abs(e["cos_v"] - 1) < 1e-12 for e in r["both"])
    c = vector_patch(model, layer=1, n=2, seed=2)  # same requests, different vectors
    r = diff_patches(a, c)
    assert len(r["both"]) == 2 and all(not e["identical"] and abs(e["cos_u"]) < 0.6 for e in r["both"])
    assert r["parameters"][a.deltas[0].parameter]["relative_difference"] > 0.5
    other = vector_patch(make_model("llama", dtype=torch.bfloat16), layer=1)
    r = diff_patches(a, other)
    assert not r["same_base"] and r["base_differences"] == {"dtype": ["float32", "bfloat16"]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_diff_checkpoints_rank_and_size(tmp_path, dtype):
    model, base = make_ckpt(tmp_path, dtype=dtype)
    p = [
        vector_patch(model, layer=1, seed=1, scale=0.05),
        vector_patch(model, layer=2, n=2, seed=2, subject="B", scale=0.05),
    ]
    apply_to_checkpoint(base, p, tmp_path / "out")
    r = diff_checkpoints(base, tmp_path / "out")
    spec = get_spec(model)
    got = {t["tensor"]: t for t in r["differ"]}
    assert set(got) == {spec.mlp_out_param(1), spec.mlp_out_param(2)}
    assert got[spec.mlp_out_param(1)]["rank"] == 1 and got[spec.mlp_out_param(2)]["rank"] == 2
    w = read_tensor(base, spec.mlp_out_param(2)).double()
    w2 = read_tensor(tmp_path / "out", spec.mlp_out_param(2)).double()
    assert got[spec.mlp_out_param(2)]["relative_size"] == pytest.approx(
        float((w2 - w).norm() / w.norm()), rel=1e-9
    )
    assert r["n_identical"] == len(open_checkpoint(base).entries) - 2 and r["applied_b"] == [x.id for x in p]
    assert diff_checkpoints(base, base)["identical"] is True
    # a full-rank change (re-initialised weights) is reported as such
    m2 = make_model("llama", dtype=dtype, seed=5)
    save_sharded(m2, tmp_path / "other")
    r = diff_checkpoints(base, tmp_path / "other")
    t = {x["tensor"]: x for x in r["differ"]}[spec.mlp_out_param(1)]
    assert t["rank"] == min(t["shape"])


def test_diff_checkpoint_contains_patch(tmp_path):
    model, base = make_ckpt(tmp_path)
    p1 = vector_patch(model, layer=1, seed=1, scale=0.05)
    p2 = vector_patch(model, layer=2, seed=2, subject="B", scale=0.05)
    p4 = vector_patch(model, layer=3, seed=4, subject="D", scale=0.05)
    s = stack_patches([p1, p4])
    apply_to_checkpoint(base, [s, p2], tmp_path / "out")
    r = checkpoint_contains(tmp_path / "out", p2)
    assert r["contains"] is True and r["how"] == "record" and r["position"] == 1
    r = checkpoint_contains(tmp_path / "out", p1)
    assert r["contains"] is True and r["part_of"] == s.id and r["position"] == 0
    p3 = vector_patch(model, layer=3, seed=3, subject="C")
    assert checkpoint_contains(tmp_path / "out", p3)["contains"] is False
    # a foreign checkpoint: patched in memory and saved, no record
    apply_patch(model, p1)
    save_sharded(model, tmp_path / "foreign")
    r = checkpoint_contains(tmp_path / "foreign", p1, base=base)
    assert r["contains"] is True and r["how"] == "base"
    t = r["tensors"][p1.deltas[0].parameter]
    assert t["exact"] and t["base_matches_fingerprint"]
    assert checkpoint_contains(tmp_path / "foreign", p2, base=base)["contains"] is False
    assert checkpoint_contains(base, p1)["contains"] is False  # tensor equals the patch's base fingerprint
    assert checkpoint_contains(tmp_path / "foreign", p1)["contains"] in (True, None)  # fingerprints only
    wrong = vector_patch(make_model("llama"), layer=1, seed=11, subject="Z", scale=0.05)
    assert checkpoint_contains(tmp_path / "foreign", wrong, base=base)["contains"] is False
    # dispatch by argument type, either order
    assert diff(p1, tmp_path / "foreign", base=base)["kind"] == "checkpoint/patch"


def test_cli_stack_diff_extract(tmp_path):
    model, base = make_ckpt(tmp_path)
    a = save_patch(
        vector_patch(model, layer=1, seed=1, subject="Alice", scale=0.05), tmp_path / "a.safetensors"
    )
    b = save_patch(
        with_request(vector_patch(model, layer=2, seed=2, subject="Alice"), 0, target_new="Oslo"),
        tmp_path / "b.safetensors",
    )
    runner = CliRunner()
    r = runner.invoke(cli, ["stack", str(a), str(b), "-o", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 1 and "conflicting edits" in r.stderr and not (tmp_path / "s.safetensors").exists()
    r = runner.invoke(
        cli, ["stack", str(a), str(b), "-o", str(tmp_path / "s.safetensors"), "--allow-conflicts"]
    )
    assert r.exit_code == 0, r.output
    assert "2 delta(s) from 2 patch(es)" in r.stdout
    r = runner.invoke(cli, ["stack", str(a), "-o", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 1 and "already exists" in r.stderr

    r = runner.invoke(cli, ["diff", str(a), str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    assert "+ only in B: 'Alice works in the city of' → Oslo" in r.stdout and "(identical)" in r.stdout

    assert runner.invoke(cli, ["apply", str(base), str(a), "-o", str(tmp_path / "out")]).exit_code == 0
    r = runner.invoke(cli, ["diff", str(base), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "~ model.layers.1.mlp.down_proj.weight [64, 96] float32: rank 1, ‖Δ‖/‖A‖" in r.stdout
    r = runner.invoke(cli, ["diff", str(tmp_path / "out"), str(a), "--json"])
    assert json.loads(r.stdout)["contains"] is True

    r = runner.invoke(
        cli, ["extract", str(base), str(tmp_path / "out"), "-o", str(tmp_path / "ex.safetensors")]
    )
    assert r.exit_code == 0, r.output
    assert "1 extracted delta(s)" in r.stdout and "rank 1 (kept 1)" in r.stdout
    r = runner.invoke(cli, ["show", str(tmp_path / "ex.safetensors")])
    assert "(extracted, no request recorded)" in r.stdout
    r = runner.invoke(cli, ["diff", str(a), str(tmp_path / "ex.safetensors"), "--json"])
    (e,) = json.loads(r.stdout)["both"]
    assert e["cos_u"] > 1 - 1e-6 and e["cos_v"] > 1 - 1e-6
