"""Atomic outputs: an existing folder is replaced only when asked, and only if it looks like the right kind."""

from __future__ import annotations

import pytest

from rompatch.atomic import staged_folder
from rompatch.checkpoint.operations import apply_to_checkpoint, checkpoint_log, revert_checkpoint
from rompatch.errors import (
    CheckpointError,
)
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    file_shas,
    leftovers,
    make_ckpt,
    save_sharded,
)
from tests.helpers.tiny import make_model


def test_existing_out_refused_unless_overwrite(tmp_path):
    model, base = make_ckpt(tmp_path)
    p1, p2 = vector_patch(model, layer=1, seed=1), vector_patch(model, layer=2, seed=2, subject="B")
    apply_to_checkpoint(base, [p1], tmp_path / "out")
    before = file_shas(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"already exists; pass --overwrite"):
        apply_to_checkpoint(base, [p2], tmp_path / "out")
    assert file_shas(tmp_path / "out") == before
    apply_to_checkpoint(base, [p2], tmp_path / "out", overwrite=True)
    assert [e["id"] for e in checkpoint_log(tmp_path / "out")["applied"]] == [p2.id]
    assert leftovers(tmp_path) == []

    home = tmp_path / "not-a-model"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="does not look like a model folder"):
        apply_to_checkpoint(base, [p1], home, overwrite=True)
    assert (home / "notes.txt").read_text() == "precious"
    nested = tmp_path / "outer"
    nested.mkdir()
    (nested / "config.json").write_text("{}")
    inner_model = make_model("llama")
    save_sharded(inner_model, nested / "inner")
    with pytest.raises(CheckpointError, match="contains the input"):
        apply_to_checkpoint(nested / "inner", [p1], nested, overwrite=True)

    # in-place apply: OUT == BASE with --overwrite
    copy = tmp_path / "copy"
    apply_to_checkpoint(base, [p1], copy)
    revert_checkpoint(copy, all=True, in_place=True)
    apply_to_checkpoint(copy, [p2], copy, overwrite=True)
    assert [e["id"] for e in checkpoint_log(copy)["applied"]] == [p2.id]


class _MyError(Exception):
    pass


def test_staged_folder_replaces_atomically_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out, error=_MyError) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with pytest.raises(RuntimeError):
        with staged_folder(out, error=_MyError) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and leftovers(tmp_path) == []
    with pytest.raises(_MyError, match="appeared while writing"):  # by default an existing folder stays
        with staged_folder(out, error=_MyError) as tmp:
            (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and leftovers(tmp_path) == []
    checked = []
    with staged_folder(out, error=_MyError, may_replace=checked.append) as tmp:  # swapped, not merged
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"] and leftovers(tmp_path) == [] and checked == [out]
