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
        PatchVersionError, match=r"format 2.0, newer than this rompatch reads \(1.3\); upgrade rompatch"
    ):
        load_patch(path)


def test_newer_minor_version_accepted(tmp_path, patch):
    """A newer minor is read; top-level keys this version does not know are not content (dropped),
    annotations under 'x-' are kept."""
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["format_version"] = "1.7"
    meta["some_future_key"] = "dropped"
    meta["x-some-note"] = "kept"
    _rewrite(path, meta=meta)
    p = load_patch(path)
    assert p.id == patch.id and p.format_version == "1.7"
    assert "some_future_key" not in p.extra and p.extra["x-some-note"] == "kept"


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
    assert meta["format_version"] == "1.3"


# --------------------------------------------------------------------- hardening (issue 17)

REAL = Path(__file__).resolve().parent.parent / "patches" / "eiffel-tower-rome.safetensors"


def _one_line_error(path, match):
    with pytest.raises(PatchFormatError, match=match) as ei:
        load_patch(path)
    assert "\n" not in str(ei.value)
    return str(ei.value)


def _replace(path, key, old, new, out=None):
    """The file with ``old`` replaced by ``new`` (once) in the text of metadata ``key`` (id kept)."""
    meta, _ = _raw(path)
    assert old in meta[key], f"{old!r} not in metadata {key!r}"
    meta[key] = meta[key].replace(old, new, 1)
    return _rewrite(path, meta=meta, out=out)


def _edit(path, key, fn, out=None):
    """The file with metadata ``key`` (JSON) changed by ``fn`` on its parsed value (id kept)."""
    meta, _ = _raw(path)
    value = json.loads(meta[key])
    value = fn(value) or value
    meta[key] = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _rewrite(path, meta=meta, out=out)


@pytest.mark.parametrize(
    "key, old, new, why",
    [
        ("deltas", "2e-06", "2e906", "holds a number out of range"),  # one corrupted byte
        ("deltas", '"p_true_after":2e-06', '"p_true_after":NaN', "holds NaN or Infinity"),
        ("deltas", '"p_true_after":2e-06', '"p_true_after":Infinity', "holds NaN or Infinity"),
        ("deltas", '"p_true_after":2e-06', '"p_true_after":-Infinity', "holds NaN or Infinity"),
        ("deltas", '"kind":"rome","layer":4', '"kind":"rome","layer":1e999', "holds a number out of range"),
        (
            "deltas",
            '"kind":"rome","layer":4',
            '"kind":"rome","layer":' + "1" * 400,
            "holds an integer of more than 20 digits",
        ),
        (
            "deltas",
            '"kind":"rome","layer":4',
            '"kind":"rome","layer":' + "1" * 40,
            "holds an integer of more than 20 digits",
        ),
        ("parameters", "[576,1536]", "[1e999,1536]", "holds a number out of range"),
        ("parameters", "[576,1536]", "[" + "9" * 40 + ",1536]", "holds an integer of more than 20 digits"),
    ],
)
def test_corrupt_numbers_in_metadata_are_one_line_errors(tmp_path, key, old, new, why):
    """json.loads takes NaN, Infinity and 1e999 (inf); the canonical JSON of the hash then raised
    ValueError, and int(inf) OverflowError: now one line naming the key."""
    path = _replace(REAL, key, old, new, out=tmp_path / "bad.safetensors")
    _one_line_error(path, rf"metadata key '{key}' {why}.*the file is corrupt")


def test_deep_nesting_is_refused_without_recursion_error(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["lineage"] = "[" * 3000 + "]" * 3000
    _rewrite(path, meta=meta)
    _one_line_error(path, r"metadata key 'lineage' is nested deeper than 64 levels")
    meta["lineage"] = "[" * 65 + "]" * 65
    _rewrite(path, meta=meta)
    _one_line_error(path, r"metadata key 'lineage' is nested deeper than 64 levels")


@pytest.mark.parametrize(
    "key, old, new",
    [
        ("deltas", '"subject":"The Eiffel Tower"', '"subject":"The \\ud800 Tower"'),
        ("deltas", '"kind":"rome"', '"kind":"\\udc00"'),
        ("base", '"model":"smollm2-135m"', '"model":"\\ud800"'),
        ("parameters", '"dtype":"float32"', '"dtype":"\\ud800"'),
    ],
)
def test_unpaired_surrogates_are_refused(tmp_path, key, old, new):
    """A lone surrogate escape is valid JSON but not UTF-8: encoding it for the hash raised."""
    path = _replace(REAL, key, old, new, out=tmp_path / "bad.safetensors")
    _one_line_error(path, rf"metadata key '{key}' holds an unpaired surrogate")


def test_escaped_surrogate_pairs_are_fine(tmp_path, model):
    p = vector_patch(model, subject="Emoji 😀")
    path = save_patch(p, tmp_path / "p.safetensors")
    path = _replace(path, "deltas", "😀", "\\ud83d\\ude00")  # the same text, escaped as a pair
    assert load_patch(path).id == p.id


def _set_delta(field, value):
    def fn(deltas):
        deltas[0][field] = value

    return fn


def _set_request(field, value):
    def fn(deltas):
        deltas[0]["request"][field] = value

    return fn


def _set_param(field, value):
    def fn(params):
        next(iter(params.values()))[field] = value

    return fn


@pytest.mark.parametrize(
    "key, fn, why",
    [
        ("deltas", _set_delta("layer", "1"), r"delta 0 'layer' must be an integer from 0 to 65535"),
        ("deltas", _set_delta("layer", True), r"delta 0 'layer' must be an integer from 0 to 65535"),
        ("deltas", _set_delta("layer", 70000), r"delta 0 'layer' must be an integer from 0 to 65535"),
        ("deltas", _set_delta("layer", -1), r"delta 0 'layer' must be an integer from 0 to 65535"),
        ("deltas", _set_delta("kind", 7), r"delta 0 'kind' must be a non-empty string"),
        ("deltas", _set_delta("parameter", 7), r"delta 0 'parameter' must be a string"),
        ("deltas", _set_delta("request", "x"), r"delta 0 'request' must be an object or null"),
        ("deltas", _set_request("subject", 5), r"delta 0 request 'subject' must be a string"),
        ("deltas", _set_request("target_true", 5), r"delta 0 request 'target_true' must be a string"),
        ("deltas", _set_request("colour", "red"), r"delta 0 request has unknown field 'colour'"),
        ("deltas", _set_request("prompt", "no slot"), r"delta 0 request is invalid \(prompt 'no slot'"),
        ("deltas", _set_delta("hparams", [1]), r"delta 0 'hparams' must be an object"),
        ("deltas", _set_delta("metrics", "x"), r"delta 0 'metrics' must be an object"),
        ("deltas", _set_delta("stats", None), r"delta 0 'stats' must be an object"),
        ("deltas", _set_delta("metrics", {"p_new_after": "high"}), r"delta 0 metric 'p_new_after' must be"),
        ("deltas", _set_delta("metrics", {"neighbours": "Bob"}), r"delta 0 metric 'neighbours' must be"),
        (
            "deltas",
            _set_delta("metrics", {"neighbours_released": [1]}),
            r"delta 0 metric 'neighbours_released' must be a list of names",
        ),
        (
            "deltas",
            _set_delta("metrics", {"p_prompt_with_all_neighbours": "low"}),
            r"delta 0 metric 'p_prompt_with_all_neighbours' must be",
        ),
        ("deltas", _set_delta("timings", {"edit_seconds": "slow"}), r"delta 0 timing 'edit_seconds' must be"),
        ("deltas", _set_delta("key", 1), r"delta 0 'key' must be true when present"),
        ("deltas", lambda d: d.__setitem__(0, 5), r"delta 0 must be an object"),
        ("parameters", _set_param("shape", [64.0, 96]), r"'shape' must be two integers from 1 to"),
        ("parameters", _set_param("shape", [64, 96, 1]), r"'shape' must be two integers from 1 to"),
        ("parameters", _set_param("shape", [0, 96]), r"'shape' must be two integers from 1 to"),
        ("parameters", _set_param("shape", [2**40, 96]), r"'shape' must be two integers from 1 to"),
        ("parameters", _set_param("dtype", "float99"), r"'dtype' must be one of"),
        ("parameters", _set_param("sha256", "Z" * 64), r"'sha256' must be 64 lowercase hex"),
        ("parameters", lambda p: {k: 5 for k in p}, r"parameter '.*' must be an object"),
        (
            "base",
            lambda b: b.__setitem__("revision", 5),
            r"metadata 'base' field 'revision' must be a string",
        ),
        ("base", lambda b: b.__setitem__("dtype", ["x"]), r"metadata 'base' field 'dtype' must be a string"),
        ("lineage", lambda x: ["abc"], r"metadata 'lineage' must be a list of patch ids"),
    ],
)
def test_field_types_are_checked(tmp_path, patch, key, fn, why):
    path = save_patch(patch, tmp_path / "p.safetensors")
    _edit(path, key, fn)
    _one_line_error(path, why)


def test_patch_id_must_be_hex(tmp_path, patch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["patch_id"] = "not-an-id"
    _rewrite(path, meta=meta)
    _one_line_error(path, r"metadata 'patch_id' must be 64 lowercase hex characters")


def test_metadata_size_limit(tmp_path, patch):
    """A real patch's metadata is a few KB (2.4 KB per ROME delta); 32 MiB is the limit."""
    from rompatch.patch import MAX_METADATA_BYTES, from_safetensors

    assert MAX_METADATA_BYTES == 32 << 20
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, tensors = _raw(path)
    meta["x-blob"] = "a" * MAX_METADATA_BYTES
    _rewrite(path, meta=meta)
    _one_line_error(path, r"header of \d+ bytes is larger than the 32 MiB a patch may have")
    with pytest.raises(PatchFormatError, match=r"metadata of \d+ bytes is larger than the 32 MiB limit"):
        from_safetensors(meta, tensors)


def test_unknown_metadata_keys_are_dropped_and_x_keys_kept(tmp_path, patch):
    """Keys outside the format are not content: a reader drops them (they never reach records or
    re-saved files); annotations of other tools go under 'x-' and are kept, outside the hash."""
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["some_future_key"] = "dropped"
    meta["x-reviewed-by"] = "alice"
    _rewrite(path, meta=meta)
    p = load_patch(path)
    assert p.id == patch.id and "some_future_key" not in p.extra and p.extra["x-reviewed-by"] == "alice"
    meta2, _ = _raw(save_patch(p, tmp_path / "again.safetensors"))
    assert meta2["x-reviewed-by"] == "alice" and "some_future_key" not in meta2


def test_unknown_extra_keys_are_refused_when_saving(tmp_path, patch):
    patch.extra["reviewer"] = "alice"
    with pytest.raises(PatchFormatError, match=r"metadata key 'reviewer' is not part of the format.*'x-'"):
        save_patch(patch, tmp_path / "p.safetensors")


@pytest.mark.parametrize("key", ["stacked_from", "merged_from", "extracted_from"])
def test_provenance_is_in_the_id_from_format_1_3(patch, key):
    value = {
        "stacked_from": [{"deltas": [0, 2], "id": "a" * 64}],
        "merged_from": {"condition": {}, "inputs": [{"deltas": [0, 2], "id": "b" * 64}]},
        "extracted_from": {"base": "a", "edited": "b", "tensors": {}},
    }[key]
    plain = patch.id
    patch.extra[key] = json.dumps(value)
    assert patch.format_version == "1.3" and patch.id != plain
    with_it = patch.id
    patch.extra[key] = json.dumps(value, indent=2)  # the id is of the JSON value, not its spelling
    assert patch.id == with_it
    patch.format_version = "1.2"  # as written by 1.2, the key was outside the id
    assert patch.id == plain


def test_tampered_provenance_is_detected(tmp_path, patch):
    patch.extra["extracted_from"] = json.dumps({"base": "a", "edited": "b", "tensors": {}})
    path = save_patch(patch, tmp_path / "p.safetensors")
    _replace(path, "extracted_from", '"edited": "b"', '"edited": "c"')
    _one_line_error(path, r"does not match the recorded patch_id")


def test_malformed_audit_is_dropped_on_load(tmp_path, patch, caplog):
    """An audit is an annotation outside the id: a corrupt one is dropped (with a warning), not fatal."""
    path = save_patch(patch, tmp_path / "p.safetensors")
    meta, _ = _raw(path)
    meta["audit"] = '{"patch_id": NaN'
    _rewrite(path, meta=meta)
    p = load_patch(path)
    assert p.audit() is None and p.summary()["audit"] is None
    assert "audit" in caplog.text and "dropped" in caplog.text
