"""Opening checkpoint folders: single-file and sharded, bare keys, refusals of what is not one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rompatch.apply import apply_patch
from rompatch.checkpoint.operations import apply_to_checkpoint
from rompatch.checkpoint.reader import open_checkpoint
from rompatch.errors import (
    CheckpointError,
)
from rompatch.fingerprint import tensor_sha256
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    read_tensor,
)
from tests.helpers.tiny import make_model


def test_single_file_checkpoint_and_bare_model_keys(tmp_path):
    """model.safetensors without an index; keys saved without the base-model prefix (old GPT-2)."""
    model = make_model("gpt2")
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    patch = vector_patch(model, layer=1)
    apply_to_checkpoint(folder, [patch], tmp_path / "out")
    apply_patch(model, patch)
    name = patch.deltas[0].parameter
    assert tensor_sha256(read_tensor(tmp_path / "out", name)) == tensor_sha256(model.get_parameter(name))

    bare = tmp_path / "bare"
    bare.mkdir()
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in make_model("gpt2").state_dict().items()}
    sd.pop("lm_head.weight", None)
    save_file(sd, bare / "model.safetensors", metadata={"format": "pt"})
    (bare / "config.json").write_text((folder / "config.json").read_text())
    patch2 = vector_patch(make_model("gpt2"), layer=1)
    apply_to_checkpoint(bare, [patch2], tmp_path / "bare-out")
    key = name.removeprefix("transformer.")
    assert tensor_sha256(read_tensor(tmp_path / "bare-out", key)) != tensor_sha256(sd[key])


def test_pickle_checkpoint_refused_with_conversion_hint(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as ei:
        apply_to_checkpoint(folder, [vector_patch(make_model("llama"))], tmp_path / "out")
    msg = str(ei.value)
    assert "pytorch_model.bin" in msg and "never unpickles" in msg and "save_pretrained" in msg
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder: "):  # also a ModelLoadError, as in load_model
        open_checkpoint(tmp_path / "missing" / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        open_checkpoint(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "../../payload/evil.safetensors",
        "/abs/evil.safetensors",
        "../../etc/passwd",
        "sub/../../x.safetensors",
        7,
        "link.safetensors",
    ],
    ids=["dotdot", "absolute", "etc-passwd", "dotdot-inside", "not-a-string", "symlink-out"],
)
def test_index_shard_names_must_stay_inside_the_folder(tmp_path, bad):
    """Issue 17, failure 1: a crafted index names a shard outside the checkpoint folder. Nothing is read
    or written outside it, the error is one line, and it shows no file's bytes."""
    from tests.helpers.ckpt import make_ckpt

    model, folder = make_ckpt(tmp_path / "dir" / "deep")
    victim = tmp_path / "dir" / "payload" / "evil.safetensors"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"precious")
    (folder / "link.safetensors").symlink_to(victim)  # a link inside the folder that leaves it
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = bad
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "dir" / "deep" / "out"
    with pytest.raises(CheckpointError) as ei:
        apply_to_checkpoint(folder, [vector_patch(model)], out)
    msg = str(ei.value)
    assert "outside the checkpoint folder" in msg or "not a file name" in msg
    assert len(msg.splitlines()) == 1 and "precious" not in msg
    assert victim.read_bytes() == b"precious" and not out.exists()
    with pytest.raises(CheckpointError):
        open_checkpoint(folder)
