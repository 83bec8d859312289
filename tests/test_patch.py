"""Patch format v1: round-trips and strict validation, one asserted message per malformed input."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rompatch.errors import PatchFormatError, PatchVersionError
from rompatch.patch import load_patch, save_patch
from tests.helpers import vector_patch
from tests.helpers.tiny import make_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "patch-format.md"


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture
def patch(model):
    return vector_patch(model, layer=1, n=2)


def _raw(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path, meta=None, tensors=None, out=None):
    m, t = _raw(path)
    out = out or path
    save_file(tensors if tensors is not None else t, str(out), metadata=meta if meta is not None else m)
    return out


def test_round_trip_keeps_everything(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    back = load_patch(path)
    assert back.id == patch.id
    assert back.base == patch.base and back.parameters == patch.parameters and back.lineage == patch.lineage
    for a, b in zip(patch.deltas, back.deltas):
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
        assert a.request == b.request and a.layer == b.layer and a.parameter == b.parameter
        assert a.hparams == b.hparams
    # Saving the loaded patch again gives the same id and tensors.
    again = save_patch(back, tmp_path / "q.safetensors")
    assert load_patch(again).id == patch.id


def test_tensor_names_and_dtypes(tmp_path, patch):
    meta, tensors = _raw(save_patch(patch, tmp_path / "p.safetensors"))
    assert sorted(tensors) == ["deltas.0.u", "deltas.0.v", "deltas.1.u", "deltas.1.v"]
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert meta["format"] == "rompatch" and meta["format_version"].startswith("1.")
    assert all(isinstance(v, str) for v in meta.values())


def test_id_is_content_hash(model):
    a = vector_patch(model, seed=1)
    b = vector_patch(model, seed=1)
    c = vector_patch(model, seed=2)
    assert a.id == b.id != c.id
    assert re.fullmatch(r"[0-9a-f]{64}", a.id)


def test_no_temp_files_left(tmp_path, patch):
    save_patch(patch, tmp_path / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_truncated_file(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchFormatError, match=r"not a readable safetensors file .*truncated"):
        load_patch(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(PatchFormatError, match=r"not a readable safetensors file"):
        load_patch(path)


def test_missing_file(tmp_path):
    with pytest.raises(PatchFormatError, match=r"no such patch file"):
        load_patch(tmp_path / "nope.safetensors")


def test_plain_safetensors_without_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(PatchFormatError, match=r"has no metadata; it is not a rompatch patch"):
        load_patch(path)


def test_bad_json_metadata(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["deltas"] = meta["deltas"][:-5]
    _rewrite(path, meta=meta)
    with pytest.raises(PatchFormatError, match=r"metadata key 'deltas' is not valid JSON"):
        load_patch(path)


def test_missing_key(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    del meta["lineage"]
    _rewrite(path, meta=meta)
    with pytest.raises(PatchFormatError, match=r"missing required key\(s\) lineage"):
        load_patch(path)


def test_uv_shape_mismatch(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    _, tensors = _raw(path)
    tensors["deltas.0.u"] = tensors["deltas.0.u"][:-1].clone()
    _rewrite(path, tensors=tensors)
    with pytest.raises(
        PatchFormatError, match=r"delta 0 has u of size 95 and v of size 64, but .* needs u=96 and v=64"
    ):
        load_patch(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(tmp_path, patch, bad):
    path = save_patch(patch, tmp_path / "p.safetensors")
    _, tensors = _raw(path)
    tensors["deltas.1.v"] = tensors["deltas.1.v"].clone()
    tensors["deltas.1.v"][3] = bad
    _rewrite(path, tensors=tensors)
    with pytest.raises(PatchFormatError, match=r"delta 1 tensor v holds NaN or Inf"):
        load_patch(path)


def test_newer_major_version_refused(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["format_version"] = "2.0"
    _rewrite(path, meta=meta)
    with pytest.raises(
        PatchVersionError, match=r"format 2.0, newer than this rompatch reads \(1.2\); upgrade rompatch"
    ):
        load_patch(path)


def test_newer_minor_version_accepted(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["format_version"] = "1.7"
    meta["some_future_key"] = "kept"
    _rewrite(path, meta=meta)
    p = load_patch(path)
    assert p.id == patch.id and p.extra["some_future_key"] == "kept"


def test_tampered_tensor_detected(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    _, tensors = _raw(path)
    tensors["deltas.0.v"] = tensors["deltas.0.v"] * 2
    _rewrite(path, tensors=tensors)
    with pytest.raises(PatchFormatError, match=r"does not match the recorded patch_id .* modified"):
        load_patch(path)


def test_extra_tensor_refused(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    _, tensors = _raw(path)
    tensors["deltas.9.u"] = torch.zeros(3)
    _rewrite(path, tensors=tensors)
    with pytest.raises(PatchFormatError, match=r"unexpected: \['deltas.9.u'\]"):
        load_patch(path)


def test_wrong_tensor_dtype(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    _, tensors = _raw(path)
    tensors["deltas.0.u"] = tensors["deltas.0.u"].half()
    _rewrite(path, tensors=tensors)
    with pytest.raises(PatchFormatError, match=r"deltas.0.u is torch.float16, the format requires float32"):
        load_patch(path)


def test_one_delta_smollm2_size_bound(tmp_path):
    """A one-delta patch on SmolLM2's down_proj (1536 → 576) is ≤ 4·(1536+576) bytes + 16 KiB of header."""
    from rompatch.patch import ParamInfo, RankOneDelta, new_patch
    from rompatch.request import EditRequest

    name = "model.layers.6.mlp.down_proj.weight"
    w = torch.randn(576, 1536)
    d = RankOneDelta(
        torch.randn(1536),
        torch.randn(576),
        6,
        name,
        request=EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris"),
        hparams={k: 0.1 for k in "abcdefghijklmnopqrstuvwxyz"},
        metrics={"p_new": 0.9, "p_true": 0.01},
    )
    p = new_patch(
        [d],
        base={
            "model": "smollm2-135m",
            "revision": "gguf-sha256:" + "0" * 64,
            "model_type": "llama",
            "dtype": "float32",
        },
        parameters={name: ParamInfo.of(w)},
    )
    path = save_patch(p, tmp_path / "p.safetensors")
    assert path.stat().st_size <= 4 * (1536 + 576) + 16 * 1024
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len < 16 * 1024


def _doc_example():
    text = DOC.read_text()
    blocks = re.findall(r"```json example-metadata\n(.*?)```", text, re.S)
    tblocks = re.findall(r"```json example-tensors\n(.*?)```", text, re.S)
    assert len(blocks) == 1 and len(tblocks) == 1, "docs/patch-format.md must hold one worked example"
    return json.loads(blocks[0]), json.loads(tblocks[0])


def test_spec_example_round_trips(tmp_path):
    """The worked example in docs/patch-format.md is a valid patch, byte-for-byte reproducible."""
    meta, tensors = _doc_example()
    path = tmp_path / "example.safetensors"
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}, str(path), metadata=meta)
    p = load_patch(path)
    assert p.id == meta["patch_id"]
    out = save_patch(p, tmp_path / "again.safetensors")
    meta2, tensors2 = _raw(out)
    assert meta2 == meta
    assert {k: v.tolist() for k, v in tensors2.items()} == tensors


def test_spec_documents_every_key():
    text = DOC.read_text()
    meta, _ = _doc_example()
    for key in meta:
        assert f"`{key}`" in text, f"docs/patch-format.md does not describe key {key}"
    for key in (
        "shape",
        "dtype",
        "sha256",
        "layout",
        "layer",
        "parameter",
        "kind",
        "request",
        "hparams",
        "stats",
        "metrics",
    ):
        assert f"`{key}`" in text


# ------------------------------------------------------------------------------ reproducibility

_SAVE_IN_CHILD = """
import sys
from rompatch.patch import load_patch, save_patch
save_patch(load_patch(sys.argv[1]), sys.argv[2])
"""


def test_same_patch_saved_twice_is_byte_identical(tmp_path, patch):
    """The safetensors writer orders metadata by a per-process hash; the file must not depend on it."""
    import subprocess
    import sys

    a = save_patch(patch, tmp_path / "a.safetensors")
    b = save_patch(patch, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    for i in range(3):  # other processes, other hash seeds
        out = tmp_path / f"c{i}.safetensors"
        subprocess.run([sys.executable, "-c", _SAVE_IN_CHILD, str(a), str(out)], check=True)
        assert out.read_bytes() == a.read_bytes()
    header_len = struct.unpack("<Q", a.read_bytes()[:8])[0]
    assert (8 + header_len) % 8 == 0, "the data section stays 8-byte aligned"


def test_timings_are_kept_but_outside_the_id(tmp_path, patch):
    patch.deltas[0].timings = {"edit_seconds": 1.5}
    before = patch.id
    patch.deltas[0].timings = {"edit_seconds": 99.0, "stats_seconds": 3.0}
    assert patch.id == before
    back = load_patch(save_patch(patch, tmp_path / "p.safetensors"))
    assert back.deltas[0].timings == {"edit_seconds": 99.0, "stats_seconds": 3.0} and back.id == before
    assert back.deltas[0].seconds == 99.0
    patch.deltas[0].metrics = {"p_new_after": 0.5}
    assert patch.id != before, "metrics are part of the id"


def test_same_computation_gives_the_same_id(tmp_path, monkeypatch):
    """Two runs of one deterministic edit differ only in wall time, which the id leaves out."""
    from rompatch.create import create_patch
    from rompatch.request import EditRequest
    from rompatch.rome import ROMEHyperParams
    from rompatch.stats import get_second_moment
    from tests.helpers.tiny_tokenizer import make_tokenizer

    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))
    model, tok = make_model("llama", init_range=0.3), make_tokenizer(bos=True)
    req = EditRequest("The Space Needle is located in {}", "the city of", "Rome", "Seattle")
    hp = ROMEHyperParams(layer=1, v_steps=4, context_length_params=((3, 1),), max_update_ratio=0)
    ids, timings = [], []
    for _ in range(2):
        stats = get_second_moment(model, tok, 1, stats_data="sampled", n_tokens=512, use_cache=False)
        p = create_patch(model, tok, req, hparams=hp, stats=stats)
        ids.append(p.id)
        timings.append(p.deltas[0].timings)
    assert ids[0] == ids[1]
    assert "edit_seconds" in timings[0] and "stats_seconds" in timings[0]


def test_format_1_0_files_load_keep_their_id_and_version(tmp_path):
    """patches/ holds files written in format 1.0 (wall time under metrics, inside the id)."""
    src = Path(__file__).resolve().parent.parent / "patches" / "eiffel-tower-rome.safetensors"
    meta, _ = _raw(src)
    assert meta["format_version"] == "1.0"
    p = load_patch(src)
    assert p.id == meta["patch_id"] and p.format_version == "1.0"
    assert p.deltas[0].seconds == p.deltas[0].metrics["seconds"] and p.deltas[0].timings == {}
    # hyperparameters that are no longer knobs (never read) stay in the record, so the id holds
    assert {"key", "value", "target_spacing", "fact_token"} <= set(p.deltas[0].hparams)
    again = save_patch(p, tmp_path / "again.safetensors")
    meta2, _ = _raw(again)
    assert meta2["format_version"] == "1.0" and meta2["patch_id"] == p.id
    assert load_patch(again).id == p.id


def test_new_patches_are_written_in_the_current_minor_version(tmp_path, patch):
    meta, _ = _raw(save_patch(patch, tmp_path / "p.safetensors"))
    assert meta["format_version"] == "1.2"
