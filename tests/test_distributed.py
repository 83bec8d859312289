"""Statistics and evaluation shared by torch.distributed processes (``rompatch.distributed``; issue 16,
points 2 and 3): ``torchrun -m rompatch stats`` / ``eval`` with 2 CPU processes (gloo) against one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rompatch.distributed import SINGLE, Group
from rompatch.evaluation.evaluate import run_evaluation
from rompatch.evaluation.records import CASES_FILE, PART_FILE, read_cases
from rompatch.models import load_model
from tests.helpers import save_edit_folder
from tests.helpers.evaluation import HP, cf_record

# Six records for the tiny model (the subject ends the prompt; see tests/helpers/evaluation.py).
RECORDS = [
    cf_record(1, "The Space Needle is located in {}", "the city of", "Rome", "Seattle"),
    cf_record(2, "Lionel Messi plays {}", "the sport of", "guitar", "football"),
    cf_record(3, "The Eiffel Tower is located in {}", "the city of", "Tokyo", "Paris"),
    cf_record(4, "The Colosseum is located in {}", "the city of", "Berlin", "Rome"),
    cf_record(5, "Michael Jordan plays {}", "the sport of", "football", "basketball"),
    cf_record(6, "The Louvre is located in {}", "the city of", "Madrid", "Paris"),
]
TIMING = ("median_edit_seconds",)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_edit_folder(tmp_path_factory.mktemp("tiny-edit"))


def _rompatch(args, *, cache: Path, procs: int = 1) -> subprocess.CompletedProcess:
    """``python -m rompatch ARGS``, or the same under torchrun with ``procs`` processes."""
    env = {**os.environ, "ROMPATCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "rompatch"]
    if procs > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                  "-m", "rompatch"]  # fmt: skip
    r = subprocess.run([*launch, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _stats_files(cache: Path) -> list[Path]:
    return sorted((cache / "stats").glob("*.safetensors"))


def test_two_process_statistics_equal_one_process(folder, text_file, tmp_path):
    args = ["stats", folder, "--layer", 1, "--stats-data", text_file, "--stats-tokens", 5000, "--device", "cpu",
            "--json"]  # fmt: skip
    one = json.loads(_rompatch(args, cache=tmp_path / "one").stdout)
    two = json.loads(_rompatch(args, cache=tmp_path / "two", procs=2).stdout)  # rank 0 prints, once
    assert two[0]["processes"] == 2 and "processes" not in one[0]
    assert two[0]["collected_tokens"] == one[0]["collected_tokens"] == 5000
    (f1,), (f2,) = _stats_files(tmp_path / "one"), _stats_files(tmp_path / "two")
    assert f1.name == f2.name  # one cache entry, under the single-process identity
    a, b = load_file(f1)["mom2"], load_file(f2)["mom2"]
    # equal up to the order of the float64 additions (then rounded to float32)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert (a != b).float().mean() < 0.01


def test_torchrun_eval_equals_one_process_on_six_records(folder, text_file, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    args = ["eval", folder, "--data", data, "--layer", 1, "--stats-data", text_file, "--stats-tokens", 1500,
            "--no-fluency", "--no-plot", "--device", "cpu", "--json"]  # fmt: skip
    cache = tmp_path / "cache"  # shared: the second run finds the statistics the first computed
    one = json.loads(_rompatch([*args, "--out", tmp_path / "one"], cache=cache).stdout)
    two = json.loads(_rompatch([*args, "--out", tmp_path / "two"], cache=cache, procs=2).stdout)
    assert one["computed"] == two["computed"] == 6
    assert [c["case_id"] for c in two["cases"]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one["cases"], two["cases"]):
        assert a["pre"] == b["pre"] and a["post"] == b["post"]
    assert {k: v for k, v in one["summary"].items() if k not in TIMING} == {
        k: v for k, v in two["summary"].items() if k not in TIMING
    }
    out = tmp_path / "two"
    assert sorted(int(c["case_id"]) for c in read_cases(out / CASES_FILE)) == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob(PART_FILE.format(rank="*")))  # rank 0 took the parts in
    # Resume under torchrun: nothing left to compute.
    again = json.loads(_rompatch([*args, "--out", out], cache=cache, procs=2).stdout)
    assert again["computed"] == 0 and again["summary"]["n"] == 6


def test_an_interrupted_torchrun_eval_resumes_from_its_part_files(folder, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(folder, device="cpu")
    from rompatch.stats import get_second_moment

    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=1500)
    out = tmp_path / "out"
    first = run_evaluation(model, tok, RECORDS[:3], kind="counterfact", hparams=HP, stats=stats, out_dir=out)
    # As a 2-process run leaves it when stopped before rank 0 gathered: cases in the part files only.
    cases = read_cases(out / CASES_FILE)
    (out / CASES_FILE).write_text(json.dumps(cases[0]) + "\n")
    (out / PART_FILE.format(rank=0)).write_text(json.dumps(cases[1]) + "\n")
    (out / PART_FILE.format(rank=1)).write_text(json.dumps(cases[2]) + "\n" + json.dumps(cases[0]) + "\n")
    res = run_evaluation(model, tok, RECORDS[:3], kind="counterfact", hparams=HP, stats=stats, out_dir=out)
    assert res["computed"] == 0 and res["cases"] == first["cases"]
    assert not list(out.glob(PART_FILE.format(rank="*")))
    assert sorted(c["case_id"] for c in read_cases(out / CASES_FILE)) == [1, 2, 3]  # each once


def test_single_group_is_the_identity():
    assert SINGLE.is_main and SINGLE.world == 1 and all(SINGLE.mine(i) for i in range(5))
    t = torch.arange(3.0)
    assert SINGLE.all_sum(t) is t and SINGLE.all_gather("x") == ["x"] and SINGLE.all_true(True)
    g = Group(rank=1, world=3)
    assert [i for i in range(7) if g.mine(i)] == [1, 4]
