"""create_patch, create_patches and the Editor on tiny models of every architecture and dtype, bad
input, and the invariants (the ROME engine itself: tests/test_rome.py; the CLI: tests/cli/test_create.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rompatch.apply import apply_patch, patched
from rompatch.arch import SPECS, EditTarget
from rompatch.create import Editor, create_patch, create_patches
from rompatch.errors import ArchitectureError, RequestError, StatsError
from rompatch.fingerprint import tensor_sha256
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams
from rompatch.stats import get_second_moment
from tests.helpers import HP, INIT, REQ, edit_model, edit_tokenizer, greedy_next, save_edit_folder
from tests.helpers.tiny import ARCHS, make_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def _state(model):
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_create_makes_target_the_greedy_prediction(arch, text_file):
    model, tok = edit_model(arch), edit_tokenizer(arch)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    patch = create_patch(model, tok, REQ, hparams=HP, stats=stats)
    target_first = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    assert greedy_next(model, tok, REQ.text) != target_first, "the tiny model should not already say Rome"
    with patched(model, patch):
        assert greedy_next(model, tok, REQ.text) == target_first
    d = patch.deltas[0]
    assert d.parameter.endswith(".weight") and d.layer == 1 and d.request == REQ
    assert d.hparams["mom2_adjustment"] is True and "key" not in d.hparams
    assert d.stats["tokens"] == 3000 and len(d.stats["sha256"]) == 64
    assert d.metrics["p_new_after"] > d.metrics["p_new_before"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_create_on_half_precision_models(dtype, text_file):
    model, tok = make_model("llama", dtype=dtype, init_range=INIT), edit_tokenizer("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    patch = create_patch(model, tok, REQ, hparams=HP, stats=stats)
    assert patch.base["dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert patch.deltas[0].u.dtype == torch.float32 and torch.isfinite(patch.deltas[0].v).all()
    assert patch.deltas[0].metrics["replay"] == "suffix", "half precision must keep the fast replay"
    target_first = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    with patched(model, patch):
        assert greedy_next(model, tok, REQ.text) == target_first


def test_computing_a_delta_leaves_the_model_unchanged(text_file):
    model, tok = make_model("gpt2", init_range=INIT), edit_tokenizer("gpt2")
    model.train()  # mode must be restored too
    flags = [p.requires_grad for p in model.parameters()]
    before = _state(model)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=2000)
    create_patches(
        model,
        tok,
        [REQ, EditRequest("{} plays the sport of", "Michael Jordan", "football")],
        hparams=HP,
        stats=stats,
    )
    assert _state(model) == before
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_sequential_mode_records_lineage(text_file):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=2000)
    reqs = [REQ, EditRequest("{} plays the sport of", "Michael Jordan", "football")]
    p1, p2 = create_patches(model, tok, reqs, hparams=HP, stats=stats)
    assert p1.lineage == [] and p2.lineage == [p1.id]
    apply_patch(model, p1)
    apply_patch(model, p2)  # the fingerprint of p2 is base+p1: applies cleanly in order


def test_independent_mode_one_patch(text_file):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    reqs = [REQ, EditRequest("{} plays the sport of", "Michael Jordan", "football")]
    p = create_patch(model, tok, reqs, hparams=HP, stats_data=str(text_file), stats_tokens=2000)
    assert len(p.deltas) == 2 and p.lineage == []
    assert [d.request for d in p.deltas] == reqs


# ---------------------------------------------------------------------------------- bad input


def test_target_of_only_special_tokens(text_file):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    with pytest.raises(RequestError, match="tokenizes to nothing"):
        create_patch(
            model,
            tok,
            EditRequest("{} is in", "The Eiffel Tower", "</s>"),
            hparams=HP,
            stats_data=str(text_file),
        )


def test_subject_absent_from_tokens(text_file):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    with pytest.raises(RequestError, match="is not found in the prompt's tokens"):
        create_patch(
            model, tok, EditRequest("{} is in", "<pad>", "Rome"), hparams=HP, stats_data=str(text_file)
        )


def test_a_prompt_longer_than_the_limit_is_refused_before_any_work(text_file, monkeypatch):
    """Issue 17, failure 6: a 10,000-character prompt ran for 900 s and reached 6.9 GB."""
    import rompatch.create as create_mod
    from rompatch.rome import prompt_token_limit

    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    limit = prompt_token_limit(model)
    assert 0 < limit <= 256
    monkeypatch.setattr(create_mod, "Editor", None)  # nothing past the checks may run
    long = "{} is in " + "the city of " * 2000
    with pytest.raises(RequestError, match=rf"tokens, over the limit of {limit} .*shorten the prompt"):
        create_patch(model, tok, EditRequest(long, "The Eiffel Tower", "Rome"), stats_data=str(text_file))
    model.config.max_position_embeddings = 64  # a short context lowers the limit
    assert prompt_token_limit(model) < 64


def test_layer_out_of_range(text_file):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    with pytest.raises(ArchitectureError, match=r"layer 9 is out of range; this model has layers 0..3"):
        create_patch(model, tok, REQ, hparams=ROMEHyperParams(layer=9), stats_data=str(text_file))


def test_unreadable_stats_file(tmp_path):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    with pytest.raises(StatsError, match=r"cannot read statistics file .*no such file"):
        create_patch(model, tok, REQ, hparams=HP, stats_data=str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------- patched models, spec


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_edit_folder(tmp_path_factory.mktemp("tiny-llama"))


def test_edits_on_patched_models_inherit_lineage(tiny_folder, text_file, tmp_path):
    """A patch computed on a model that already carries patches lists them as lineage and applies there."""
    from rompatch.checkpoint.operations import apply_to_checkpoint
    from rompatch.models import load_model
    from tests.helpers import vector_patch

    base, tok = load_model(str(tiny_folder), device="cpu")
    first = vector_patch(base, layer=1, seed=3, scale=0.05)
    apply_to_checkpoint(tiny_folder, [first], tmp_path / "edited")
    edited, tok = load_model(str(tmp_path / "edited"), device="cpu")
    stats = get_second_moment(edited, tok, 1, stats_data=str(text_file), n_tokens=1500)
    on_disk = create_patch(edited, tok, REQ, hparams=HP, stats=stats)
    assert on_disk.lineage == [first.id]
    apply_patch(edited, on_disk)  # lineage satisfied by the checkpoint itself; fingerprint matches

    apply_patch(base, first)  # the same state, in memory
    in_memory = create_patch(base, tok, REQ, hparams=HP, stats=stats)
    assert in_memory.lineage == [first.id]
    assert in_memory.parameters == on_disk.parameters


def test_create_patch_takes_a_spec_for_an_unregistered_architecture(text_file):
    """``spec=`` is enough: no ``register_spec`` (no global state) for a model type rompatch does not know."""
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    model.config.model_type = "house-llama"
    spec = dataclasses.replace(SPECS["llama"], model_type="house-llama")
    assert "house-llama" not in SPECS
    with pytest.raises(ArchitectureError, match="no ModelSpec for model_type 'house-llama'"):
        create_patch(model, tok, REQ, hparams=HP, stats_data=str(text_file), stats_tokens=500)
    patch = create_patch(model, tok, REQ, spec=spec, hparams=HP, stats_data=str(text_file), stats_tokens=500)
    assert patch.deltas[0].parameter == "model.layers.1.mlp.down_proj.weight"
    assert "house-llama" not in SPECS


def test_the_edit_target_is_resolved_once_per_call(text_file, monkeypatch):
    """Spec and layer are resolved in one place (``EditTarget.resolve``), once, and passed down to
    the statistics, the templates and every edit."""
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    calls = []
    real = EditTarget.resolve.__func__

    def counting(cls, *a, **k):
        calls.append(k)
        return real(cls, *a, **k)

    monkeypatch.setattr(EditTarget, "resolve", classmethod(counting))
    reqs = [REQ, EditRequest("{} plays the sport of", "Michael Jordan", "football")]
    create_patch(
        model,
        tok,
        reqs,
        hparams=dataclasses.replace(HP, layer=None),
        stats_data=str(text_file),
        stats_tokens=500,
    )
    assert len(calls) == 1
    create_patches(model, tok, reqs, hparams=HP, stats_data=str(text_file), stats_tokens=500)
    assert len(calls) == 2


def test_editor_reuses_statistics_and_templates(text_file):
    model, tok = make_model("llama", init_range=INIT), edit_tokenizer("llama")
    editor = Editor(model, tok, hparams=HP, stats_data=str(text_file), stats_tokens=500)
    a = editor.patch(REQ)
    b = create_patch(model, tok, REQ, hparams=HP, stats=editor.stats)
    assert a.id == b.id  # the same edit, whether the Editor is kept or made per call
    assert editor.templates is editor.templates
