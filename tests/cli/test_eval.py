"""``rompatch eval`` on a tiny model folder: output folder and resume, zsRE, sequential, plots, bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from tests.helpers.evaluation import CF, ZSRE
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import make_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", init_range=0.3).save_pretrained(d)
    make_tokenizer(bos=True).save_pretrained(d)
    return d


def _cli(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def test_cli_eval_counterfact_out_dir_and_resume(tiny_folder, text_file, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF))
    out = tmp_path / "out"
    common = ["--layer", 1, "--stats-data", text_file, "--stats-tokens", 1500, "--device", "cpu"]
    r = _cli(
        tiny_folder, "--data", data, "--limit", 1, "--gen-length", 10, "--out", out, "--no-plot", *common
    )
    assert r.exit_code == 0, r.output
    assert "| Editor | Score S |" in r.stdout and "(unedited)" in r.stdout
    assert len((out / "cases.jsonl").read_text().splitlines()) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["generation"]["max_out_len"] == 10 and "GE" in res["cases"][0]["post"]
    r = _cli(tiny_folder, "--data", data, "--limit", 1, "--gen-length", 10, "--out", out, "--no-plot", "--json",
             *common)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["computed"] == 0
    r = _cli(
        tiny_folder, "--data", data, "--limit", 1, "--gen-length", 12, "--out", out, "--no-plot", *common
    )
    assert r.exit_code == 1 and "different evaluation" in r.stderr and "generation" in r.stderr


def test_cli_eval_zsre_and_sequential_with_plots(tiny_folder, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    common = ["--layer", 1, "--stats-data", text_file, "--stats-tokens", 1500, "--device", "cpu"]
    z = tmp_path / "z.json"
    z.write_text(json.dumps(ZSRE))
    r = _cli(tiny_folder, "--data", z, "--out", tmp_path / "z", *common)
    assert r.exit_code == 0, r.output
    assert "| Editor | Efficacy | Paraphrase | Specificity |" in r.stdout
    assert (tmp_path / "z" / "eval-zsre.png").stat().st_size > 1000
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF))
    r = _cli(tiny_folder, "--data", data, "--sequential", 2, "--eval-every", 1, "--gen-length", 8, "--out",
             tmp_path / "s", *common)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "| edits N |" in r.stdout
    assert (tmp_path / "s" / "eval-sequential-counterfact.png").stat().st_size > 1000
    assert len(list((tmp_path / "s" / "patches").glob("*.safetensors"))) == 2


def test_cli_eval_bad_input(tiny_folder, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps([{"foo": 1}]))
    r = _cli(tiny_folder, "--data", bad)
    assert r.exit_code == 1 and "cannot tell the data kind" in r.stderr
    r = _cli(tiny_folder, "--data", tmp_path / "missing.json")
    assert r.exit_code == 1 and "cannot read" in r.stderr
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CF))
    r = _cli(tiny_folder, "--data", data, "--sequential", 5, "--no-fluency", "--no-mom2", "--device", "cpu")
    assert r.exit_code == 1 and "needs 5 records" in r.stderr
    r = _cli(tiny_folder, "--data", data, "--tfidf", tmp_path)
    assert r.exit_code == 1 and "--tfidf needs --snippets" in r.stderr
