"""Model folders that cannot be loaded give one line, not a traceback (issue 17, failure 5): pickle
weights only, a corrupt rompatch record."""

from __future__ import annotations

import pytest

from rompatch.checkpoint.operations import apply_to_checkpoint
from rompatch.cli.main import cli
from rompatch.errors import CheckpointError, ModelLoadError
from rompatch.models import load_model
from tests.helpers import vector_patch
from tests.helpers.ckpt import make_ckpt


def _one_line(result) -> str:
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output[-3000:]
    return lines[0]


def test_a_folder_of_pickle_weights_is_refused_without_unpickling(tmp_path, runner):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    line = _one_line(runner.invoke(cli, ["predict", str(folder), "--prompt", "x"]))
    assert "pickle weights (pytorch_model.bin)" in line and "Convert once" in line
    with pytest.raises(CheckpointError, match="rompatch never unpickles"):
        load_model(folder)


@pytest.mark.parametrize(
    "record", ['["a list"]', '{"format": "rompatch-checkpoint", "undo": "x"}', "{" * 5000]
)
def test_a_corrupt_record_is_one_line_when_loading_the_model(tmp_path, runner, record):
    model, base = make_ckpt(tmp_path)
    apply_to_checkpoint(base, [vector_patch(model, layer=1)], tmp_path / "out")
    (tmp_path / "out" / "rompatch.json").write_text(record)
    line = _one_line(runner.invoke(cli, ["predict", str(tmp_path / "out"), "--prompt", "x"]))
    assert "rompatch.json" in line
    with pytest.raises((CheckpointError, ModelLoadError)):
        load_model(tmp_path / "out")
