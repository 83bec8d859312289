"""`rompatch create --mode batch | --on | --protect | --method memit` and `rompatch stack --merge`
(with what show, log and diff say of a merge) on the tiny Llama folder."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rompatch.cli.main import cli
from rompatch.patch import load_patch
from tests.helpers import save_edit_folder

REQUESTS = [
    {"prompt": "The Space Needle is located in {}", "subject": "the city of", "target_new": "Rome"},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "football"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_edit_folder(tmp_path_factory.mktemp("tiny-llama"))


def _create(folder, text_file, out, *extra):
    args = ["create", str(folder), "--stats-data", str(text_file), "--stats-tokens", "2000", "--steps", "4"]
    r = CliRunner().invoke(cli, [*args, "-o", str(out), "--device", "cpu", *extra])
    assert r.exit_code == 0, r.output
    return r


def test_batch_on_protect_and_merge(tiny_folder, text_file, tmp_path):
    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps(REQUESTS))
    one = tmp_path / "one.json"
    one.write_text(json.dumps(REQUESTS[:1]))
    _create(
        tiny_folder,
        text_file,
        tmp_path / "batch.st",
        "--requests",
        str(reqs),
        "--mode",
        "batch",
        "--layer",
        "1",
    )
    batch = load_patch(tmp_path / "batch.st")
    assert len(batch.deltas) == 3 and all(d.hparams["solve"] == "joint" for d in batch.deltas)
    _create(tiny_folder, text_file, tmp_path / "a.st", "--requests", str(one), "--layer", "1")
    _create(
        tiny_folder, text_file, tmp_path / "b.st", "--prompt", REQUESTS[1]["prompt"], "--subject",
        REQUESTS[1]["subject"], "--target", "football", "--layer", "1", "--on", str(tmp_path / "a.st"), "--protect",
        "--protect-principal", "2",
    )  # fmt: skip
    a, b = load_patch(tmp_path / "a.st"), load_patch(tmp_path / "b.st")
    assert b.lineage == [a.id] and b.deltas[0].hparams["protect"] is True
    assert abs(float(b.deltas[0].u @ a.deltas[0].key)) < 1e-4 * float(a.deltas[0].key.norm())
    r = CliRunner().invoke(
        cli,
        ["stack", str(tmp_path / "a.st"), str(tmp_path / "b.st"), "--merge", "-o", str(tmp_path / "m.st")],
    )
    assert r.exit_code == 0, r.output
    assert "2 delta(s) merged from 2 patch(es)" in r.stdout and "condition number" in r.stdout
    r = CliRunner().invoke(cli, ["show", str(tmp_path / "m.st")])
    assert f"merged   from 2 patch(es): {a.id[:12]}, {b.id[:12]}" in r.stdout
    r = CliRunner().invoke(cli, ["diff", str(tmp_path / "a.st"), str(tmp_path / "m.st")])
    assert r.exit_code == 0 and "B merged   from 2 patch(es)" in r.stdout
    r = CliRunner().invoke(
        cli, ["apply", str(tiny_folder), str(tmp_path / "m.st"), "-o", str(tmp_path / "ck")]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["log", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    assert "    merged   from 2 patch(es)" in r.stdout


def test_memit_from_the_cli(tiny_folder, text_file, tmp_path):
    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps(REQUESTS))
    _create(
        tiny_folder,
        text_file,
        tmp_path / "memit.st",
        "--requests",
        str(reqs),
        "--method",
        "memit",
        "--layers",
        "0,1",
    )
    p = load_patch(tmp_path / "memit.st")
    assert {d.layer for d in p.deltas} == {0, 1} and all(d.kind == "memit" for d in p.deltas)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "memit", "--mode", "sequential"], "does not take --mode sequential"),
        (["--method", "memit", "--layer", "1"], "does not take --layer"),
        (["--method", "memit", "--layers", "a,b"], "--layers must be comma-separated integers"),
        (["--layers", "0,1"], "--layers is for --method memit"),
        (["--protect-principal", "3"], "--protect-principal needs --protect"),
        (["--mode", "batch", "--split"], "--split writes independent edits one per file"),
        (["--on", "missing.safetensors"], "missing.safetensors"),
    ],
)
def test_bad_combinations_fail_before_loading(args, message, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "create",
            "no-such-model",
            "--prompt",
            "{} is in",
            "--subject",
            "X",
            "--target",
            "Y",
            "-o",
            str(tmp_path / "o.st"),
            *args,
        ],
    )
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "o.st").exists()


def test_merge_refuses_patches_without_keys(tiny_folder, text_file, tmp_path):
    from rompatch.patch import new_patch

    _create(
        tiny_folder,
        text_file,
        tmp_path / "a.st",
        "--prompt",
        REQUESTS[0]["prompt"],
        "--subject",
        REQUESTS[0]["subject"],
        "--target",
        "Rome",
        "--layer",
        "1",
    )
    a = load_patch(tmp_path / "a.st")
    d = a.deltas[0]
    d.key = None
    new_patch([d], base=a.base, parameters=a.parameters).save(tmp_path / "old.st")
    r = CliRunner().invoke(
        cli,
        ["stack", str(tmp_path / "old.st"), str(tmp_path / "a.st"), "--merge", "-o", str(tmp_path / "m.st")],
    )
    assert r.exit_code == 1 and "has no key" in r.output and not (tmp_path / "m.st").exists()
