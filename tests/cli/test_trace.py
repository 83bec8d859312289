"""``rompatch trace`` (rompatch.cli.trace) on a tiny model saved to a folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from tests.helpers.tiny_tokenizer import make_tokenizer
from tests.helpers.tracing import PROMPT, SUBJECT, known_records, tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def trace(model_dir, *args):
    """``rompatch trace MODEL_DIR ARGS...``."""
    return CliRunner().invoke(cli, ["trace", str(model_dir), *map(str, args)])


def test_cli_single_prompt(model_dir, tmp_path):
    out = tmp_path / "out"
    r = trace(
        model_dir,
        *("--prompt", PROMPT, "--subject", SUBJECT, "--noise-std", 1, "--samples", 2, "--window", 2),
        *("--device", "cpu", "-o", out),
    )
    assert r.exit_code == 0, r.output
    assert "suggested edit layer:" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scores.json", "scores.npz", "trace-attn.png", "trace-hidden.png", "trace-mlp.png"]
    d = json.loads((out / "scores.json").read_text())
    assert np.asarray(d["scores"]["mlp"]).shape == (len(d["tokens"]), 4)
    assert f"suggested edit layer: {d['suggested_layer']}" in r.stdout


def test_cli_json_and_kinds(model_dir):
    r = trace(
        model_dir,
        *("--prompt", PROMPT, "--subject", SUBJECT, "--noise-std", 1, "--samples", 2),
        *("--kinds", "hidden,attn", "--device", "cpu", "--json"),
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kinds"] == ["hidden", "attn"] and d["suggested_layer"] is None and d["files"] == []


def test_cli_errors_write_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    r = trace(model_dir, "--prompt", PROMPT, "--subject", "Colosseum", "--noise-std", 1, "-o", out)
    assert r.exit_code == 1
    assert "Error: subject 'Colosseum' does not occur" in r.stderr
    assert not out.exists()
    r = trace(model_dir, "--prompt", PROMPT, "--subject", SUBJECT, "--noise", 3, "--noise-std", 1)
    assert r.exit_code == 2 and "not both" in r.stderr
    r = trace(model_dir, "--prompt", PROMPT)
    assert r.exit_code == 2 and "--known FILE" in r.stderr
    r = trace(model_dir, "--known", tmp_path / "none.json", "-o", out)
    assert r.exit_code == 1 and "not found" in r.stderr and not out.exists()


def test_cli_known(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    recs = known_records(model, tok, n=2)
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps(recs))
    out = tmp_path / "known"
    r = trace(
        model_dir,
        *("--known", facts, "--noise-std", 1, "--samples", 2, "--window", 2, "--device", "cpu", "-o", out),
    )
    assert r.exit_code == 0, r.output
    assert f"facts traced: {len(recs)} of {len(recs)} checked" in r.stdout
    assert "MLP effect concentrates at layer" in r.stdout
    for name in ("average.json", "average.npz", "average-mlp.png", "average-lines.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "cases").glob("fact-*.json"))) == len(recs)
