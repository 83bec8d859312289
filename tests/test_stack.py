"""stack: bit-identical to applying its parts, lineage, bases, conflicts."""

from __future__ import annotations

import json

import pytest
import torch

from rompatch.apply import apply_patch
from rompatch.checkpoint.operations import apply_to_checkpoint, revert_checkpoint
from rompatch.errors import (
    BaseMismatchError,
    ConflictError,
    LineageError,
    NotAppliedError,
    PatchFormatError,
)
from rompatch.fingerprint import tensor_sha256
from rompatch.patch import load_patch, save_patch
from rompatch.stack import find_conflicts, stack_patches, stacked_components
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    DTYPES,
    make_ckpt,
    tensor_shas,
    with_request,
)
from tests.helpers.tiny import make_model


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


# ------------------------------------------------- stacked_from is content from format 1.3 (issue 17)


def _forge_stacked_from(path, components):
    """Rewrite ``stacked_from`` of a saved stack in place, keeping everything else (the recorded id too)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["stacked_from"] = json.dumps(components, separators=(",", ":"))
    save_file(tensors, str(path), metadata=meta)
    return meta


def _parts(tmp_path):
    model, base = make_ckpt(tmp_path)
    a = vector_patch(model, layer=1, seed=1, subject="A", scale=0.05)
    b = vector_patch(model, layer=1, seed=2, subject="B", scale=0.05)
    other = vector_patch(model, layer=2, seed=3, subject="C", scale=0.05)
    return base, a, b, other


def test_forged_stacked_from_changes_the_id(tmp_path):
    """A forged stacked_from made a later apply of another patch refuse ("already applied ... as part
    of stacked patch") while the id stayed the same: from format 1.3 it is inside the id."""
    base, a, b, other = _parts(tmp_path)
    s = stack_patches([a, b])
    path = save_patch(s, tmp_path / "s.safetensors")
    comps = [
        {"id": a.id, "deltas": [0, 1]},
        {"id": b.id, "deltas": [1, 2]},
        {"id": other.id, "deltas": [1, 2]},
    ]
    _forge_stacked_from(path, comps)
    with pytest.raises(PatchFormatError, match="does not match the recorded patch_id .* modified"):
        load_patch(path)
    assert s.format_version == "1.3"


def test_malformed_stacked_from_is_refused_on_load(tmp_path):
    base, a, b, other = _parts(tmp_path)
    path = save_patch(stack_patches([a, b]), tmp_path / "s.safetensors")
    for bad, why in [
        ([{"id": a.id, "deltas": [0, 9]}], r"delta range \[0, 9\] .* 2 deltas"),
        ([{"id": "abc", "deltas": [0, 1]}], r"ids of 64 lowercase hex"),
        ({"id": a.id}, r"must be a list of \{id, deltas\}"),
        ([{"id": a.id, "deltas": [1.0, 2]}], r"delta range"),
    ]:
        _forge_stacked_from(path, bad)
        with pytest.raises(PatchFormatError, match=rf"metadata 'stacked_from' .*{why}"):
            load_patch(path)


def test_pre_1_3_stack_keeps_its_id_but_its_stacked_from_decides_nothing(tmp_path):
    """A stack written before 1.3 loads with its id; its stacked_from is outside that id, so it is not
    trusted for lineage: a forged one no longer blocks applying another patch."""
    base, a, b, other = _parts(tmp_path)
    s = stack_patches([a, b])
    s.format_version = "1.2"  # as rompatch 1.2 wrote it: stacked_from outside the id
    path = save_patch(s, tmp_path / "s.safetensors")
    old = load_patch(path)
    assert old.format_version == "1.2" and old.id == s.id
    comps = [{"id": a.id, "deltas": [0, 1]}, {"id": other.id, "deltas": [1, 2]}]
    _forge_stacked_from(path, comps)
    forged = load_patch(path)
    assert forged.id == s.id  # the id cannot see it: a pre-1.3 stacked_from is unauthenticated
    apply_to_checkpoint(base, [forged], tmp_path / "s")
    apply_to_checkpoint(tmp_path / "s", [other], tmp_path / "s-other")  # not "already applied"
    # recorded (kept, shown, and merge still refuses a plain stack) but not trusted for lineage
    assert [c for c, _ in stacked_components(old)] == [a.id, b.id]
    assert stacked_components(old, verified_only=True) == []
    # re-saved, it keeps its version, bytes and id
    assert load_patch(save_patch(forged, tmp_path / "again.safetensors")).id == s.id


def test_a_stack_of_one_patch_is_that_patch(tmp_path):
    base, a, b, other = _parts(tmp_path)
    assert stack_patches([a]).id == a.id
    s = stack_patches([a, b])
    assert stack_patches([s]).id == s.id
    old = stack_patches([a, b])
    old.format_version = "1.2"  # its stacked_from is not trusted, so restacking it alone drops it
    again = stack_patches([old])
    assert again.id == old.id and "stacked_from" not in again.extra
