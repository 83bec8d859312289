"""rompatch.audit: reach arithmetic, names, verdicts, the whole audit on tiny models, the report in
the patch file, show, the model card and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner

from rompatch.audit import AuditReport, Thresholds, attach_audit, audit_patch, render, saved_audit
from rompatch.audit.probes import clean_answer
from rompatch.audit.reach import DeltaKey, ReachScan, delta_keys
from rompatch.cli.main import cli
from rompatch.create import Editor
from rompatch.errors import AuditError
from rompatch.hub.modelcard import render_body
from rompatch.patch import load_patch, new_patch
from rompatch.stats import get_second_moment
from tests.helpers import HP, REQ, edit_model, edit_tokenizer, save_edit_folder
from tests.helpers.tiny import ARCHS

FAST = dataclasses.replace(HP, v_steps=4)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


def _edit(arch, text_file):
    model, tok = edit_model(arch), edit_tokenizer(arch)
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    patch = Editor(model, tok, hparams=FAST, stats=stats).patch([REQ])
    return model, tok, patch


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ reach arithmetic


def _scan_of(u, key, keys, thresholds=(0.1, 0.5)):
    scan = ReachScan([DeltaKey(0, u, key, "stored")], ["m"], top=5, thresholds=thresholds)
    ids = torch.arange(keys.shape[0])[None]
    scan.add(ids, torch.ones_like(ids), {"m": keys[None]}, "corpus")
    return scan


def test_reach_is_one_at_the_key_and_zero_orthogonal_to_u():
    g = torch.Generator().manual_seed(0)
    u, key = torch.randn(16, generator=g), torch.randn(16, generator=g)
    ud, kd = u.double(), key.double()
    ortho = torch.randn(16, generator=g, dtype=torch.float64)
    ortho -= (ortho @ ud) / (ud @ ud) * ud  # orthogonal to u (in float64: the scan's arithmetic)
    scan = _scan_of(u, key, torch.stack([kd, ortho, 0.3 * kd, -2 * kd]))
    hits = {h.ids[h.at]: h.reach for h in scan.best[0].values()}
    assert hits[0] == pytest.approx(1.0, abs=1e-12)
    assert hits.get(1, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert hits[2] == pytest.approx(0.3, abs=1e-12)
    assert hits[3] == pytest.approx(-2.0, abs=1e-12)
    assert scan.tokens == 4
    # |reach| >= 0.1: the key, 0.3 k and -2 k; >= 0.5: the key and -2 k
    assert scan.counts[0] == [3, 2]
    assert scan.max[0] == pytest.approx(2.0)


def test_reach_ignores_padding_and_counts_only_the_corpus():
    u = torch.ones(4)
    scan = ReachScan([DeltaKey(0, u, u, "stored")], ["m"], top=3)
    keys = torch.stack([u, u])[None]
    scan.add(torch.tensor([[5, 6]]), torch.tensor([[1, 0]]), {"m": keys}, "corpus")
    scan.add(torch.tensor([[7, 8]]), torch.tensor([[1, 1]]), {"m": keys}, "near the subject")
    assert scan.tokens == 1  # the padded token and the near-subject text are not counted
    assert scan.counts[0][-1] == 1
    assert {h.ids[h.at] for h in scan.best[0].values()} == {5, 7, 8}


def test_clean_answer():
    assert clean_answer(" basketball. He was") == "basketball"
    assert clean_answer("\nthe United States of America") == ""
    assert clean_answer(" the United States of America") == "the United States"


# ------------------------------------------------------------------------------------ verdict


def _report(**kw):
    probes = [
        {"kind": "edit", "says_target": True},
        {"kind": "leak", "flipped": False},
        {"kind": "leak", "flipped": True},
        {"kind": "subject", "kept": True},
        {"kind": "subject", "kept": False},
    ]
    base = dict(
        patch_id="0" * 64,
        model="m",
        corpus="c",
        tokens=1000,
        firing=[{"delta": 0, "tokens": 1000, "above": {"0.1": 0.01, "0.3": 0.002, "0.5": 0.0005}}],
        probes=probes,
        ppl_before=10.0,
        ppl_after=10.05,
        ppl_tokens=100,
    )
    base.update(kw)
    return AuditReport(**base)


def test_verdict_follows_each_threshold():
    lenient = Thresholds(max_leak=0.5, min_kept=0.5, max_firing=0.001, max_ppl_increase=1.0)
    assert _report(thresholds=lenient).verdict == "pass"
    checks = {
        "max_leak": Thresholds(max_leak=0.4, min_kept=0.5),
        "min_kept": Thresholds(max_leak=0.5, min_kept=0.6),
        "max_firing": Thresholds(max_leak=0.5, min_kept=0.5, max_firing=0.0004),
        "firing_at": Thresholds(max_leak=0.5, min_kept=0.5, firing_at=0.3),
        "max_ppl_increase": Thresholds(max_leak=0.5, min_kept=0.5, max_ppl_increase=0.4),
    }
    for name, t in checks.items():
        s = _report(thresholds=t).summary()
        assert s["verdict"] == "warn", name
        assert len(s["reasons"]) == 1, (name, s["reasons"])
    # efficacy: 1 of 1 own prompts meets min_efficacy 1.0; 1 of 2 does not
    strict = dataclasses.replace(lenient, min_efficacy=1.0)
    assert _report(thresholds=strict).verdict == "pass"
    missed = _report(thresholds=strict).probes + [{"kind": "edit", "says_target": False}]
    s = _report(thresholds=strict, probes=missed).summary()
    assert s["verdict"] == "warn" and "own prompts" in s["reasons"][0]


@pytest.mark.parametrize("bad", [{"max_leak": 1.5}, {"min_kept": -0.1}, {"firing_at": float("nan")}])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(AuditError, match="threshold"):
        Thresholds(**bad)


def test_report_round_trips_through_json():
    r = _report()
    back = AuditReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.summary() == r.summary()
    with pytest.raises(AuditError, match="version"):
        AuditReport.from_dict({**r.to_dict(), "audit_version": 99})


# ------------------------------------------------------------------------- the audit on tiny models


@pytest.mark.parametrize("arch", ARCHS)
def test_audit_on_every_architecture(arch, text_file):
    model, tok, patch = _edit(arch, text_file)
    before = _state(model)
    report = audit_patch(model, tok, patch, stats_data=str(text_file), tokens=600, near_samples=1, leaks=3)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is left as it was
    (f,) = report.firing
    assert f["tokens"] == report.tokens >= 600
    assert set(f["above"]) == {"0.1", "0.3", "0.5"}
    assert f["top"] and all(abs(c["reach"]) <= f["max_reach"] + 1e-9 for c in f["top"])
    kinds = {p["kind"] for p in report.probes}
    assert {"edit"} <= kinds
    own = [p for p in report.probes if p["kind"] == "edit"]
    assert own[0]["prompt"] == REQ.text
    assert report.keys == {"0": "stored"}
    assert report.ppl_before > 0 and report.ppl_after > 0
    assert report.verdict in ("pass", "warn")
    assert "audit of patch" in render(report)


def test_recomputed_key_gives_the_same_reach(text_file):
    model, tok, patch = _edit("llama", text_file)
    d = patch.deltas[0]
    keyless = new_patch([dataclasses.replace(d, key=None)], base=patch.base, parameters=patch.parameters)
    (stored,), _ = delta_keys(model, tok, patch)
    (recomputed,), notes = delta_keys(model, tok, keyless)
    assert recomputed.source == "recomputed" and not notes
    torch.testing.assert_close(recomputed.key, stored.key, rtol=1e-5, atol=1e-5)


def test_recomputed_key_on_the_wrong_model_is_refused(text_file):
    model, tok, patch = _edit("llama", text_file)
    keyless = new_patch(
        [dataclasses.replace(patch.deltas[0], key=None)], base=patch.base, parameters=patch.parameters
    )
    with torch.no_grad():
        model.get_parameter("model.embed_tokens.weight").mul_(1.5)  # not the model the patch was made on
    with pytest.raises(AuditError, match="not the one the patch was computed on"):
        delta_keys(model, tok, keyless)


def test_a_delta_without_key_or_request_is_left_out_with_a_note(text_file):
    model, tok, patch = _edit("llama", text_file)
    d = patch.deltas[0]
    bare = dataclasses.replace(d, key=None, request=None, kind="extracted")
    two = new_patch([d, bare], base=patch.base, parameters=patch.parameters)
    keys, notes = delta_keys(model, tok, two)
    assert [k.index for k in keys] == [0] and "delta 1" in notes[0]
    with pytest.raises(AuditError, match="no delta has a key"):
        delta_keys(model, tok, new_patch([bare], base=patch.base, parameters=patch.parameters))


# ------------------------------------------------------------------ the report inside a patch file


def test_attached_audit_keeps_the_id_and_is_shown(text_file, tmp_path):
    model, tok, patch = _edit("llama", text_file)
    report = audit_patch(model, tok, patch, stats_data=str(text_file), tokens=300, near_samples=0, leaks=0)
    pid = patch.id
    path = attach_audit(patch, report).save(tmp_path / "p.safetensors")
    loaded = load_patch(path)
    assert loaded.id == pid
    assert saved_audit(loaded).summary() == report.summary()
    assert loaded.summary()["audit"]["summary"]["verdict"] == report.verdict
    out = CliRunner().invoke(cli, ["show", str(path)])
    assert out.exit_code == 0, out.output
    assert f"audit    {report.verdict}:" in out.output
    card = render_body([("p.safetensors", loaded)], repo_id="me/edits")
    assert "## Audit" in card and f"| p.safetensors | {report.verdict} |" in card
    # an audit of another patch is refused, and not shown on a card
    other = _report(patch_id="f" * 64)
    with pytest.raises(AuditError, match="not of"):
        attach_audit(loaded, other)
    loaded.extra["audit"] = json.dumps(other.to_dict())
    with pytest.raises(AuditError, match="another patch"):
        saved_audit(loaded)
    assert "## Audit" not in render_body([("p.safetensors", loaded)], repo_id="me/edits")


def test_an_attached_audit_with_non_finite_numbers_survives_loading(text_file, tmp_path):
    """Patch metadata is strict JSON (no NaN or Infinity): an audit whose perplexity sample was empty
    or whose threshold is infinite is written with nulls, not dropped on load."""
    model, tok, patch = _edit("llama", text_file)
    report = audit_patch(model, tok, patch, stats_data=str(text_file), tokens=300, near_samples=0, leaks=0)
    report.ppl_before = float("nan")
    report.thresholds = Thresholds(max_ppl_increase=float("inf"))
    loaded = load_patch(attach_audit(patch, report).save(tmp_path / "p.safetensors"))
    back = saved_audit(loaded)
    assert back is not None and math.isnan(back.ppl_before) and back.ppl_after == round(report.ppl_after, 4)
    assert back.thresholds.max_ppl_increase == float("inf")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_audit_json_output_and_attach(text_file, tmp_path):
    folder = save_edit_folder(tmp_path / "model")
    patch_path = tmp_path / "edit.safetensors"
    r = CliRunner().invoke(
        cli,
        [
            "create", str(folder), "--prompt", REQ.prompt, "--subject", REQ.subject, "--target", REQ.target_new,
            "--layer", "1", "--steps", "4", "--stats-data", str(text_file), "--stats-tokens", "3000",
            "-o", str(patch_path),
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    pid = load_patch(patch_path).id
    common = [
        "audit",
        str(patch_path),
        "--model",
        str(folder),
        "--stats-data",
        str(text_file),
        "--tokens",
        "300",
    ]
    r = CliRunner().invoke(cli, [*common, "--json", "-o", str(tmp_path / "a.json"), "--attach"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["patch_id"] == pid and data["summary"]["verdict"] in ("pass", "warn")
    assert json.loads((tmp_path / "a.json").read_text())["summary"] == data["summary"]
    assert saved_audit(load_patch(patch_path)).summary() == data["summary"]
    # --strict: a warn exits 1 (every other subject flipping is allowed, no efficacy is required,
    # but no token may fire at all)
    strict = [*common, "--strict", "--max-firing", "0", "--firing-at", "0", "--min-kept", "0"]
    r = CliRunner().invoke(cli, strict)
    assert r.exit_code == 1, r.output
    assert "verdict  WARN" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-leak", "2"], "max_leak is a fraction"),
        (["--attach", "--model", "x"], None),
    ],
)
def test_cli_audit_bad_input_is_one_line(args, message, tmp_path):
    r = CliRunner().invoke(cli, ["audit", str(tmp_path / "missing.safetensors"), *args])
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    if message:
        assert message in r.output
