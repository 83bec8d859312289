"""stack (lineage, conflicts, bases), diff (patch/patch, ckpt/ckpt, ckpt/patch) and extract round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rompatch.apply import apply_patch
from rompatch.arch import get_spec
from rompatch.checkpoint.diff import checkpoint_contains, diff, diff_checkpoints, diff_patches
from rompatch.checkpoint.extract import extract_patch
from rompatch.checkpoint.operations import (
    apply_to_checkpoint,
    checkpoint_log,
    open_checkpoint,
    revert_checkpoint,
)
from rompatch.cli.main import cli
from rompatch.errors import BaseMismatchError, CheckpointError, ConflictError, LineageError, NotAppliedError
from rompatch.fingerprint import tensor_sha256
from rompatch.patch import ParamInfo, RankOneDelta, load_patch, new_patch, save_patch
from rompatch.request import EditRequest
from rompatch.stack import find_conflicts, stack_patches, stacked_components
from tests.ckpt_helpers import read_tensor, save_sharded, tensor_shas, weight_files
from tests.helpers import vector_patch
from tests.tiny import make_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_ckpt(tmp_path: Path, arch="llama", dtype=torch.float32, name="base", seed=0):
    model = make_model(arch, dtype=dtype, seed=seed)
    folder = save_sharded(model, tmp_path / name)
    assert len(weight_files(folder)) >= 3
    return model, folder


def with_request(patch, i, **changes):
    d = patch.deltas[i]
    req = EditRequest(**{**d.request.to_dict(), **changes})
    deltas = list(patch.deltas)
    deltas[i] = RankOneDelta(d.u, d.v, d.layer, d.parameter, request=req, kind=d.kind)
    return new_patch(deltas, base=patch.base, parameters=patch.parameters, lineage=patch.lineage)


# ------------------------------------------------------------------------------------- stack


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stack_applies_bit_identically_to_its_parts(tmp_path, dtype):
    model, base = make_ckpt(tmp_path, dtype=dtype)
    parts = [
        vector_patch(model, layer=1, seed=1, subject="A", scale=0.05),
        vector_patch(model, layer=2, seed=2, subject="B", n=2, scale=0.05),
        vector_patch(model, layer=1, seed=3, subject="C", scale=0.05),
    ]
    s = stack_patches(parts)
    assert [d.u.tolist() for d in s.deltas] == [d.u.tolist() for p in parts for d in p.deltas]
    assert s.lineage == [] and s.base == parts[0].base
    name1 = parts[0].deltas[0].parameter
    assert s.parameters[name1] == parts[0].parameters[name1]
    path = save_patch(s, tmp_path / "stack.safetensors")
    loaded = load_patch(path)
    assert loaded.id == s.id
    assert [(c, (r.start, r.stop)) for c, r in stacked_components(loaded)] == [
        (parts[0].id, (0, 1)),
        (parts[1].id, (1, 3)),
        (parts[2].id, (3, 4)),
    ]
    apply_to_checkpoint(base, [path], tmp_path / "stacked")
    apply_to_checkpoint(base, parts, tmp_path / "separately")
    assert tensor_shas(tmp_path / "stacked") == tensor_shas(tmp_path / "separately")
    m = make_model("llama", dtype=dtype)
    apply_patch(m, loaded)
    disk = tensor_shas(tmp_path / "stacked")
    assert disk == {k: tensor_sha256(v) for k, v in m.state_dict().items() if k in disk}


def test_stack_lineage(tmp_path):
    model, base = make_ckpt(tmp_path)
    parent = vector_patch(model, layer=1, seed=1, scale=0.05)
    apply_patch(model, parent)
    child = vector_patch(model, layer=1, seed=2, lineage=[parent.id], subject="B", scale=0.05)
    grandchild_base = make_model("llama")
    apply_patch(grandchild_base, parent)
    apply_patch(grandchild_base, child)
    grandchild = vector_patch(grandchild_base, layer=1, seed=3, lineage=[parent.id, child.id], subject="C")

    # parent + child: lineage satisfied inside the stack
    s = stack_patches([parent, child])
    assert s.lineage == [] and s.parameters == parent.parameters
    with pytest.raises(
        LineageError, match=rf"{child.short_id} was computed on top of {parent.short_id}, which comes after"
    ):
        stack_patches([child, parent])
    with pytest.raises(LineageError, match="given twice"):
        stack_patches([parent, parent])
    # child + grandchild: the parent stays as external lineage
    s2 = stack_patches([child, grandchild])
    assert s2.lineage == [parent.id]

    # a stack applied on disk satisfies the lineage of a patch computed on top of one of its parts
    apply_to_checkpoint(base, [s], tmp_path / "s")
    apply_to_checkpoint(tmp_path / "s", [grandchild], tmp_path / "g")
    apply_to_checkpoint(base, [parent, child, grandchild], tmp_path / "seq")
    assert tensor_shas(tmp_path / "g") == tensor_shas(tmp_path / "seq")
    with pytest.raises(LineageError, match=rf"already applied .* \(as part of stacked patch {s.short_id}\)"):
        apply_to_checkpoint(tmp_path / "s", [child], tmp_path / "x")
    with pytest.raises(NotAppliedError, match=rf"as part of stacked patch {s.short_id}; revert that patch"):
        revert_checkpoint(tmp_path / "s", [child], out=tmp_path / "x")
    with pytest.raises(LineageError, match=rf"{s.short_id} \(computed on top of it\)|cannot be reverted"):
        revert_checkpoint(tmp_path / "g", [s], out=tmp_path / "x")
    # apply child-stack on base+parent: external lineage checked
    apply_to_checkpoint(base, [parent], tmp_path / "p")
    apply_to_checkpoint(tmp_path / "p", [s2], tmp_path / "p-s2")
    assert tensor_shas(tmp_path / "p-s2") == tensor_shas(tmp_path / "seq")
    with pytest.raises(LineageError, match=rf"computed on top of {parent.short_id}"):
        apply_to_checkpoint(base, [s2], tmp_path / "x")


def test_stack_refuses_different_bases(tmp_path):
    a = vector_patch(make_model("llama"), layer=1)
    b = vector_patch(make_model("llama", dtype=torch.bfloat16), layer=1, subject="B")
    with pytest.raises(BaseMismatchError, match=r"different bases \(dtype 'float32' vs 'bfloat16'\)"):
        stack_patches([a, b])
    c = vector_patch(make_model("llama", seed=7), layer=1, subject="C")  # same base record, other weights
    with pytest.raises(BaseMismatchError, match="computed against different values of"):
        stack_patches([a, c])


def test_stack_conflicts():
    model = make_model("llama")
    a = vector_patch(model, layer=1, subject="The Eiffel Tower", seed=1)
    b = with_request(vector_patch(model, layer=2, subject="The Eiffel Tower", seed=2), 0, target_new="Berlin")
    same = vector_patch(model, layer=2, subject="the  eiffel tower", seed=3)  # same fact, same target
    other_rel = with_request(
        vector_patch(model, layer=2, subject="The Eiffel Tower", seed=4), 0, prompt="{} was built by"
    )
    with pytest.raises(ConflictError) as ei:
        stack_patches([a, b])
    msg = str(ei.value)
    assert "'The Eiffel Tower works in the city of' → 'Rome'" in msg and "'Berlin'" in msg
    assert "--allow-conflicts" in msg and a.short_id in msg and b.short_id in msg
    assert len(stack_patches([a, b], allow_conflicts=True).deltas) == 2
    assert stack_patches([a, same]) and stack_patches(
        [a, other_rel]
    )  # duplicate warns; other relation is fine
    conflicts = find_conflicts([a, b, same, other_rel])
    assert sorted((c.first, c.second, c.duplicate) for c in conflicts) == [
        ((0, 0), (1, 0), False),
        ((0, 0), (2, 0), True),
        ((1, 0), (2, 0), False),
    ]
    # relation ids win over prompt wording
    r1 = with_request(a, 0, relation_id="P131", prompt="{} is in")
    r2 = with_request(b, 0, relation_id="P131", prompt="{} can be found in")
    with pytest.raises(ConflictError):
        stack_patches([r1, r2])


# -------------------------------------------------------------------------------------- diff


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


# ----------------------------------------------------------------------------------- extract


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_extract_round_trip(tmp_path, arch, dtype):
    model, base = make_ckpt(tmp_path, arch, dtype)
    one = vector_patch(model, layer=1, seed=1, scale=0.05)
    two = vector_patch(model, layer=2, seed=2, n=2, subject="B", scale=0.05)
    apply_to_checkpoint(base, [one, two], tmp_path / "edited")
    ex = extract_patch(base, tmp_path / "edited")
    spec = get_spec(model)
    assert all(d.kind == "extracted" and d.request is None for d in ex.deltas)
    assert [d.parameter for d in ex.deltas] == [spec.mlp_out_param(1)] + [spec.mlp_out_param(2)] * 2
    meta = json.loads(ex.extra["extracted_from"])
    assert meta["tensors"][spec.mlp_out_param(2)]["rank"] == 2 and meta["base"] == str(base.resolve())
    assert ex.base["model_type"] == arch and ex.lineage == []
    for name, info in ex.parameters.items():
        assert info.sha256 == open_checkpoint(base).sha256(name) and info.layout == spec.layout

    # the extracted patch, applied to the base, reproduces the edited checkpoint within dtype rounding
    path = save_patch(ex, tmp_path / "ex.safetensors")
    apply_to_checkpoint(base, [path], tmp_path / "again")
    edited, again = tensor_shas(tmp_path / "edited"), tensor_shas(tmp_path / "again")
    u = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    for key in edited:
        if edited[key] != again[key]:
            assert key in ex.parameters
            e, x = (
                read_tensor(tmp_path / "edited", key).double(),
                read_tensor(tmp_path / "again", key).double(),
            )
            # "within dtype rounding": storing a matrix M in the dtype moves it by at most u·‖M‖_F (and
            # each element by at most u·max|M|); the two checkpoints differ by less than that budget
            assert float((x - e).norm()) <= u * float(e.norm())
            assert float((x - e).abs().max()) <= 2 * u * float(e.abs().max())
            assert (x == e).double().mean() > 0.5  # most elements are bit-identical

    # a single edit comes back as its own u and v (up to sign); the rank-2 one as the same update
    r = diff_patches(one, ex)
    (shared,) = [e for e in r["both"] if e["a_index"] == 0]
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert shared["matched_by"] == "direction" and shared["cos_u"] > 1 - tol and shared["cos_v"] > 1 - tol
    r2 = diff_patches(two, ex)
    assert r2["parameters"][spec.mlp_out_param(2)]["relative_difference"] < 10 * tol


def test_extract_refusals_and_max_rank(tmp_path):
    model, base = make_ckpt(tmp_path)
    with pytest.raises(CheckpointError, match="no MLP output matrix differs"):
        extract_patch(base, base)
    m2 = make_model("llama", seed=9)
    save_sharded(m2, tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"numerical rank >= 64: not a low-rank edit .* --max-rank"):
        extract_patch(base, tmp_path / "other")
    ex = extract_patch(base, tmp_path / "other", max_rank=3)
    assert len(ex.deltas) == 3 * 4 and ex.deltas[0].metrics["relative_residual"] > 0.1
    with pytest.raises(BaseMismatchError, match="gpt2 model"):
        extract_patch(base, save_sharded(make_model("gpt2"), tmp_path / "gpt2"))


def test_extract_from_patched_base_has_lineage(tmp_path):
    model, base = make_ckpt(tmp_path)
    p1 = vector_patch(model, layer=1, seed=1, scale=0.05)
    apply_to_checkpoint(base, [p1], tmp_path / "b1")
    apply_patch(model, p1)
    p2 = vector_patch(model, layer=2, seed=2, subject="B", lineage=[p1.id], scale=0.05)
    apply_to_checkpoint(tmp_path / "b1", [p2], tmp_path / "b2")
    ex = extract_patch(tmp_path / "b1", tmp_path / "b2")
    assert ex.lineage == [p1.id] and list(ex.parameters) == [p2.deltas[0].parameter]
    apply_to_checkpoint(tmp_path / "b1", [ex], tmp_path / "b2x")  # fingerprint and lineage hold
    assert [e["id"] for e in checkpoint_log(tmp_path / "b2x")["applied"]] == [p1.id, ex.id]


# ---------------------------------------------------------------------------------------- CLI


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


# ----------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_extract_recovers_u_and_v(tmp_path):
    """Extract one edit from SmolLM2 and compare with the original u and v.

    ROMPATCH_EXTRACT_PATCH=path/to/patch.safetensors uses that patch (e.g. a real ROME edit made on
    smollm2-135m) instead of a random vector patch on layer 6.
    """
    from rompatch.models import ensure_embedded

    src = ensure_embedded("smollm2-135m")
    ck = open_checkpoint(src)
    ref = os.environ.get("ROMPATCH_EXTRACT_PATCH")
    if ref:
        patch = load_patch(ref)
    else:
        name = "model.layers.6.mlp.down_proj.weight"
        e = ck.entry(name)
        g = torch.Generator().manual_seed(0)
        u = torch.randn(e.shape[1], generator=g)
        d = RankOneDelta(u / u.norm(), torch.randn(e.shape[0], generator=g) * 0.05, 6, name, kind="manual")
        patch = new_patch(
            [d],
            base={"model": "smollm2-135m", "revision": None, "model_type": "llama", "dtype": "float32"},
            parameters={name: ParamInfo(shape=e.shape, dtype="float32", sha256=ck.sha256(name))},
        )
    apply_to_checkpoint(src, [patch], tmp_path / "edited")
    ex = extract_patch(src, tmp_path / "edited")
    r = diff_patches(patch, ex)
    assert len(r["both"]) == len(patch.deltas) and r["only_a"] == [] and r["only_b"] == []
    for e in r["both"]:
        assert e["cos_u"] > 0.9999 and e["cos_v"] > 0.9999, e
