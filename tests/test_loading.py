"""load_patched: base + patches (paths, Hub refs, Patch objects), applied and verified, fail-fast.

Also holds the tiny-model-folder helpers used by tests/test_hub.py (a tiny random model saved
with a word-level tokenizer, so load_model/greedy work on it) and ``steer_patch``, a patch that
provably changes what the model says next.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rompatch.apply import applied_patches, verify_applied
from rompatch.arch import get_spec
from rompatch.errors import (
    BaseMismatchError,
    FingerprintMismatchError,
    HubError,
    LineageError,
    ModelLoadError,
    PatchFormatError,
)
from rompatch.hooks import Trace
from rompatch.loading import load_patched
from rompatch.models import load_model, model_identity
from rompatch.patch import ParamInfo, Patch, RankOneDelta, load_patch, new_patch, save_patch
from rompatch.predict import greedy, top_next_tokens
from rompatch.request import EditRequest
from tests.helpers import vector_patch
from tests.tiny import VOCAB, make_model

WORDS = (
    "the of and a in is to was for on as with by at from his her it that city capital language works "
    "located country born plays sport speaks official team Eiffel Tower Colosseum Louvre Danielle Darrieux "
    "Paris Rome London Berlin Madrid Tokyo French Italian English German football basketball"
).split()


def make_tokenizer(model_type: str):
    """A word-level fast tokenizer with exactly VOCAB tokens (every model id decodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if model_type == "gpt2":
        specials = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<unk>"}
        head = ["<|endoftext|>", "<unk>"]
    else:
        specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        head = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab_list = head + [w for w in WORDS if w not in head]
    vocab_list += [f"w{i}" for i in range(VOCAB - len(vocab_list))]
    assert len(vocab_list) == VOCAB
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_list)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


def save_tiny(folder: Path, model_type: str = "llama", *, seed: int = 0) -> Path:
    """A tiny random model plus tokenizer saved as a normal model folder."""
    model = make_model(model_type, seed=seed)
    with torch.no_grad():  # larger weights: sharper, less uniform next-token distributions
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    make_tokenizer(model_type).save_pretrained(folder)
    return folder


def steer_patch(
    model, tok, prompt: str, target: str, *, layer: int = 1, scale: float = 50.0, lineage=()
) -> Patch:
    """A rank-one patch on ``layer`` that makes ``target`` the next token after ``prompt``.

    u = the edited module's input at the prompt's last token (normalised), v = scale · target's
    unembedding row: ΔW k = scale·‖k‖ · W_U[target], pushing the residual stream towards ``target``.
    """
    spec = get_spec(model)
    module = spec.mlp_out_module(layer)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad(), Trace(model, module, retain_input=True, stop=True) as tr:
        model(**enc)
    k = tr.input[0, -1].float()
    tid = tok.convert_tokens_to_ids(target)
    v = model.get_output_embeddings().weight[tid].detach().float()
    v = scale * v / v.norm()
    subject, rest = prompt.split(" ", 1) if " " in prompt else (prompt, "")
    req = EditRequest("{} " + rest if rest else "{}", subject, target, None)
    name = spec.mlp_out_param(layer)
    delta = RankOneDelta(
        u=k / k.norm(), v=v, layer=layer, parameter=name, request=req, kind="manual",
        metrics={"p_new_before": 0.01, "p_new_after": 0.9},
    )  # fmt: skip
    return new_patch(
        [delta],
        base=model_identity(model),
        parameters={name: ParamInfo.of(model.get_parameter(name).data, spec.layout)},
        lineage=list(lineage),
    )


def top1(model, tok, prompt: str) -> str:
    return top_next_tokens(model, tok, prompt, k=1)[0][0].strip()


PROMPT_A = "Eiffel Tower is located in"
PROMPT_B = "Danielle Darrieux speaks the language"


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


def test_patch_from_pretrained_local(tiny, tmp_path):
    p = Patch.from_pretrained(tiny["root"] / "a.safetensors")
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
