"""apply, revert and log on checkpoint folders: equal to in-memory apply, exact revert, fingerprints, lineage, CLI, Hub."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from rompatch.apply import apply_patch
from rompatch.arch import get_spec
from rompatch.checkpoint.operations import apply_to_checkpoint, checkpoint_log, revert_checkpoint
from rompatch.checkpoint.reader import open_checkpoint
from rompatch.cli.main import cli
from rompatch.constants import CHECKPOINT_RECORD, CHECKPOINT_UNDO
from rompatch.errors import (
    BaseMismatchError,
    CheckpointError,
    FingerprintMismatchError,
    HubError,
    LineageError,
    NotAppliedError,
)
from rompatch.fingerprint import tensor_sha256
from rompatch.patch import save_patch
from rompatch.safetensors_io import read_header
from tests.helpers import vector_patch
from tests.helpers.ckpt import (
    DTYPES,
    file_shas,
    leftovers,
    logits,
    make_ckpt,
    mem_shas,
    read_tensor,
    save_sharded,
    tensor_shas,
    weight_files,
)
from tests.helpers.tiny import make_model

ARCHS = ["gpt2", "llama", "gpt_neox"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_apply_equals_in_memory_and_revert_restores_every_tensor(tmp_path, arch, dtype):
    model, base = make_ckpt(tmp_path, arch, dtype)
    p1 = vector_patch(model, layer=1, seed=1, subject="A", scale=0.05)
    p2 = vector_patch(model, layer=2, seed=2, subject="B", n=2, scale=0.05)
    p3 = vector_patch(model, layer=1, seed=3, subject="C", scale=0.05)  # same matrix as p1: accumulates
    save_patch(p1, tmp_path / "p1.safetensors")
    inputs_before = file_shas(base)
    base_shas = tensor_shas(base)

    res = apply_to_checkpoint(base, [tmp_path / "p1.safetensors", p2, p3], tmp_path / "out")
    out = tmp_path / "out"

    # bit-identical to in-memory apply on the model loaded from the base
    loaded = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    before = logits(loaded, ids)
    for p in (p1, p2, p3):
        apply_patch(loaded, p)
    disk = tensor_shas(out)
    mem = mem_shas(loaded)
    spec = get_spec(model)
    touched = {spec.mlp_out_param(1), spec.mlp_out_param(2)}
    common = disk.keys() & mem.keys()  # transformers 5 may rename a few keys on load (gpt_neox embed_out)
    assert touched <= common and len(common) >= len(disk) - 1
    assert {k: disk[k] for k in common} == {k: mem[k] for k in common}
    assert {k for k in disk if disk[k] != base_shas[k]} == touched
    assert sorted(res.touched) == sorted(touched)

    # transformers loads OUT directly, and it predicts what the in-memory patched model predicts
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    after = logits(edited, ids)
    assert torch.equal(after, logits(loaded, ids))
    assert not torch.equal(after, before)

    # only shards with touched tensors were rewritten, byte-identical headers; the rest hard-linked
    touched_files = {open_checkpoint(base).entry(n).file for n in touched}
    assert set(res.stats.rewritten) == touched_files
    for f in weight_files(base):
        o = out / f.name
        if f.name in touched_files:
            assert o.stat().st_ino != f.stat().st_ino
            eb, mb = read_header(f)
            eo, mo = read_header(o)
            assert eb == eo and mb == mo  # tensor order, dtypes, shapes, offsets and __metadata__
            with open(f, "rb") as a, open(o, "rb") as b:
                n = eb[0].offset
                assert a.read(n) == b.read(n), "the header bytes are unchanged"
        else:
            assert o.stat().st_ino == f.stat().st_ino, f"{f.name} should be hard-linked"
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()

    rec = json.loads((out / CHECKPOINT_RECORD).read_text())
    assert [a["patch_id"] for a in rec["applied"]] == [p1.id, p2.id, p3.id]
    assert rec["applied"][0]["source"] == str(tmp_path / "p1.safetensors")
    n1 = spec.mlp_out_param(1)
    fp1, fp3 = rec["applied"][0]["fingerprints"][n1], rec["applied"][2]["fingerprints"][n1]
    assert fp1["before"] == base_shas[n1] and fp1["after"] == fp3["before"] and fp3["after"] == disk[n1]
    assert res.undo_bytes == (out / CHECKPOINT_UNDO).stat().st_size > 0

    # revert everything: every tensor sha256-equal to the base, record and undo data gone
    revert_checkpoint(out, [p1, p2, p3], out=tmp_path / "reverted")
    assert tensor_shas(tmp_path / "reverted") == base_shas
    assert not (tmp_path / "reverted" / CHECKPOINT_RECORD).exists()
    assert not (tmp_path / "reverted" / CHECKPOINT_UNDO).exists()
    assert file_shas(base) == inputs_before, "the input folder is never modified"
    assert leftovers(tmp_path) == []


def test_checkpoint_apply_leaves_torch_thread_count_alone(tmp_path, monkeypatch):
    """No process-wide setting: another thread using torch meanwhile keeps its intra-op threads."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    model, base = make_ckpt(tmp_path)
    apply_to_checkpoint(base, [vector_patch(model, layer=1)], tmp_path / "out")
    assert calls == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_revert_middle_of_stack_equals_applying_only_the_others(tmp_path, dtype):
    model, base = make_ckpt(tmp_path, "llama", dtype)
    pa, pb, pc = (vector_patch(model, layer=1, seed=s, subject=f"S{s}", scale=0.05) for s in range(3))
    pd = vector_patch(model, layer=3, seed=9, subject="D")
    apply_to_checkpoint(base, [pa, pb, pc, pd], tmp_path / "all")
    apply_to_checkpoint(base, [pa, pc, pd], tmp_path / "others")

    revert_checkpoint(tmp_path / "all", [pb.short_id], out=tmp_path / "minus-b")  # by id prefix
    assert tensor_shas(tmp_path / "minus-b") == tensor_shas(tmp_path / "others")
    log_ = checkpoint_log(tmp_path / "minus-b")
    assert [e["id"] for e in log_["applied"]] == [pa.id, pc.id, pd.id]
    # the recorded fingerprints are those of applying only the others
    others = checkpoint_log(tmp_path / "others")
    assert [e["fingerprints"] for e in log_["applied"]] == [e["fingerprints"] for e in others["applied"]]

    # and equals in-memory revert from the middle
    m = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    for p in (pa, pc, pd):
        apply_patch(m, p)
    disk = tensor_shas(tmp_path / "minus-b")
    assert disk == {k: v for k, v in mem_shas(m).items() if k in disk}

    # revert the rest, one of them in place: back to the base without the base or the patch files
    revert_checkpoint(tmp_path / "minus-b", [pd.id], in_place=True)
    revert_checkpoint(tmp_path / "minus-b", all=True, in_place=True)
    assert tensor_shas(tmp_path / "minus-b") == tensor_shas(base)
    assert checkpoint_log(tmp_path / "minus-b")["rompatch"] is False


def test_revert_errors(tmp_path):
    model, base = make_ckpt(tmp_path)
    pa, pb = vector_patch(model, layer=1, seed=1), vector_patch(model, layer=2, seed=2, subject="B")
    apply_to_checkpoint(base, [pa], tmp_path / "out")
    with pytest.raises(
        NotAppliedError, match=rf"patch {pb.short_id} is not applied to .* \(applied: {pa.short_id}\)"
    ):
        revert_checkpoint(tmp_path / "out", [pb], out=tmp_path / "x")
    with pytest.raises(CheckpointError, match="exactly one of"):
        revert_checkpoint(tmp_path / "out", [pa])
    with pytest.raises(NotAppliedError, match="not a patch id"):
        revert_checkpoint(tmp_path / "out", ["not-an-id"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


def test_revert_foreign_checkpoint_subtracts_and_reports_residual(tmp_path):
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-1)):
        model, base = make_ckpt(tmp_path, "llama", dtype, name=f"base-{dtype}")
        patch = vector_patch(model, layer=1, scale=0.05)
        apply_patch(model, patch)
        foreign = tmp_path / f"foreign-{dtype}"
        save_sharded(model, foreign)  # patched in memory, saved without a rompatch record
        res = revert_checkpoint(foreign, [patch], out=tmp_path / f"rev-{dtype}")
        name = patch.deltas[0].parameter
        r = res.residuals[name]
        assert 0 <= r["max_abs_residual"] < tol
        got = read_tensor(tmp_path / f"rev-{dtype}", name).float()
        want = read_tensor(base, name).float()
        assert (got - want).abs().max() <= 2 * tol
        assert r["restored_base_fingerprint"] == (
            tensor_sha256(got.to(dtype)) == tensor_sha256(want.to(dtype))
        )
        others = {k: v for k, v in tensor_shas(foreign).items() if k != name}
        assert {k: v for k, v in tensor_shas(tmp_path / f"rev-{dtype}").items() if k != name} == others
        # the base itself does not contain the patch: refused
        with pytest.raises(NotAppliedError, match="already equals patch .* base fingerprint"):
            revert_checkpoint(base, [patch], out=tmp_path / f"nope-{dtype}")


def test_fingerprint_mismatch_refused_with_names_and_hashes_then_forced(tmp_path):
    _, base = make_ckpt(tmp_path, seed=0)
    other = make_model("llama", seed=123)
    patch = vector_patch(other, layer=1)
    name = patch.deltas[0].parameter
    expect = patch.parameters[name].sha256
    actual = open_checkpoint(base).sha256(name)
    with pytest.raises(FingerprintMismatchError) as ei:
        apply_to_checkpoint(base, [patch], tmp_path / "out")
    msg = str(ei.value)
    assert f"'{name}'" in msg and expect in msg and actual in msg and "--force" in msg
    assert (ei.value.parameter, ei.value.expected, ei.value.found) == (name, expect, actual)
    assert "\n" not in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    res = apply_to_checkpoint(base, [patch], tmp_path / "out", force=True)
    assert res.forced == [patch.id]
    entry = checkpoint_log(tmp_path / "out")["applied"][0]
    assert entry["forced"] is True and entry["forced_reasons"] == ["fingerprint"]
    revert_checkpoint(tmp_path / "out", [patch], in_place=True)
    assert tensor_shas(tmp_path / "out") == tensor_shas(base)


def test_patch_for_other_shapes_is_a_base_mismatch(tmp_path):
    _, base = make_ckpt(tmp_path)
    patch = vector_patch(make_model("llama", intermediate_size=128), layer=1)
    with pytest.raises(BaseMismatchError, match=r"has shape \[64, 96\] in .* but \[64, 128\] in patch"):
        apply_to_checkpoint(base, [patch], tmp_path / "out")
    with pytest.raises(BaseMismatchError, match=r"has shape \[64, 96\] in .* but \[64, 128\] in the patch"):
        revert_checkpoint(base, [patch], out=tmp_path / "reverted")  # base has no record: subtracts
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_dtype_mismatch_is_explained(tmp_path):
    _, base = make_ckpt(tmp_path, dtype=torch.bfloat16)
    patch = vector_patch(make_model("llama"), layer=1)  # computed on float32 weights
    with pytest.raises(
        FingerprintMismatchError, match="computed on float32 weights, this checkpoint stores bfloat16"
    ):
        apply_to_checkpoint(base, [patch], tmp_path / "out")


def test_chain_continues_on_patched_checkpoint_and_lineage_is_checked(tmp_path):
    model, base = make_ckpt(tmp_path)
    parent = vector_patch(model, layer=1, seed=1, scale=0.05)
    apply_patch(model, parent)
    child = vector_patch(model, layer=1, seed=2, lineage=[parent.id], subject="B", scale=0.05)

    with pytest.raises(
        LineageError,
        match=rf"patch {child.short_id} was computed on top of {parent.short_id}, which is not applied",
    ):
        apply_to_checkpoint(base, [child], tmp_path / "out")
    assert not (tmp_path / "out").exists()

    apply_to_checkpoint(base, [parent], tmp_path / "p1")
    apply_to_checkpoint(tmp_path / "p1", [child], tmp_path / "p2")  # continues the chain
    log_ = checkpoint_log(tmp_path / "p2")
    assert [e["id"] for e in log_["applied"]] == [parent.id, child.id]
    name = parent.deltas[0].parameter
    assert (
        log_["applied"][1]["fingerprints"][name]["before"]
        == log_["applied"][0]["fingerprints"][name]["after"]
    )
    assert log_["base"]["model"] == str(base.resolve())
    apply_patch(model, child)
    disk = tensor_shas(tmp_path / "p2")
    assert disk == {k: v for k, v in mem_shas(model).items() if k in disk}
    # both in one run also works, and equals the two-step result
    apply_to_checkpoint(base, [parent, child], tmp_path / "both")
    assert tensor_shas(tmp_path / "both") == disk

    with pytest.raises(LineageError, match=r"already applied"):
        apply_to_checkpoint(tmp_path / "p2", [parent], tmp_path / "again")
    with pytest.raises(LineageError, match=rf"{parent.short_id} cannot be reverted while {child.short_id}"):
        revert_checkpoint(tmp_path / "p2", [parent], out=tmp_path / "r")
    revert_checkpoint(tmp_path / "p2", [child, parent], out=tmp_path / "r")
    assert tensor_shas(tmp_path / "r") == tensor_shas(base)

    forced = apply_to_checkpoint(base, [child], tmp_path / "forced", force=True)
    assert forced.forced == [child.id]
    assert checkpoint_log(tmp_path / "forced")["applied"][0]["forced_reasons"] == ["lineage", "fingerprint"]


def test_cli_apply_log_revert(tmp_path):
    model, base = make_ckpt(tmp_path)
    p1 = save_patch(vector_patch(model, layer=1, subject="Alice"), tmp_path / "p1.safetensors")
    runner = CliRunner()
    r = runner.invoke(cli, ["apply", str(base), str(p1), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "rewrote model-0000" in r.stdout and "hard-linked" in r.stdout and "undo" in r.stdout

    r = runner.invoke(cli, ["log", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (
        "'Alice works in the city of': Paris → Rome" in r.stdout
        and "model.layers.1.mlp.down_proj.weight" in r.stdout
    )
    r = runner.invoke(cli, ["log", str(tmp_path / "out"), "--json"])
    assert json.loads(r.stdout)["applied"][0]["edits"][0]["target_new"] == "Rome"

    r = runner.invoke(cli, ["apply", str(base), str(p1), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "already exists" in r.stderr
    assert r.stderr.count("\n") == 1

    r = runner.invoke(cli, ["revert", str(tmp_path / "out"), "--in-place"])
    assert r.exit_code == 1 and "no patches given" in r.stderr
    r = runner.invoke(cli, ["revert", str(tmp_path / "out"), "--all", "-o", str(tmp_path / "back"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["applied"] == []
    assert tensor_shas(tmp_path / "back") == tensor_shas(base)
    r = runner.invoke(cli, ["log", str(tmp_path / "back")])
    assert "no rompatch record" in r.stdout


try:
    from tests.helpers.hub_fixtures import hub_env, hub_server  # noqa: F401  (fixtures)

    HAVE_FAKE_HUB = True
except ImportError:  # pragma: no cover
    HAVE_FAKE_HUB = False


@pytest.mark.skipif(not HAVE_FAKE_HUB, reason="tests/helpers/hubserver/ (fake Hub) not available")
def test_apply_to_hub_checkpoint(tmp_path, hub_env):
    model, base = make_ckpt(tmp_path)
    api = hub_env.api()
    repo = f"{hub_env.user}/tiny-llama"
    api.create_repo(repo)
    (base / "tokenizer_config.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"never downloaded")
    api.upload_folder(folder_path=str(base), repo_id=repo)
    commit = api.model_info(repo).sha
    patch = vector_patch(model, layer=1)
    res = apply_to_checkpoint(repo, [patch], tmp_path / "out")
    assert sorted(res.stats.rewritten) and not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    log_ = checkpoint_log(tmp_path / "out")
    assert log_["base"]["model"] == repo and log_["base"]["revision"] == commit
    apply_patch(model, patch)
    disk = tensor_shas(tmp_path / "out")
    assert disk == {k: v for k, v in mem_shas(model).items() if k in disk}
    hub_env.set_offline(True)  # from the cache, no network
    apply_to_checkpoint(repo, [patch], tmp_path / "offline")
    assert tensor_shas(tmp_path / "offline") == disk
    with pytest.raises(HubError, match="is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids") as ei:
        apply_to_checkpoint(f"{hub_env.user}/never-fetched", [patch], tmp_path / "x")
    assert "pass a local folder" in str(ei.value) and ei.value.repo_id == f"{hub_env.user}/never-fetched"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_resharded_apply_predicts_like_in_memory_and_reverts(tmp_path, smollm2):
    from rompatch.models import ensure_embedded

    model, tok = smollm2
    src = ensure_embedded("smollm2-135m")
    base = tmp_path / "smollm2"
    model.save_pretrained(base, max_shard_size="150MB")
    tok.save_pretrained(base)
    assert len(weight_files(base)) >= 4
    assert tensor_shas(base) == {k: v for k, v in tensor_shas(src).items()}, "re-sharding keeps every tensor"

    patch = vector_patch(model, layer=6, scale=2.0, subject="The Eiffel Tower")
    res = apply_to_checkpoint(base, [patch], tmp_path / "out")
    linked_weights = [f for f in res.stats.linked if f.endswith(".safetensors")]
    assert len(res.stats.rewritten) == 1 and len(linked_weights) == len(weight_files(base)) - 1

    prompt = "The Eiffel Tower is located in the city of"
    ids = tok(prompt, return_tensors="pt").input_ids
    before = logits(model, ids)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    after = logits(edited, ids)
    apply_patch(model, patch)
    try:
        assert torch.equal(after, logits(model, ids)), (
            "the on-disk edit predicts exactly like the in-memory one"
        )
    finally:
        from rompatch.apply import revert_patch

        revert_patch(model, patch)
    assert not torch.equal(after[0, -1], before[0, -1])

    revert_checkpoint(tmp_path / "out", [patch], in_place=True)
    assert tensor_shas(tmp_path / "out") == tensor_shas(base)
