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
