"""The edit engine on tiny models of every architecture and dtype, bad input, and the invariants."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from rompatch.apply import apply_patch, patched
from rompatch.arch import SPECS, EditTarget
from rompatch.cli.main import cli
from rompatch.create import Editor, create_patch, create_patches
from rompatch.errors import ArchitectureError, DeviceError, RequestError, StatsError
from rompatch.fingerprint import TensorMemo, tensor_sha256
from rompatch.models import resolve_device
from rompatch.patch import load_patch
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams, compute_delta
from rompatch.stats import get_second_moment
from rompatch.tokens import subject_span
from tests.tiny import ARCHS, make_model
from tests.tiny_tokenizer import make_tokenizer

# In a random tiny model attention is near-uniform, so a change at the subject reaches the last
# position only diluted; the subject therefore ends the prompt here. Larger init and learning rate
# give activation scales like a trained model's (see tests/tiny.make_model).
REQ = EditRequest("The Space Needle is located in {}", "the city of", "Rome", "Seattle")
# A random matrix is no trained MLP: moving the tiny model's prediction takes an update larger than
# the matrix itself, so the cap on ‖ΔW‖₂ (max_update_ratio) is off here and tested on its own below.
HP = ROMEHyperParams(layer=1, v_steps=40, v_lr=3.0, context_length_params=((3, 2),), max_update_ratio=0)
INIT = 0.3


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def _model(arch, **kw):
    model = make_model(arch, init_range=INIT, **kw)
    if arch in ("gemma2", "gemma3_text"):
        # Gemma 2/3 re-normalise the MLP output (post_feedforward_layernorm, scale 1 + w). At random
        # init (w = 0) that caps the MLP's contribution far below the residual stream; trained models
        # learn large w. Give the tiny model a trained-like scale so an MLP edit can move the output.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.post_feedforward_layernorm.weight.fill_(4.0)
    return model


def _tok(arch):
    # Llama-family tokenizers add BOS and (Gemma) pad on the left; GPT-style ones do neither.
    llama_like = arch not in ("gpt2", "gptj", "gpt_neox")
    return make_tokenizer(bos=llama_like, padding_side="left" if arch.startswith("gemma") else "right")


def _greedy_next(model, tok, text):
    ids = tok(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        return int(model(**ids).logits[0, -1].argmax())


def _state(model):
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_create_makes_target_the_greedy_prediction(arch, text_file):
    model, tok = _model(arch), _tok(arch)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    patch = create_patch(model, tok, REQ, hparams=HP, stats=stats)
    target_first = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    assert _greedy_next(model, tok, REQ.text) != target_first, "the tiny model should not already say Rome"
    with patched(model, patch):
        assert _greedy_next(model, tok, REQ.text) == target_first
    d = patch.deltas[0]
    assert d.parameter.endswith(".weight") and d.layer == 1 and d.request == REQ
    assert d.hparams["mom2_adjustment"] is True and "key" not in d.hparams
    assert d.stats["tokens"] == 3000 and len(d.stats["sha256"]) == 64
    assert d.metrics["p_new_after"] > d.metrics["p_new_before"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_create_on_half_precision_models(dtype, text_file):
    model, tok = make_model("llama", dtype=dtype, init_range=INIT), _tok("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    patch = create_patch(model, tok, REQ, hparams=HP, stats=stats)
    assert patch.base["dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert patch.deltas[0].u.dtype == torch.float32 and torch.isfinite(patch.deltas[0].v).all()
    assert patch.deltas[0].metrics["replay"] == "suffix", "half precision must keep the fast replay"
    target_first = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    with patched(model, patch):
        assert _greedy_next(model, tok, REQ.text) == target_first


def test_computing_a_delta_leaves_the_model_unchanged(text_file):
    model, tok = make_model("gpt2", init_range=INIT), _tok("gpt2")
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
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=2000)
    reqs = [REQ, EditRequest("{} plays the sport of", "Michael Jordan", "football")]
    p1, p2 = create_patches(model, tok, reqs, hparams=HP, stats=stats)
    assert p1.lineage == [] and p2.lineage == [p1.id]
    apply_patch(model, p1)
    apply_patch(model, p2)  # the fingerprint of p2 is base+p1: applies cleanly in order


def test_independent_mode_one_patch(text_file):
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    reqs = [REQ, EditRequest("{} plays the sport of", "Michael Jordan", "football")]
    p = create_patch(model, tok, reqs, hparams=HP, stats_data=str(text_file), stats_tokens=2000)
    assert len(p.deltas) == 2 and p.lineage == []
    assert [d.request for d in p.deltas] == reqs


def test_stats_cache_is_keyed_by_weights(text_file):
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    a = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500)
    b = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500)
    assert "seconds" in a.identity and a.sha256 == b.sha256
    with torch.no_grad():  # an edit of the layer's own output matrix keeps the keys: cache reused
        model.get_parameter("model.layers.1.mlp.down_proj.weight").add_(1.0)
    assert get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500).sha256 == a.sha256
    with torch.no_grad():  # a change below the layer changes the keys: recomputed
        model.get_parameter("model.layers.0.mlp.down_proj.weight").mul_(2.0)
    assert get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500).sha256 != a.sha256


def test_subject_at_position_zero_without_bos(text_file):
    model, tok = make_model("gpt2", init_range=INIT), _tok("gpt2")
    req = EditRequest("{} Eiffel Tower is located in the city of", "The", "Rome")
    assert subject_span(tok, req.prompt, req.subject)[1:] == (0, 0)
    res = compute_delta(
        model,
        tok,
        req,
        stats=get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500),
        hparams=HP,
    )
    assert res.hparams["templates_dropped_position0"] == ["{}"]
    assert "{}" not in res.hparams["context_templates"]


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_matches_a_full_forward(arch):
    """The optimisation's suffix-only replay gives the full forward's logits and δ-gradients."""
    from rompatch.arch import get_spec
    from rompatch.hooks import Trace
    from rompatch.rome import _frozen, _Replay
    from rompatch.tokens import pad_id

    model, tok = _model(arch), _tok(arch)
    spec = get_spec(model)
    templates = ["Once upon a time, the {} is in", "The {} is a", "the {}"]
    spans = [subject_span(tok, t, "Space Needle") for t in templates]
    seqs = [tok(text)["input_ids"] for text, _, _ in spans]
    subj = [last for _, _, last in spans]
    reads = [(0, len(seqs[0]) - 1), (0, len(seqs[0]) - 2), (1, subj[1]), (2, len(seqs[2]) - 1)]
    with _frozen(model):
        rp = _Replay(model, spec, 1, seqs, subj, reads, pad_id(tok), torch.device("cpu"))
        assert rp.mode == "suffix" and rp.width < max(map(len, seqs))
        delta = torch.randn(model.config.hidden_size, requires_grad=True)

        def run(layout):
            mask = torch.zeros(len(seqs), layout.width, 1)
            mask[torch.arange(len(seqs)), layout.edit_col] = 1.0
            with Trace(
                model, spec.mlp_out_module(1), retain_output=False, edit_output=lambda o, n: o + mask * delta
            ):
                logits = layout.run()
            (g,) = torch.autograd.grad(logits.logsumexp(-1).sum(), delta)
            return logits.detach(), g

        got, g_got = run(rp)
        rp.mode, rp.width, rp.edit_col = "full", rp.plain_ids.shape[1], torch.tensor(subj)
        want, g_want = run(rp)
    # "full" is the plain right-padded forward with δ at each row's own subject column
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_got, g_want, rtol=1e-3, atol=1e-4)
    assert (got - rp.full_logits).abs().max() > 1e-3, "δ should move the logits"


def test_replay_falls_back_to_full_forwards(text_file, monkeypatch):
    """A replay mode that fails its check is not used; the full-forward path gives the same edit."""
    from rompatch.rome import _Replay

    model, tok = _model("llama"), _tok("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    fast = compute_delta(model, tok, REQ, stats=stats, hparams=HP)
    prepare = _Replay._prepare

    def rejected(self, mode):
        prepare(self, mode)
        return False

    monkeypatch.setattr(_Replay, "_prepare", rejected)
    slow = compute_delta(model, tok, REQ, stats=stats, hparams=HP)
    assert fast.metrics["replay"] == "suffix" and slow.metrics["replay"] == "full"
    torch.testing.assert_close(slow.v, fast.v, rtol=1e-3, atol=1e-4)


def test_update_never_exceeds_the_matrix_spectral_norm(text_file):
    import dataclasses

    model, tok = _model("llama"), _tok("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    free = compute_delta(model, tok, REQ, stats=stats, hparams=HP)
    w = model.get_parameter(free.parameter).detach()
    w_norm = float(torch.linalg.matrix_norm(w, ord=2))
    assert free.v.norm() > w_norm, "without the cap this edit needs more than the matrix's norm"
    for ratio in (1.0, 0.5):
        res = compute_delta(
            model, tok, REQ, stats=stats, hparams=dataclasses.replace(HP, max_update_ratio=ratio)
        )
        upd = float(torch.linalg.matrix_norm(torch.outer(res.v, res.u), ord=2))
        assert upd == pytest.approx(ratio * w_norm, rel=1e-4)
        assert res.metrics["delta_capped"] and res.hparams["max_update_ratio"] == ratio


# ---------------------------------------------------------------------------------- bad input


def test_prompt_without_placeholder():
    with pytest.raises(RequestError, match=r"must contain exactly one '\{\}'"):
        EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome")


def test_empty_target():
    with pytest.raises(RequestError, match="target_new is empty"):
        EditRequest("{} is in", "The Eiffel Tower", "  ")


def test_target_of_only_special_tokens(text_file):
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    with pytest.raises(RequestError, match="tokenizes to nothing"):
        create_patch(
            model,
            tok,
            EditRequest("{} is in", "The Eiffel Tower", "</s>"),
            hparams=HP,
            stats_data=str(text_file),
        )


def test_subject_absent_from_tokens(text_file):
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    with pytest.raises(RequestError, match="is not found in the prompt's tokens"):
        create_patch(
            model, tok, EditRequest("{} is in", "<pad>", "Rome"), hparams=HP, stats_data=str(text_file)
        )


def test_layer_out_of_range(text_file):
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    with pytest.raises(ArchitectureError, match=r"layer 9 is out of range; this model has layers 0..3"):
        create_patch(model, tok, REQ, hparams=ROMEHyperParams(layer=9), stats_data=str(text_file))


def test_unreadable_stats_file(tmp_path):
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    with pytest.raises(StatsError, match=r"cannot read statistics file .*no such file"):
        create_patch(model, tok, REQ, hparams=HP, stats_data=str(tmp_path / "missing.txt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_cuda():
    with pytest.raises(DeviceError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")


# ---------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", init_range=INIT).save_pretrained(d)
    _tok("llama").save_pretrained(d)
    return d


def test_cli_create_show_predict(tiny_folder, text_file, tmp_path):
    out = tmp_path / "edit.safetensors"
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            REQ.prompt,
            "--subject",
            REQ.subject,
            "--target",
            "Rome",
            "--target-true",
            "Seattle",
            "--layer",
            "1",
            "--stats-data",
            str(text_file),
            "--stats-tokens",
            "2000",
            "--steps",
            "5",
            "-o",
            str(out),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["edits"][0]["target_new"] == "Rome" and load_patch(out).id == data["id"]
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            REQ.prompt,
            "--subject",
            REQ.subject,
            "--target",
            "Rome",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code != 0 and "exists; pass --overwrite" in r.stderr


def test_cli_create_bad_input_before_loading(tiny_folder, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            "no placeholder",
            "--subject",
            "X",
            "--target",
            "Y",
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert r.exit_code != 0 and "exactly one '{}'" in r.stderr
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            "{} is",
            "--subject",
            "X",
            "--target",
            "Y",
            "--stats-data",
            str(tmp_path / "nope.txt"),
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert r.exit_code != 0 and "no such file" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_requests_file_sequential(tiny_folder, text_file, tmp_path):
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text(
        json.dumps(
            {
                "requested_rewrite": {
                    "prompt": REQ.prompt,
                    "subject": REQ.subject,
                    "target_new": {"str": "Rome"},
                    "target_true": {"str": "Seattle"},
                },
                "case_id": 7,
            }
        )
        + "\n"
        + json.dumps(
            {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "football"}
        )
        + "\n"
    )
    out = tmp_path / "seq"
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--requests",
            str(reqs),
            "--mode",
            "sequential",
            "--layer",
            "1",
            "--stats-data",
            str(text_file),
            "--stats-tokens",
            "2000",
            "--steps",
            "5",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data) == 2 and data[1]["lineage"] == [data[0]["id"]]
    assert data[0]["edits"][0]["subject"] == REQ.subject


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


def test_replay_tolerance_by_dtype_and_depth():
    from rompatch.rome import replay_tolerance

    assert replay_tolerance(torch.float32, 48) == 1e-3
    bf16 = replay_tolerance(torch.bfloat16, 32)
    assert bf16 == pytest.approx(4 * 2**-7 * 32**0.5)
    assert replay_tolerance(torch.bfloat16, 2) < bf16 and replay_tolerance(torch.float16, 32) < bf16


def test_create_patch_takes_a_spec_for_an_unregistered_architecture(text_file):
    """``spec=`` is enough: no ``register_spec`` (no global state) for a model type rompatch does not know."""
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
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
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
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
    model, tok = make_model("llama", init_range=INIT), _tok("llama")
    editor = Editor(model, tok, hparams=HP, stats_data=str(text_file), stats_tokens=500)
    a = editor.patch(REQ)
    b = create_patch(model, tok, REQ, hparams=HP, stats=editor.stats)
    assert a.id == b.id  # the same edit, whether the Editor is kept or made per call
    assert editor.templates is editor.templates


def test_no_module_level_memos():
    """Caches live on objects passed explicitly (an Editor, the statistics), not on modules."""
    import rompatch.context
    import rompatch.rome
    import rompatch.stats

    for mod in (rompatch.rome, rompatch.context, rompatch.stats):
        assert not [k for k, v in vars(mod).items() if isinstance(v, TensorMemo)], mod.__name__
