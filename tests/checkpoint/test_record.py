"""The record (rompatch.json) and undo data: staleness, corruption, round trip."""

from __future__ import annotations

import pytest

from rompatch.checkpoint.operations import apply_to_checkpoint, checkpoint_log, revert_checkpoint
from rompatch.checkpoint.reader import open_checkpoint
from rompatch.errors import (
    CheckpointError,
)
from tests.ckpt_helpers import (
    make_ckpt,
    tensor_shas,
)
from tests.helpers import vector_patch


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
