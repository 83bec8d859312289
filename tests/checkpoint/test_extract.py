"""extract: round trips on every architecture and dtype, refusals, lineage, SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rompatch.apply import apply_patch
from rompatch.arch import get_spec
from rompatch.checkpoint.diff import diff_patches
from rompatch.checkpoint.extract import extract_patch
from rompatch.checkpoint.operations import apply_to_checkpoint, checkpoint_log
from rompatch.checkpoint.reader import open_checkpoint
from rompatch.errors import (
    BaseMismatchError,
    CheckpointError,
)
from rompatch.patch import ParamInfo, RankOneDelta, load_patch, new_patch, save_patch
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    DTYPES,
    make_ckpt,
    read_tensor,
    save_sharded,
    tensor_shas,
)
from tests.helpers.tiny import make_model


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
