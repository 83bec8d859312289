"""load_patched: base + patches (paths, Hub refs, Patch objects), applied and verified, fail-fast.

The tiny model folder and ``steer_patch`` come from tests/helpers/tiny_folder.py.
"""

from __future__ import annotations

import pytest

from rompatch.apply import applied_patches, verify_applied
from rompatch.errors import (
    BaseMismatchError,
    FingerprintMismatchError,
    HubError,
    LineageError,
    ModelLoadError,
    PatchFormatError,
)
from rompatch.loading import load_patched
from rompatch.models import load_model, model_identity
from rompatch.patch import save_patch
from rompatch.predict import greedy
from tests.helpers import vector_patch
from tests.helpers.tiny_folder import PROMPT_A, PROMPT_B, save_tiny, steer_patch, top1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder and two patches (saved files) that change two different predictions."""
    root = tmp_path_factory.mktemp("tiny")
    folder = save_tiny(root / "llama-tiny", "llama")
    model, tok = load_model(str(folder), device="cpu")
    before = {p: top1(model, tok, p) for p in (PROMPT_A, PROMPT_B)}
    pa = steer_patch(model, tok, PROMPT_A, "Rome", layer=1)
    pb = steer_patch(model, tok, PROMPT_B, "German", layer=2)
    save_patch(pa, root / "a.safetensors")
    save_patch(pb, root / "b.safetensors")
    return {"folder": folder, "root": root, "before": before, "a": pa, "b": pb}


def test_steer_patches_change_predictions_on_their_own(tiny):
    assert tiny["before"][PROMPT_A] != "Rome" and tiny["before"][PROMPT_B] != "German"


def test_load_patched_paths_and_objects(tiny):
    model, tok = load_patched(str(tiny["folder"]), [tiny["root"] / "a.safetensors", tiny["b"]], device="cpu")
    assert [p.id for p in applied_patches(model)] == [tiny["a"].id, tiny["b"].id]
    assert top1(model, tok, PROMPT_A) == "Rome"
    assert top1(model, tok, PROMPT_B) == "German"
    verify_applied(model)
    assert greedy(model, tok, PROMPT_A, max_new_tokens=1).strip() == "Rome"


def test_load_patched_single_item_and_string_path(tiny):
    model, tok = load_patched(str(tiny["folder"]), str(tiny["root"] / "a.safetensors"), device="cpu")
    assert [p.id for p in applied_patches(model)] == [tiny["a"].id]
    assert top1(model, tok, PROMPT_A) == "Rome"
    assert top1(model, tok, PROMPT_B) != "German"  # the other edit is not there


def test_load_patched_base_none_uses_the_patch_base(tiny):
    model, tok = load_patched(None, tiny["a"], device="cpu")
    assert top1(model, tok, PROMPT_A) == "Rome"
    assert model_identity(model)["model"] == str(tiny["folder"])


def test_load_patched_resolves_patches_before_loading_the_model(tiny, monkeypatch):
    import rompatch.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded when a patch reference is bad")

    monkeypatch.setattr(loading, "load_model", boom)
    with pytest.raises(PatchFormatError, match="no such patch file"):
        load_patched(str(tiny["folder"]), [tiny["a"], "missing-patch.safetensors"])
    with pytest.raises(HubError, match="neither an existing patch file nor a Hub reference"):
        load_patched(str(tiny["folder"]), "no-such-thing")


def test_load_patched_wrong_dtype_names_the_fix(tiny):
    with pytest.raises(
        FingerprintMismatchError, match=r"computed on float32 weights .* dtype='float32'"
    ) as ei:
        load_patched(str(tiny["folder"]), tiny["a"], device="cpu", dtype="bfloat16")
    name = tiny["a"].deltas[0].parameter
    assert ei.value.parameter == name and ei.value.expected == tiny["a"].parameters[name].sha256


def test_load_patched_force_applies_on_mismatch(tiny):
    model, tok = load_patched(str(tiny["folder"]), tiny["a"], device="cpu", dtype="bfloat16", force=True)
    assert [p.id for p in applied_patches(model)] == [tiny["a"].id]
    verify_applied(model)


def test_load_patched_wrong_architecture(tiny, tmp_path):
    gpt = save_tiny(tmp_path / "gpt2-tiny", "gpt2")
    with pytest.raises(BaseMismatchError, match="made for a llama model"):
        load_patched(str(gpt), tiny["a"], device="cpu")


def test_load_patched_lineage_order(tiny):
    model, tok = load_model(str(tiny["folder"]), device="cpu")
    first = vector_patch(model, 1, seed=3)
    from rompatch.apply import apply_patch

    apply_patch(model, first)
    second = vector_patch(model, 1, seed=4, lineage=[first.id])
    # in order: fine (the second was fingerprinted on base + first)
    m2, _ = load_patched(str(tiny["folder"]), [first, second], device="cpu")
    assert [p.id for p in applied_patches(m2)] == [first.id, second.id]
    with pytest.raises(LineageError, match="apply that patch first"):
        load_patched(str(tiny["folder"]), [second, first], device="cpu")


def test_load_patched_missing_base(tiny):
    with pytest.raises(ModelLoadError):
        load_patched(str(tiny["root"] / "nope"), tiny["a"], device="cpu")
    with pytest.raises(PatchFormatError, match="patches must be"):
        load_patched(str(tiny["folder"]), 42)  # type: ignore[arg-type]
