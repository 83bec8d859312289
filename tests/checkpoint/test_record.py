"""The record (rompatch.json) and undo data: staleness, corruption, round trip."""

from __future__ import annotations

import json

import pytest

from rompatch.checkpoint.operations import apply_to_checkpoint, checkpoint_log, revert_checkpoint
from rompatch.checkpoint.reader import open_checkpoint
from rompatch.checkpoint.record import read_record
from rompatch.constants import CHECKPOINT_RECORD, CHECKPOINT_UNDO
from rompatch.errors import (
    CheckpointError,
)
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    make_ckpt,
    tensor_shas,
)


def test_stale_record_is_detected(tmp_path):
    model, base = make_ckpt(tmp_path)
    patch = vector_patch(model, layer=1)
    apply_to_checkpoint(base, [patch], tmp_path / "out", link=False)
    name = patch.deltas[0].parameter
    ck = open_checkpoint(tmp_path / "out")
    e = ck.entry(name)
    with open(tmp_path / "out" / e.file, "r+b") as f:  # someone else rewrites the edited tensor
        f.seek(e.offset)
        f.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=rf"{name} changed after rompatch wrote this checkpoint"):
        apply_to_checkpoint(tmp_path / "out", [vector_patch(model, layer=2, subject="B")], tmp_path / "x")
    assert checkpoint_log(tmp_path / "out")["modified"] == [name]
    revert_checkpoint(tmp_path / "out", all=True, force=True, in_place=True)
    assert tensor_shas(tmp_path / "out") == tensor_shas(base)


def test_record_round_trips_and_rebuilds_the_applied_patches(tmp_path):
    model, base = make_ckpt(tmp_path)
    p1, p2 = vector_patch(model, layer=1, n=2), vector_patch(model, layer=2, subject="B")
    apply_to_checkpoint(base, [p1, p2], tmp_path / "out", link=False)
    rec = read_record(tmp_path / "out")
    assert [a.patch.id for a in rec.applied] == [p1.id, p2.id]
    assert sorted(rec.tensors) == sorted({*p1.parameters, *p2.parameters})
    assert json.loads((tmp_path / "out" / CHECKPOINT_RECORD).read_text()) == rec.to_json()
    assert read_record(base) is None


def test_corrupt_or_newer_records_are_refused(tmp_path):
    model, base = make_ckpt(tmp_path)
    apply_to_checkpoint(base, [vector_patch(model, layer=1)], tmp_path / "out", link=False)
    out = tmp_path / "out"
    raw = json.loads((out / CHECKPOINT_RECORD).read_text())
    (out / CHECKPOINT_RECORD).write_text(json.dumps({**raw, "format_version": "9.0"}))
    with pytest.raises(CheckpointError, match="written by a newer rompatch"):
        read_record(out)
    (out / CHECKPOINT_RECORD).write_text(json.dumps({k: v for k, v in raw.items() if k != "applied"}))
    with pytest.raises(CheckpointError, match="not a valid rompatch record"):
        read_record(out)
    (out / CHECKPOINT_RECORD).write_text(json.dumps(raw))
    with open(out / CHECKPOINT_UNDO, "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="undo data is truncated or from another checkpoint"):
        read_record(out)
    (out / CHECKPOINT_UNDO).unlink()
    with pytest.raises(CheckpointError, match="undo data rompatch-undo.st is missing"):
        read_record(out)


# ------------------------------------------------------------- a strict record reader (issue 17)


@pytest.fixture
def applied(tmp_path):
    model, base = make_ckpt(tmp_path)
    apply_to_checkpoint(base, [vector_patch(model, layer=1)], tmp_path / "out", link=False)
    out = tmp_path / "out"
    return out, json.loads((out / CHECKPOINT_RECORD).read_text())


def _set(path, value):
    def fn(raw):
        *head, last = path
        node = raw
        for k in head:
            node = node[k]
        node[last] = value
        return raw

    return fn


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda raw: [1, 2], "the record must be a JSON object"),
        (_set(["undo"], "x"), "'undo' must be an object"),
        (_set(["undo", "bytes"], float("nan")), "holds NaN or Infinity"),
        (_set(["undo", "bytes"], "12"), "'undo' bytes must be a non-negative integer"),
        (_set(["base"], [[[[]]]]), "'base' must be an object"),
        (_set(["applied"], "x"), "'applied' must be a list"),
        (
            _set(["applied", 0, "forced_reasons"], 5),
            r"applied\[0\] 'forced_reasons' must be a list of strings",
        ),
        (_set(["applied", 0, "fingerprints"], []), r"applied\[0\] 'fingerprints' must be an object"),
        (_set(["applied", 0, "forced"], "no"), r"applied\[0\] 'forced' must be true or false"),
        (_set(["applied", 0, "patch"], {"format": 5}), r"applied\[0\] 'patch' must map strings to strings"),
        (_set(["applied", 0, "patch_id"], 5), r"applied\[0\] 'patch_id' must be 64 lowercase hex"),
        (_set(["tensors"], {"x": 5}), r"tensor 'x' must be an object"),
        (lambda raw: _set(["tensors", next(iter(raw["tensors"])), "shape"], [1e300])(raw), "shape"),
        (lambda raw: _set(["tensors", next(iter(raw["tensors"])), "sha256"], 5)(raw), "sha256"),
        (_set(["format_version"], 5), "'format_version' must be a string"),
    ],
)
def test_corrupt_records_are_one_line_checkpoint_errors(applied, change, why):
    """Each of these gave a traceback (AttributeError, ValueError, TypeError) or was accepted."""
    out, raw = applied
    (out / CHECKPOINT_RECORD).write_text(json.dumps(change(raw)))
    with pytest.raises(CheckpointError, match=why) as ei:
        read_record(out)
    msg = str(ei.value)
    assert "\n" not in msg and "rompatch.json" in msg and "corrupt" in msg


@pytest.mark.parametrize(
    "text, why",
    [
        (
            '{"format": "rompatch-checkpoint", "base": ' + "[" * 3000 + "]" * 3000 + "}",
            "nested deeper than 64",
        ),
        ('{"format": "rompatch-checkpoint", "base": {"x": 1e999}}', "out of range"),
        ('{"format": "rompatch-checkpoint", "base": {"\\ud800": 1}}', "unpaired surrogate"),
    ],
)
def test_unparsable_records_are_one_line_checkpoint_errors(applied, text, why):
    out, _ = applied
    (out / CHECKPOINT_RECORD).write_text(text)
    with pytest.raises(CheckpointError, match=rf"rompatch.json: not a valid rompatch record .*{why}"):
        read_record(out)


def test_record_size_limit(applied, monkeypatch):
    from rompatch.checkpoint import record

    assert record.RECORD_MAX_BYTES == 256 << 20
    out, _ = applied
    monkeypatch.setattr(record, "RECORD_MAX_BYTES", 100)
    with pytest.raises(
        CheckpointError, match=r"rompatch.json is \d+ bytes, more than the .* MiB a record may have"
    ):
        read_record(out)


def test_records_do_not_copy_unknown_or_x_keys(tmp_path):
    """The record keeps what rebuilds the patch and its provenance, not a file's other metadata (a
    99 MB metadata key became a 99 MB record)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rompatch.patch import save_patch

    model, base = make_ckpt(tmp_path)
    p = vector_patch(model, layer=1)
    path = save_patch(p, tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "junk": "j" * 10_000, "x-note": "n" * 10_000})
    apply_to_checkpoint(base, [path], tmp_path / "out", link=False)
    recorded = json.loads((tmp_path / "out" / CHECKPOINT_RECORD).read_text())["applied"][0]["patch"]
    assert "junk" not in recorded and "x-note" not in recorded
    assert recorded["patch_id"] == p.id
    assert read_record(tmp_path / "out").applied[0].patch.id == p.id
