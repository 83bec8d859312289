"""`rompatch create`: flags, requests files, sequential mode, bad input before loading."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.patch import load_patch
from tests.helpers import REQ, save_edit_folder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_edit_folder(tmp_path_factory.mktemp("tiny-llama"))


def test_cli_create_show_predict(tiny_folder, text_file, tmp_path):
    out = tmp_path / "edit.safetensors"
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            REQ.prompt,
            "--subject",
            REQ.subject,
            "--target",
            "Rome",
            "--target-true",
            "Seattle",
            "--layer",
            "1",
            "--stats-data",
            str(text_file),
            "--stats-tokens",
            "2000",
            "--steps",
            "5",
            "-o",
            str(out),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["edits"][0]["target_new"] == "Rome" and load_patch(out).id == data["id"]
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            REQ.prompt,
            "--subject",
            REQ.subject,
            "--target",
            "Rome",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code != 0 and "exists; pass --overwrite" in r.stderr


def test_cli_create_bad_input_before_loading(tiny_folder, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            "no placeholder",
            "--subject",
            "X",
            "--target",
            "Y",
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert r.exit_code != 0 and "exactly one '{}'" in r.stderr
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--prompt",
            "{} is",
            "--subject",
            "X",
            "--target",
            "Y",
            "--stats-data",
            str(tmp_path / "nope.txt"),
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert r.exit_code != 0 and "no such file" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_requests_file_sequential(tiny_folder, text_file, tmp_path):
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text(
        json.dumps(
            {
                "requested_rewrite": {
                    "prompt": REQ.prompt,
                    "subject": REQ.subject,
                    "target_new": {"str": "Rome"},
                    "target_true": {"str": "Seattle"},
                },
                "case_id": 7,
            }
        )
        + "\n"
        + json.dumps(
            {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "football"}
        )
        + "\n"
    )
    out = tmp_path / "seq"
    r = CliRunner().invoke(
        cli,
        [
            "create",
            str(tiny_folder),
            "--requests",
            str(reqs),
            "--mode",
            "sequential",
            "--layer",
            "1",
            "--stats-data",
            str(text_file),
            "--stats-tokens",
            "2000",
            "--steps",
            "5",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data) == 2 and data[1]["lineage"] == [data[0]["id"]]
    assert data[0]["edits"][0]["subject"] == REQ.subject


def test_cli_create_checks_tokens_and_output_before_the_statistics(tiny_folder, tmp_path, monkeypatch):
    """Issue 17, failure 6: a target of special tokens only, or an output under a regular file, fails at
    once, before any statistics are computed."""
    import rompatch.create as create_mod

    def no_stats(*a, **kw):
        raise AssertionError("statistics computed before the cheap checks")

    monkeypatch.setattr(create_mod, "get_second_moment", no_stats)
    base = ["create", str(tiny_folder), "--prompt", REQ.prompt, "--subject", REQ.subject]
    r = CliRunner().invoke(cli, [*base, "--target", "</s>", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "tokenizes to nothing" in r.stderr and "Traceback" not in r.output
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(cli, [*base, "--target", "Rome", "-o", str(tmp_path / "afile" / "x.safetensors")])
    assert r.exit_code == 1 and "is a file, not a folder" in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
