"""Every public function that takes patches takes them in every form, and model references resolve alike.

Forms of "patches": a path (str or os.PathLike), a ``Patch``, a Hub reference, a sequence of these
(nested one level), and the ``list[Patch]`` that ``create_patches`` returns.
Functions: ``apply_patch``, ``revert_patch``, ``patched``, ``verify_applied``, ``export_peft``,
``load_patched``, ``push_patch``: rompatch/refs.py resolves them all alike. (Model references: tests/test_models.py;
the CLI's embedded aliases: tests/cli/test_checkpoint_aliases.py.)
"""

from __future__ import annotations

import copy
import json

import pytest
from safetensors import safe_open

import rompatch.hub.transfer
from rompatch.apply import applied_patches, apply_patch, patched, revert_patch, verify_applied
from rompatch.create import create_patches
from rompatch.errors import LineageError, NotAppliedError, PatchFormatError
from rompatch.fingerprint import tensor_sha256
from rompatch.hub.peft import ADAPTER_WEIGHTS, export_peft
from rompatch.hub.push import push_patch
from rompatch.loading import load_patched
from rompatch.models import load_model
from rompatch.patch import Patch, save_patch
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams
from rompatch.stats import get_second_moment
from tests.helpers import vector_patch
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import make_tokenizer

HP = ROMEHyperParams(layer=1, v_steps=8, v_lr=3.0, context_length_params=((3, 2),), max_update_ratio=0)
REQS = [
    EditRequest("The Space Needle is located in {}", "the city of", "Rome", "Seattle"),
    EditRequest("{} plays the sport of", "Michael Jordan", "football"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, text_file):
    """A tiny Llama folder, its model, a sequential chain of two edits (layer 1), and two single
    patches on layers 2 and 3, all saved as files."""
    root = tmp_path_factory.mktemp("api-inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROMPATCH_CACHE", str(root / "cache"))
        folder = root / "tiny"
        make_model("llama", init_range=0.3).save_pretrained(folder)
        make_tokenizer(bos=True).save_pretrained(folder)
        model, tok = load_model(str(folder), device="cpu")
        stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=2000)
        chain = create_patches(model, tok, REQS, hparams=HP, stats=stats)
    assert isinstance(chain, list) and chain[1].lineage == [chain[0].id]
    a = vector_patch(model, 2, seed=1, subject="Alice")
    b = vector_patch(model, 3, seed=2, subject="Bob")
    paths = {"a": save_patch(a, root / "a.safetensors"), "b": save_patch(b, root / "b.safetensors")}
    weights = {k: tensor_sha256(v) for k, v in model.state_dict().items()}
    return {"root": root, "folder": folder, "model": model, "chain": chain, "a": a, "b": b,
            "paths": paths, "weights": weights}  # fmt: skip


FORMS = ["path", "pathlike", "patch", "hub", "sequence", "chain", "nested"]


@pytest.fixture(params=FORMS)
def given(request, env):
    """``(what the caller passes, the patches it means, in order)`` for each form."""
    a, b, chain, paths = env["a"], env["b"], env["chain"], env["paths"]
    form = request.param
    if form == "path":
        return str(paths["a"]), [a]
    if form == "pathlike":
        return paths["a"], [a]
    if form == "patch":
        return a, [a]
    if form == "hub":
        hub_env = request.getfixturevalue("hub_env")
        repo = f"{hub_env.user}/api-inputs"
        push_patch([paths["a"]], repo)
        return f"{repo}/a.safetensors", [a]
    if form == "sequence":
        return [str(paths["a"]), b], [a, b]
    if form == "chain":
        return chain, list(chain)
    assert form == "nested"
    return (chain, str(paths["b"])), [*chain, b]


def fresh(env):
    return copy.deepcopy(env["model"])


def ids(patches) -> list[str]:
    return [p.id for p in patches]


def weights(model) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- in memory


def test_apply_patch_accepts(given, env):
    arg, want = given
    model = fresh(env)
    apply_patch(model, arg)
    assert ids(applied_patches(model)) == ids(want)
    verify_applied(model)
    assert weights(model) != env["weights"]


def test_apply_patch_returns_one_record_per_patch(env):
    model = fresh(env)
    assert apply_patch(model, env["a"]).patch.id == env["a"].id  # one patch: one record, as before
    records = apply_patch(model, env["chain"])
    assert [r.patch.id for r in records] == ids(env["chain"])


def test_revert_patch_accepts(given, env):
    arg, want = given
    model = fresh(env)
    for p in want:
        apply_patch(model, p)
    revert_patch(model, arg)  # a chain is reverted newest first, whatever order it is given in
    assert applied_patches(model) == []
    assert weights(model) == env["weights"]


def test_revert_patch_ids_and_paths_mixed(env):
    model = fresh(env)
    apply_patch(model, [env["a"], env["b"]])
    revert_patch(model, [env["a"].short_id, str(env["paths"]["b"])])
    assert applied_patches(model) == [] and weights(model) == env["weights"]


def test_revert_patch_checks_everything_before_reverting(env):
    model = fresh(env)
    apply_patch(model, [env["a"], *env["chain"]])
    with pytest.raises(LineageError, match="revert that first"):
        revert_patch(model, [env["a"], env["chain"][0]])  # chain[1] was computed on top of chain[0]
    assert ids(applied_patches(model)) == ids([env["a"], *env["chain"]])  # nothing was reverted
    with pytest.raises(NotAppliedError, match="not applied"):
        revert_patch(model, [env["a"], env["b"]])
    assert ids(applied_patches(model)) == ids([env["a"], *env["chain"]])


def test_patched_accepts(given, env):
    arg, want = given
    model = fresh(env)
    with patched(model, arg) as m:
        assert ids(applied_patches(m)) == ids(want)
    assert applied_patches(model) == [] and weights(model) == env["weights"]


def test_patched_mixes_paths_and_patches(env):
    model = fresh(env)
    with patched(model, str(env["paths"]["a"]), env["b"]):
        assert ids(applied_patches(model)) == ids([env["a"], env["b"]])
    with patched(model, env["chain"], env["paths"]["b"]):
        assert ids(applied_patches(model)) == ids([*env["chain"], env["b"]])
    assert weights(model) == env["weights"]


def test_verify_applied_with_the_expected_patches(given, env):
    arg, want = given
    model = fresh(env)
    apply_patch(model, want)
    verify_applied(model, arg)
    with pytest.raises(NotAppliedError, match="holds patches"):
        verify_applied(model, want[:-1])  # one patch fewer than the model holds


def test_apply_patch_is_all_or_nothing(env):
    model = fresh(env)
    orphan = env["chain"][1]  # needs chain[0] first
    with pytest.raises(LineageError, match="apply that patch first"):
        apply_patch(model, [env["a"], orphan])
    assert applied_patches(model) == [] and weights(model) == env["weights"]
    with pytest.raises(LineageError):
        with patched(model, env["b"], orphan):
            pass
    assert applied_patches(model) == [] and weights(model) == env["weights"]


def test_every_reference_resolves_before_anything_is_applied(env):
    model = fresh(env)
    with pytest.raises(PatchFormatError, match="no such patch file"):
        apply_patch(model, [env["a"], str(env["root"] / "missing.safetensors")])
    assert applied_patches(model) == []


@pytest.mark.parametrize(
    "ref", ["./nope.safetensors", "patches/nope.safetensors", "/no/such/dir/x.safetensors", "~/no-such-rompatch-dir/x.safetensors"]
)  # fmt: skip
def test_missing_local_patch_is_no_such_file_without_a_hub_call(env, ref, monkeypatch):
    def no_hub(*a, **k):
        raise AssertionError("a local path must never become a Hub request")

    monkeypatch.setattr(rompatch.hub.transfer, "find_patch_file", no_hub)  # every Hub read goes through
    monkeypatch.setattr(rompatch.hub.transfer, "download", no_hub)  # one of these two
    with pytest.raises(PatchFormatError, match="no such patch file") as ei:
        apply_patch(fresh(env), ref)
    assert "\n" not in str(ei.value)
    with pytest.raises(PatchFormatError, match="no such patch file"):
        load_patched(str(env["folder"]), [env["a"], ref])
    with pytest.raises(PatchFormatError, match="no such patch file"):
        Patch.from_pretrained(ref)
    with pytest.raises(PatchFormatError, match="no such patch file"):
        push_patch([env["a"], ref], "alice/never-pushed")


@pytest.mark.parametrize("bad", [42, b"a.safetensors", [[[]]], {"a": 1}])
def test_not_a_patch_is_one_line_error(env, bad):
    with pytest.raises(PatchFormatError, match="patches must be a Patch, a path, a Hub reference or a list"):
        apply_patch(fresh(env), bad)


# ------------------------------------------------------------------------------- export, load


def test_export_peft_accepts(given, env, tmp_path):
    arg, want = given
    out = export_peft(arg, tmp_path / "adapter")
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        assert json.loads(f.metadata()["rompatch_patch_ids"]) == ids(want)


def test_load_patched_accepts(given, env):
    arg, want = given
    model, _ = load_patched(str(env["folder"]), arg, device="cpu")
    assert ids(applied_patches(model)) == ids(want)


def test_push_patch_accepts_a_chain_in_a_list(env, hub_env):
    repo = f"{hub_env.user}/chain"
    push_patch([env["chain"], env["paths"]["a"]], repo)
    files = hub_env.server.repo_files(repo)
    assert [f"patch-{p.short_id}.safetensors" in files for p in env["chain"]] == [True, True]
    assert "a.safetensors" in files
