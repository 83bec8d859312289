"""MEMIT (rompatch/methods/memit) on tiny models of every architecture: its patches apply, revert
bit for bit, stack, merge and export to PEFT like any other patch; large batches are stored
SVD-compressed."""

from __future__ import annotations

import pytest
import torch

from rompatch.apply import apply_patch, patched, revert_patch
from rompatch.errors import MergeError, RequestError
from rompatch.fingerprint import tensor_sha256
from rompatch.hub.peft import export_peft
from rompatch.merge import merge_patches
from rompatch.methods.memit import MEMITEditor, MEMITHyperParams, create_memit_patch
from rompatch.request import EditRequest
from rompatch.stack import stack_patches
from rompatch.stats import get_second_moment
from tests.helpers import REQ, edit_model, edit_tokenizer, greedy_next
from tests.helpers.tiny import ARCHS

HP = MEMITHyperParams(
    layers=(0, 1), v_steps=40, v_lr=3.0, context_length_params=((3, 2),), mom2_update_weight=10.0
)
OTHERS = [
    EditRequest("{} plays the sport of", "Michael Jordan", "football", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def _stats(model, tok, text_file, layers=(0, 1)):
    return {x: get_second_moment(model, tok, x, stats_data=str(text_file), n_tokens=3000) for x in layers}


def _state(model):
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_memit_edits_apply_revert_and_stack(arch, text_file):
    model, tok = edit_model(arch), edit_tokenizer(arch)
    stats = _stats(model, tok, text_file)
    before = _state(model)
    patch = MEMITEditor(model, tok, hparams=HP, stats=stats).patch([REQ, *OTHERS])
    assert _state(model) == before, "creating a MEMIT patch leaves the model unchanged"
    assert {d.layer for d in patch.deltas} == {0, 1} and len(patch.parameters) == 2
    assert all(
        d.kind == "memit" and d.key is not None and d.hparams["solve"] == "joint" for d in patch.deltas
    )
    target_first = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    assert greedy_next(model, tok, REQ.text) != target_first
    apply_patch(model, patch)
    assert greedy_next(model, tok, REQ.text) == target_first
    revert_patch(model, patch)
    assert _state(model) == before, "revert is bit for bit"
    other = MEMITEditor(model, tok, hparams=HP, stats=stats).patch([OTHERS[0]])
    with patched(model, stack_patches([patch, other], allow_conflicts=True)):
        assert greedy_next(model, tok, REQ.text) == target_first
    assert _state(model) == before


def test_memit_spreads_the_residual_over_its_layers(text_file):
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    patch = MEMITEditor(model, tok, hparams=HP, stats=_stats(model, tok, text_file)).patch([REQ])
    norms = {d.layer: float(d.v.norm() * d.u.norm()) for d in patch.deltas}
    assert norms[0] > 0 and norms[1] > 0
    assert patch.deltas[-1].metrics["p_new_after"] > patch.deltas[-1].metrics["p_new_before"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_patch_exports_to_an_equal_peft_adapter(arch, text_file, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    model, tok = edit_model(arch), edit_tokenizer(arch)
    patch = MEMITEditor(model, tok, hparams=HP, stats=_stats(model, tok, text_file)).patch([REQ, *OTHERS])
    x = tok([REQ.text], return_tensors="pt").input_ids
    with torch.no_grad(), patched(model, patch):
        ref = model(x).logits
    export_peft(patch, tmp_path / "adapter")
    with torch.no_grad():
        assert float((model(x).logits - ref).abs().max()) > 1e-2, "the patch changes the logits"
    pm = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert float((pm(x).logits - ref).abs().max()) < 1e-4


def test_large_batches_are_svd_compressed_and_exact(text_file):
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    stats = _stats(model, tok, text_file, layers=(1,))
    hp = MEMITHyperParams(layers=(1,), v_steps=2, context_length_params=((3, 1),), mom2_update_weight=10.0)
    d_in, d_out = model.config.intermediate_size, model.config.hidden_size
    n = min(d_in, d_out) + 6
    reqs = [EditRequest(f"{{}} number {i} is located in", f"Town{i}", "Rome") for i in range(n)]
    ed = MEMITEditor(model, tok, hparams=hp, stats=stats)
    patch = ed.patch(reqs)
    assert len(patch.deltas) <= min(d_in, d_out) < n
    assert all(d.key is None and d.hparams["svd_compressed"]["edits"] == n for d in patch.deltas)
    assert patch.nbytes() <= 4 * min(d_in, d_out) * (d_in + d_out)
    # the factorisation is the dense least-squares update, to float32 rounding
    small = MEMITEditor(model, tok, hparams=hp, stats=stats)._layer_deltas
    keys = torch.randn(n, d_in, dtype=torch.float64)
    resid = torch.randn(n, d_out, dtype=torch.float64)
    compressed = small(ed.targets[0], reqs, keys, resid)
    C = stats[1].mom2.double()
    dense = resid.T @ torch.linalg.solve(10.0 * C + keys.T @ keys, keys.T).T
    got = sum(torch.outer(d.v.double(), d.u.double()) for d in compressed)
    assert float((got - dense).norm() / dense.norm()) < 1e-5
    with pytest.raises(MergeError, match="has no key .*SVD-compressed MEMIT layer"):
        merge_patches([patch])


def test_memit_patches_merge_and_create_on(text_file):
    model, tok = edit_model("llama"), edit_tokenizer("llama")
    stats = _stats(model, tok, text_file)
    first = create_memit_patch(model, tok, [REQ], hparams=HP, stats=stats)
    second = create_memit_patch(model, tok, OTHERS, hparams=HP, stats=stats, on=[first])
    assert second.lineage == [first.id]
    merged = merge_patches([first, second])
    assert merged.merged_from()["inputs"][0]["id"] == first.id


def test_memit_refuses_bad_settings(text_file):
    with pytest.raises(RequestError, match="layers must be distinct and increasing"):
        MEMITHyperParams(layers=(2, 1))
    with pytest.raises(RequestError, match="mom2_update_weight must be > 0"):
        MEMITHyperParams(mom2_update_weight=0)


def test_stacking_a_memit_patch_does_not_call_its_layers_duplicates(text_file, caplog):
    import logging

    model, tok = edit_model("llama"), edit_tokenizer("llama")
    patch = MEMITEditor(model, tok, hparams=HP, stats=_stats(model, tok, text_file)).patch([REQ])
    assert (
        len(patch.deltas) == 2 and patch.deltas[0].request == patch.deltas[1].request
    )  # one edit, two layers
    with caplog.at_level(logging.WARNING):
        stack_patches([patch])
    assert "applied twice" not in caplog.text
