"""In-memory apply/revert: exact undo (sha256), fingerprints, lineage, every architecture and dtype."""

from __future__ import annotations

import itertools

import pytest
import torch

from rompatch.apply import applied_patches, apply_patch, patched, revert_patch, verify_applied
from rompatch.arch import get_spec
from rompatch.errors import BaseMismatchError, FingerprintMismatchError, LineageError, NotAppliedError
from rompatch.fingerprint import TensorMemo, tensor_sha256
from tests.helpers import vector_patch
from tests.helpers.tiny import ARCHS, make_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def shas(model):
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_apply_changes_exactly_the_delta_and_revert_is_bitwise(arch, dtype):
    model = make_model(arch, dtype=dtype)
    before = shas(model)
    patch = vector_patch(model, layer=2)
    name = get_spec(model).mlp_out_param(2)
    w0 = model.get_parameter(name).detach().clone()

    apply_patch(model, patch)
    w1 = model.get_parameter(name).detach()
    expected = (w0.float() + patch.deltas[0].matrix(get_spec(model).layout)).to(dtype)
    assert torch.equal(w1, expected), "apply must be cast(W + v uᵀ in float32)"
    after = shas(model)
    assert [k for k in before if before[k] != after[k]] == [name]

    revert_patch(model, patch)
    assert shas(model) == before


def test_conv1d_delta_is_transposed():
    model = make_model("gpt2")
    patch = vector_patch(model, layer=0)
    name = get_spec(model).mlp_out_param(0)
    w0 = model.get_parameter(name).detach().clone()  # Conv1D: (in, out)
    d = patch.deltas[0]
    with patched(model, patch):
        diff = model.get_parameter(name).detach() - w0
    assert torch.allclose(diff, torch.outer(d.u, d.v), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stack_reverted_in_any_order_is_exact(dtype):
    model = make_model("llama", dtype=dtype)
    base = shas(model)
    patches = [vector_patch(model, layer=1, seed=s, subject=f"S{s}") for s in range(3)]
    for order in itertools.permutations(range(3)):
        for p in patches:
            apply_patch(model, p)
        for i in order:
            revert_patch(model, patches[i])
        assert shas(model) == base
        assert applied_patches(model) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_revert_middle_equals_applying_only_the_others(dtype):
    a, b, c = (make_model("qwen2", dtype=dtype) for _ in range(3))
    pa, pb, pc = (vector_patch(a, layer=1, seed=s, subject=f"S{s}") for s in range(3))
    for p in (pa, pb, pc):
        apply_patch(a, p)
    revert_patch(a, pb)
    apply_patch(b, pa)
    apply_patch(b, pc)
    assert shas(a) == shas(b)
    assert shas(c) != shas(a)


def test_accumulates_in_float32_and_casts_once():
    model = make_model("llama", dtype=torch.bfloat16)
    p1, p2 = (
        vector_patch(model, layer=1, seed=1, scale=1e-3),
        vector_patch(model, layer=1, seed=2, scale=1e-3, subject="B"),
    )
    name = p1.deltas[0].parameter
    w0 = model.get_parameter(name).detach().clone()
    apply_patch(model, p1)
    apply_patch(model, p2)
    once = (w0.float() + p1.deltas[0].matrix() + p2.deltas[0].matrix()).bfloat16()
    assert torch.equal(model.get_parameter(name).detach(), once)


def test_fingerprint_mismatch_names_parameter_and_both_hashes():
    model = make_model("llama")
    patch = vector_patch(model, layer=1)
    other = make_model("llama", seed=123)
    name = patch.deltas[0].parameter
    expect = patch.parameters[name].sha256
    actual = tensor_sha256(other.get_parameter(name))
    with pytest.raises(FingerprintMismatchError) as ei:
        apply_patch(other, patch)
    msg = str(ei.value)
    assert name in msg and expect[:16] in msg and actual[:16] in msg and "force=True" in msg
    assert (ei.value.parameter, ei.value.expected, ei.value.found) == (name, expect, actual)
    assert tensor_sha256(other.get_parameter(name)) == actual, "a refused apply changes nothing"
    rec = apply_patch(other, patch, force=True)
    assert rec.forced
    revert_patch(other, patch)
    assert tensor_sha256(other.get_parameter(name)) == actual


def test_revert_not_applied_is_clear_error():
    model = make_model("llama")
    patch = vector_patch(model)
    with pytest.raises(
        NotAppliedError, match=rf"patch {patch.short_id} is not applied to this model \(applied: none\)"
    ):
        revert_patch(model, patch)


def test_apply_twice_refused():
    model = make_model("llama")
    patch = vector_patch(model)
    apply_patch(model, patch)
    with pytest.raises(LineageError, match="already applied"):
        apply_patch(model, patch)


def test_lineage_requires_parent_and_sequential_fingerprint():
    model = make_model("llama")
    parent = vector_patch(model, layer=1, seed=1)
    apply_patch(model, parent)
    child = vector_patch(
        model, layer=1, seed=2, lineage=[parent.id], subject="B"
    )  # fingerprinted on base+parent
    revert_patch(model, parent)
    with pytest.raises(LineageError, match=rf"computed on top of {parent.short_id}; apply that patch first"):
        apply_patch(model, child)
    apply_patch(model, parent)
    apply_patch(model, child)
    with pytest.raises(LineageError, match="cannot be reverted while"):
        revert_patch(model, parent)
    revert_patch(model, child)
    revert_patch(model, parent)


def test_patched_context_reverts_on_error():
    model = make_model("gptj")
    base = shas(model)
    patch = vector_patch(model)
    with pytest.raises(RuntimeError):
        with patched(model, patch):
            assert shas(model) != base
            raise RuntimeError("boom")
    assert shas(model) == base


def test_verify_applied_detects_silent_reload():
    model = make_model("llama")
    patch = vector_patch(model)
    apply_patch(model, patch)
    verify_applied(model)
    name = patch.deltas[0].parameter
    with torch.no_grad():
        model.get_parameter(name).copy_(make_model("llama").get_parameter(name))  # "reloaded" base weights
    with pytest.raises(FingerprintMismatchError, match="no longer holds the patched value") as ei:
        verify_applied(model)
    assert ei.value.parameter == name and ei.value.found == tensor_sha256(model.get_parameter(name))
    assert ei.value.expected != ei.value.found and ei.value.expected[:16] in str(ei.value)


def test_patch_for_another_model_is_a_base_mismatch():
    """Not a format problem: the file is fine, the model is the wrong one."""
    patch = vector_patch(make_model("llama"), layer=1)
    with pytest.raises(BaseMismatchError, match="which this model does not have; it was made for another"):
        apply_patch(make_model("gpt2"), patch)
    wider = make_model("llama", intermediate_size=128)
    with pytest.raises(
        BaseMismatchError, match=r"has shape \[64, 128\] in this model but \[64, 96\] in the patch"
    ):
        apply_patch(wider, patch)
    assert applied_patches(wider) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_apply_and_revert_invalidate_version_memos(arch):
    """In-memory apply and revert bump the parameter's version counter, so a memo keyed on it (the
    spectral norm ``rompatch.rome`` uses for a sequential edit) is recomputed, never served stale."""
    model = make_model(arch)
    name = get_spec(model).mlp_out_param(2)
    p = model.get_parameter(name)
    memo = TensorMemo(4)
    norm = lambda: float(torch.linalg.matrix_norm(p.detach().float(), ord=2))  # noqa: E731
    before = memo.get(p, norm)
    v0 = p._version
    patch = vector_patch(model, layer=2, scale=50.0)
    apply_patch(model, patch)
    assert p._version > v0, "apply must change the weight through autograd-visible in-place ops"
    patched_norm = memo.get(p, norm)
    assert patched_norm == norm() and patched_norm != before
    v1 = p._version
    revert_patch(model, patch)
    assert p._version > v1
    assert memo.get(p, norm) == before == norm()
