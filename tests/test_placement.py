"""Models placed by accelerate device maps (``rompatch.placement``; issue 16, point 1).

On this CPU-only suite the map offloads every other block to disk: its weights are ``meta`` tensors
on the module and accelerate loads them from the checkpoint for each forward pass. Statistics,
edits, patches, apply/revert, traces and evaluation must be exactly what the same model on one
device gives (float32, CPU), and the checkpoint on disk must never change.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import tempfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rompatch.apply import apply_patch, patched, revert_patch, verify_applied
from rompatch.cli.main import cli
from rompatch.create import create_patch
from rompatch.errors import DeviceError
from rompatch.loading import load_patched
from rompatch.models import load_model
from rompatch.patch import load_patch, save_patch
from rompatch.placement import (
    input_device,
    is_offloaded,
    module_device,
    param_value,
    parse_device_map,
    parse_max_memory,
    write_param,
)
from rompatch.stats import get_second_moment
from tests.helpers import HP, REQ, needs_cuda, save_edit_folder
from tests.helpers.evaluation import CF
from tests.helpers.tracing import PROMPT, SUBJECT

IDS_TEXT = "The Space Needle is located in the city of"


def half_on_disk(n_layers: int) -> dict[str, str]:
    """Embeddings, final norm and head on the CPU; blocks 1, 3, ... offloaded to disk."""
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(n_layers)})
    return dm


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_edit_folder(tmp_path_factory.mktemp("tiny-edit"))


@pytest.fixture(scope="module")
def models(folder, tmp_path_factory):
    """(model on one device, the same model with half its blocks on disk, tokenizer, map file)."""
    plain, tok = load_model(folder, device="cpu")
    dm = half_on_disk(plain.config.num_hidden_layers)
    mapped, _ = load_model(folder, device_map=dm, offload_folder=tmp_path_factory.mktemp("offload"))
    map_file = tmp_path_factory.mktemp("map") / "map.json"
    map_file.write_text(json.dumps(dm))
    return plain, mapped, tok, map_file


def _weights_sha(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def _logits(model, tok, text=IDS_TEXT):
    ids = tok(text, return_tensors="pt").to(input_device(model))
    with torch.no_grad():
        return model(**ids).logits


def test_the_map_offloads_what_it_says(models):
    _, mapped, _, _ = models
    assert is_offloaded(mapped, "model.layers.1.mlp.down_proj.weight")
    assert not is_offloaded(mapped, "model.layers.2.mlp.down_proj.weight")
    assert mapped.get_parameter("model.layers.1.mlp.down_proj.weight").device.type == "meta"
    assert input_device(mapped) == torch.device("cpu")
    assert module_device(mapped, "model.layers.1.mlp.down_proj") == torch.device("cpu")


def test_offloaded_values_are_the_checkpoint_values(models):
    plain, mapped, tok, _ = models
    for name, p in plain.named_parameters():
        assert torch.equal(param_value(mapped, name), p), name
    assert torch.equal(_logits(plain, tok), _logits(mapped, tok))


@pytest.mark.parametrize("layer", [1, 2], ids=["edited-layer-on-disk", "edited-layer-resident"])
def test_statistics_and_patches_are_bit_identical(models, folder, layer, text_file):
    plain, mapped, tok, _ = models
    before = _weights_sha(folder)
    hp = dataclasses.replace(HP, layer=layer)
    st = get_second_moment(plain, tok, layer, stats_data=str(text_file), n_tokens=2000)
    st_mapped = get_second_moment(mapped, tok, layer, stats_data=str(text_file), n_tokens=2000)
    assert torch.equal(st.mom2, st_mapped.mom2) and st.identity == st_mapped.identity
    p1 = create_patch(plain, tok, [REQ], hparams=hp, stats=st)
    p2 = create_patch(mapped, tok, [REQ], hparams=hp, stats=st_mapped)
    assert p1.id == p2.id  # the content hash covers u, v, k and the base fingerprint
    d1, d2 = p1.deltas[0], p2.deltas[0]
    assert torch.equal(d1.u, d2.u) and torch.equal(d1.v, d2.v)
    assert _weights_sha(folder) == before


def test_apply_and_revert_on_an_offloaded_weight(models, folder, text_file):
    plain, mapped, tok, _ = models
    before = _weights_sha(folder)
    base = _logits(plain, tok)
    hp = dataclasses.replace(HP, layer=1)
    st = get_second_moment(plain, tok, 1, stats_data=str(text_file), n_tokens=2000)
    patch = create_patch(plain, tok, [REQ], hparams=hp, stats=st)
    name = patch.deltas[0].parameter
    assert is_offloaded(mapped, name)
    apply_patch(plain, patch)
    apply_patch(mapped, patch)
    try:
        verify_applied(mapped, patch)
        edited = _logits(mapped, tok)
        assert not torch.equal(edited, base)  # the forward pass reads the patched value
        assert torch.equal(edited, _logits(plain, tok))
        assert torch.equal(param_value(mapped, name), plain.get_parameter(name))
    finally:
        revert_patch(plain, patch)
        revert_patch(mapped, patch)
    assert torch.equal(_logits(mapped, tok), base)
    assert torch.equal(param_value(mapped, name), plain.get_parameter(name))
    assert _weights_sha(folder) == before  # patched in memory, never in the checkpoint accelerate maps


def test_write_param_on_an_offloaded_weight_is_read_by_the_forward_pass(models):
    plain, mapped, tok, _ = models
    name = "model.layers.3.mlp.down_proj.weight"
    saved = param_value(mapped, name).clone()
    try:
        write_param(mapped, name, torch.zeros_like(saved))
        assert torch.count_nonzero(param_value(mapped, name)) == 0
        assert not torch.equal(_logits(mapped, tok), _logits(plain, tok))
    finally:
        write_param(mapped, name, saved)
    assert torch.equal(_logits(mapped, tok), _logits(plain, tok))


def test_load_patched_with_a_device_map(models, folder, tmp_path, text_file):
    plain, _, tok, _ = models
    hp = dataclasses.replace(HP, layer=1)
    patch = create_patch(
        plain,
        tok,
        [REQ],
        hparams=hp,
        stats=get_second_moment(plain, tok, 1, stats_data=str(text_file), n_tokens=2000),
    )
    f = save_patch(patch, tmp_path / "p.safetensors")
    m, _ = load_patched(folder, [f], device_map=half_on_disk(plain.config.num_hidden_layers))
    with patched(plain, patch):
        assert torch.equal(_logits(m, tok), _logits(plain, tok))


def test_memit_with_a_device_map_is_bit_identical(models, text_file):
    from rompatch.methods.memit import MEMITEditor, MEMITHyperParams

    plain, mapped, tok, _ = models
    hp = MEMITHyperParams(
        layers=(1, 2), v_steps=10, v_lr=3.0, context_length_params=((3, 2),), mom2_update_weight=10.0
    )
    stats = {x: get_second_moment(plain, tok, x, stats_data=str(text_file), n_tokens=2000) for x in (1, 2)}
    p1 = MEMITEditor(plain, tok, hparams=hp, stats=stats).patch([REQ])
    p2 = MEMITEditor(mapped, tok, hparams=hp, stats=stats).patch([REQ])
    assert p1.id == p2.id and is_offloaded(mapped, p1.deltas[0].parameter)


# ------------------------------------------------------------------------------------------ CLI


def _run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def test_cli_create_with_a_device_map_writes_the_same_patch(models, folder, tmp_path, text_file):
    _, _, _, map_file = models
    req = ["--prompt", REQ.prompt, "--subject", REQ.subject, "--target", REQ.target_new]
    common = ["--layer", 1, "--stats-data", text_file, "--stats-tokens", 1500, "--steps", 5]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    r = _run("create", folder, *req, *common, "--device", "cpu", "-o", a)
    assert r.exit_code == 0, r.output
    r = _run("create", folder, *req, *common, "--device-map", map_file, "-o", b)
    assert r.exit_code == 0, r.output
    assert load_patch(a).id == load_patch(b).id


def test_cli_trace_with_a_device_map_gives_the_same_scores(models, folder, tmp_path):
    _, _, _, map_file = models
    args = [
        "--prompt",
        PROMPT,
        "--subject",
        SUBJECT,
        "--noise-std",
        1,
        "--samples",
        2,
        "--window",
        2,
        "--no-plot",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    r = _run("trace", folder, *args, "--device", "cpu", "-o", a)
    assert r.exit_code == 0, r.output
    r = _run("trace", folder, *args, "--device-map", map_file, "-o", b)
    assert r.exit_code == 0, r.output
    sa, sb = np.load(a / "scores.npz"), np.load(b / "scores.npz")
    assert sorted(sa.files) == sorted(sb.files)
    for k in sa.files:
        if k == "meta":  # JSON, with timings
            ma, mb = (json.loads(str(x[k])) for x in (sa, sb))
            for m in (ma, mb):
                m.pop("timings"), m.pop("seconds")
            assert ma == mb
        else:
            assert np.array_equal(sa[k], sb[k]), k


def test_cli_eval_with_a_device_map_gives_the_same_scores(models, folder, tmp_path, text_file):
    _, _, _, map_file = models
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF))
    common = ["--data", data, "--limit", 2, "--layer", 1, "--stats-data", text_file, "--stats-tokens", 1500,
              "--no-fluency", "--json"]  # fmt: skip
    r = _run("eval", folder, *common, "--device", "cpu")
    assert r.exit_code == 0, r.output
    r2 = _run("eval", folder, *common, "--device-map", map_file)
    assert r2.exit_code == 0, r2.output
    a, b = json.loads(r.stdout), json.loads(r2.stdout)
    assert len(a["cases"]) == 2
    for ca, cb in zip(a["cases"], b["cases"]):
        assert ca["pre"] == cb["pre"] and ca["post"] == cb["post"]
    timing = ("median_edit_seconds",)
    assert {k: v for k, v in a["summary"].items() if k not in timing} == {
        k: v for k, v in b["summary"].items() if k not in timing
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cpu", "--device-map", "auto"], "either --device (cpu) or --device-map"),
        (["--max-memory", "cpu=1GiB"], "need --device-map"),
        (["--device-map", "no-such-strategy"], "neither a strategy"),
        (["--device-map", "{not json"], "not valid JSON"),
        (["--device-map", '{"model.layers.0": 1.5}'], "is not module name -> device"),
        (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "expected DEVICE=SIZE pairs"),
    ],
)
def test_cli_placement_errors_are_one_line(folder, tmp_path, args, message):
    out = tmp_path / "p.safetensors"
    r = _run("create", folder, "--prompt", REQ.prompt, "--subject", REQ.subject, "--target", "Rome", *args,
             "-o", out)  # fmt: skip
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_parse_device_map_and_max_memory(tmp_path):
    assert parse_device_map("balanced") == "balanced"
    f = tmp_path / "m.json"
    f.write_text('{"model.embed_tokens": 0, "lm_head": "cpu", "model.layers.0": "disk"}')
    assert parse_device_map(str(f)) == {"model.embed_tokens": 0, "lm_head": "cpu", "model.layers.0": "disk"}
    assert parse_max_memory("0=20GiB, cuda:1=10GiB,cpu=64GiB") == {0: "20GiB", 1: "10GiB", "cpu": "64GiB"}
    with pytest.raises(DeviceError, match="unknown device"):
        parse_max_memory("gpu0=1GiB")
    with pytest.raises(DeviceError, match="unknown device"):
        parse_device_map({"lm_head": "tpu:0"})


def test_default_offload_folder_is_removed_with_the_model(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = json.loads((folder / "config.json").read_text())
    model, _ = load_model(folder, device_map=half_on_disk(cfg["num_hidden_layers"]))
    made = [p for p in tmp_path.iterdir() if p.name.startswith("rompatch-offload-")]
    assert len(made) == 1 and made[0].is_dir()
    del model
    gc.collect()
    assert not made[0].exists()


# ------------------------------------------------------------------------------------- on CUDA


def gpu_map(n_layers: int) -> dict[str, int | str]:
    """Blocks over the GPUs (two when there are two), every third one offloaded to CPU memory."""
    gpus = min(torch.cuda.device_count(), 2)
    dm: dict[str, int | str] = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": gpus - 1,
                                "lm_head": gpus - 1}  # fmt: skip
    for i in range(n_layers):
        dm[f"model.layers.{i}"] = "cpu" if i % 3 == 1 else (0 if i < n_layers // 2 else gpus - 1)
    return dm


@needs_cuda
def test_device_map_on_cuda_edits_applies_and_traces(folder, tmp_path, text_file):
    from rompatch.tracing.trace import CausalTracer

    plain, tok = load_model(folder, device="cuda")
    mapped, _ = load_model(folder, device_map=gpu_map(plain.config.num_hidden_layers))
    assert is_offloaded(mapped, "model.layers.1.mlp.down_proj.weight")  # CPU memory, computed on the GPU
    assert input_device(mapped).type == "cuda"
    hp = dataclasses.replace(HP, layer=1)
    st = get_second_moment(plain, tok, 1, stats_data=str(text_file), n_tokens=2000)
    st_mapped = get_second_moment(mapped, tok, 1, stats_data=str(text_file), n_tokens=2000)
    assert torch.allclose(st.mom2, st_mapped.mom2, rtol=1e-4, atol=1e-6)
    p1 = create_patch(plain, tok, [REQ], hparams=hp, stats=st)
    p2 = create_patch(mapped, tok, [REQ], hparams=hp, stats=st)
    d1, d2 = p1.deltas[0], p2.deltas[0]
    assert torch.allclose(d1.u, d2.u, rtol=1e-4, atol=1e-6) and torch.allclose(
        d1.v, d2.v, rtol=1e-3, atol=1e-5
    )
    base = _logits(mapped, tok)
    with patched(mapped, p2):
        assert not torch.equal(_logits(mapped, tok), base)
        with patched(plain, p2):
            assert torch.allclose(_logits(mapped, tok).cpu(), _logits(plain, tok).cpu(), rtol=1e-4, atol=1e-4)
    assert torch.equal(_logits(mapped, tok), base)
    tr = CausalTracer(mapped, tok, PROMPT, SUBJECT, noise_std=0.5, samples=2)
    scores = tr.scores("mlp", window=2)
    assert np.isfinite(scores).all()
