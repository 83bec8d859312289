"""Hub references, push/pull, the model card, offline mode and failures, against the test Hub.

The test Hub (tests/hubserver.py) is a local HTTP server that the real huggingface_hub client
talks to through HF_ENDPOINT; ``hub_env`` points the client at it with a fresh cache and HF_TOKEN
set to alice's token. Its fixtures come from tests/conftest_hub.py, registered by tests/conftest.py
(``pytest_plugins``).
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import rompatch
from rompatch.apply import applied_patches
from rompatch.cli.main import cli
from rompatch.constants import PROJECT_URL
from rompatch.errors import HubError, PatchFormatError
from rompatch.hub.modelcard import BEGIN, END, render_card
from rompatch.hub.pull import pull_patch, resolve_hub_patch
from rompatch.hub.push import push_patch
from rompatch.hub.transfer import HubRef, parse_ref
from rompatch.loading import load_patched
from rompatch.models import EMBEDDED, load_model
from rompatch.patch import Patch, load_patch, save_patch
from tests.hubserver import list_files
from tests.test_loading import PROMPT_A, PROMPT_B, save_tiny, steer_patch, top1

DOC_PROMPT = "The Eiffel Tower is located in the city of"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama model folder and three saved patches that change three next-token predictions."""
    root = tmp_path_factory.mktemp("hubtiny")
    folder = save_tiny(root / "llama-tiny", "llama")
    model, tok = load_model(str(folder), device="cpu")
    before = {p: top1(model, tok, p) for p in (PROMPT_A, PROMPT_B, DOC_PROMPT)}
    a = steer_patch(model, tok, PROMPT_A, "Rome", layer=1)
    b = steer_patch(model, tok, PROMPT_B, "German", layer=2)
    doc = steer_patch(model, tok, DOC_PROMPT, "Rome", layer=1)
    paths = {
        "a": save_patch(a, root / "eiffel-rome.safetensors"),
        "b": save_patch(b, root / "darrieux-german.safetensors"),
        "doc": save_patch(doc, root / "doc-edit.safetensors"),
    }
    return {"folder": folder, "root": root, "before": before, "paths": paths, "a": a, "b": b, "doc": doc}


class _NoSleep:
    """``time`` without the waiting: huggingface_hub retries an unreachable Hub with 1+2+4+8+8 s of
    backoff per request, which is right for users and only slow for tests."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


@pytest.fixture
def no_backoff(monkeypatch):
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", _NoSleep())
    monkeypatch.setattr(file_download, "time", _NoSleep())


def one_line_error(e: BaseException, *secrets: str) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    for s in secrets:
        assert s not in msg
    return msg


def fresh_cache(hub_env, name: str) -> Path:
    """Point huggingface_hub at a new, empty cache folder (as a fresh machine would have)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager

    new = hub_env.hf_home / name
    new.mkdir()
    mp = hub_env.monkeypatch
    for attr in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        mp.setattr(constants, attr, str(new))
    mp.setattr(_cache_manager, "HF_HUB_CACHE", str(new))
    mp.setenv("HF_HUB_CACHE", str(new))
    return new


def cache_leftovers(cache: Path) -> list[str]:
    """Files in the HF cache other than lock files (which huggingface_hub keeps by design)."""
    return [f for f in list_files(cache) if not f.startswith(".locks")] if cache.exists() else []


# -------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    "ref, revision, expected",
    [
        ("alice/edits", None, HubRef("alice/edits")),
        ("alice/edits@v1", None, HubRef("alice/edits", None, "v1")),
        ("alice/edits", "v2", HubRef("alice/edits", None, "v2")),
        ("alice/edits/eiffel.safetensors", None, HubRef("alice/edits", "eiffel.safetensors")),
        ("alice/edits/sub/dir/e.safetensors@refs/pr/1", None, HubRef("alice/edits", "sub/dir/e.safetensors", "refs/pr/1")),
        ("alice/edits@v1", "v1", HubRef("alice/edits", None, "v1")),
        ("Org-1/my_repo.v2/e.safetensors", None, HubRef("Org-1/my_repo.v2", "e.safetensors")),
    ],
)  # fmt: skip
def test_parse_ref(ref, revision, expected):
    assert parse_ref(ref, revision=revision) == expected
    assert parse_ref(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize(
    "ref, revision, match",
    [
        ("alice", None, "neither an existing patch file nor a Hub reference"),
        ("alice/edits/notes.txt", None, "must end in .safetensors"),
        ("alice/edits@", None, "nothing after '@'"),
        ("alice/edits@v1", "v2", "pass only one"),
        ("alice/ed its", None, "not a valid Hub repo id"),
        ("alice/edits/../x.safetensors", None, "'.'/'..' parts"),
        ("-alice/edits", None, "not a valid Hub repo id"),
        ("", None, "empty Hub reference"),
    ],
)
def test_parse_ref_errors(ref, revision, match):
    with pytest.raises(HubError, match=re.escape(match)) as ei:
        parse_ref(ref, revision=revision)
    one_line_error(ei.value)


# ---------------------------------------------------------------------------------- model card


def test_card_front_matter_and_body(tiny, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    a, b = copy.deepcopy(tiny["a"]), copy.deepcopy(tiny["b"])  # never mutate the module's patches
    a_embedded = Patch(deltas=a.deltas, base=dict(a.base, model="smollm2-135m"), parameters=a.parameters)
    a_embedded.deltas[0].metrics = {"p_new_before": 0.0123, "p_new_after": 0.91, "converged": True}
    b2 = Patch(
        deltas=b.deltas,
        base=dict(b.base, model="smollm2-135m"),
        parameters=b.parameters,
        lineage=[a_embedded.id],
    )
    text = render_card([("b.safetensors", b2), ("a.safetensors", a_embedded)], repo_id="alice/edits")

    card = ModelCard(text)  # the Hub's own parser
    data = card.data.to_dict()
    assert data["base_model"] == EMBEDDED["smollm2-135m"].hf_id
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "rompatch"
    assert data["tags"] == ["rompatch", "rome", "model-editing"]
    (tmp_path / "README.md").write_text(text)
    assert metadata_load(tmp_path / "README.md") == data

    body = card.text
    r = a.deltas[0].request
    assert f"| a.safetensors | {r.subject} | {r.prompt} | ? → Rome | 1 |" in body
    assert "| 0.0123 → 0.91 | true |" in body  # metrics recorded at creation
    assert a_embedded.id in body and b2.id in body
    assert f"`{a_embedded.id[:12]}`" in body  # b's lineage
    # lineage order: a comes before b in the tables and in the usage
    assert body.index("| a.safetensors |") < body.index("| b.safetensors |")
    assert "load_patched('smollm2-135m', ['alice/edits/a.safetensors', 'alice/edits/b.safetensors'])" in body
    assert "rompatch pull alice/edits/a.safetensors" in body
    assert (
        "rompatch predict smollm2-135m --patch alice/edits/a.safetensors --patch alice/edits/b.safetensors"
        in body
    )
    assert body.count(BEGIN) == 1 and body.count(END) == 1


def test_card_install_instructions_need_no_package_index_release(tiny):
    text = render_card([("a.safetensors", tiny["a"])], repo_id="u/r")
    assert "pip install rompatch" not in text and "pypi.org/project/rompatch" not in text
    assert f'pip install "rompatch @ git+{PROJECT_URL}"' in text
    assert "pip install -e ." in text
    assert text.index("pip install") < text.index("rompatch pull")  # install comes before usage


def test_card_metrics_put_p_new_and_p_true_first(tiny):
    a = copy.deepcopy(tiny["a"])
    metrics = {"delta_capped": False, "delta_norm": 6.37, "k_norm": 2.5, "layer": 4, "loss_first": 5.2,
               "loss_last": 0.02, "nll_last": 0.01, "p_new_after": 0.982, "p_new_before": 0.0057,
               "p_target_mean_after_opt": 0.99, "p_true_after": 2e-06, "p_true_before": 0.702, "seconds": 13.7}  # fmt: skip
    a.deltas[0].metrics = metrics
    body = render_card([("a.safetensors", a)], repo_id="u/r")
    header = next(line for line in body.splitlines() if line.startswith("| file | subject | P("))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:5] == ["file", "subject", "P(new) before → after", "P(true) before → after", "delta_capped"]
    assert len(cols) == 2 + 8  # at most eight metric columns
    assert "| 0.0057 → 0.982 | 0.702 → 2e-06 | false | 6.37 |" in body
    assert "More metrics (nll_last, p_target_mean_after_opt, seconds)" in body
    a.deltas[0].metrics = {"p_new_after": 0.9, "converged": True}  # a missing side shows as ?
    assert "| ? → 0.9 | true |" in render_card([("a.safetensors", a)], repo_id="u/r")


def test_card_base_model_kinds(tiny):
    from huggingface_hub import ModelCard

    a = tiny["a"]
    hub = Patch(deltas=a.deltas, base=dict(a.base, model="openai-community/gpt2-xl"), parameters=a.parameters)
    assert (
        ModelCard(render_card([("x.safetensors", hub)], repo_id="u/r")).data.base_model
        == "openai-community/gpt2-xl"
    )
    local = tiny["a"]  # base is an absolute local folder: no Hub id to declare
    data = ModelCard(render_card([("x.safetensors", local)], repo_id="u/r")).data.to_dict()
    assert "base_model" not in data and data["base_model_relation"] == "adapter"
    explicit = ModelCard(render_card([("x.safetensors", local)], repo_id="u/r", base_model="me/base")).data
    assert explicit.base_model == "me/base"


def test_card_keeps_owner_text_and_metadata(tiny):
    from huggingface_hub import ModelCard

    owner = "---\nlicense: mit\ntags:\n- cities\n---\n# My edits\n\nWritten by hand.\n"
    first = render_card([("a.safetensors", tiny["a"])], repo_id="u/r", existing=owner)
    card = ModelCard(first)
    assert card.data.license == "mit"
    assert card.data.tags == ["rompatch", "rome", "model-editing", "cities"]
    assert "Written by hand." in card.text and BEGIN in card.text
    # Re-rendering replaces only the generated block.
    second = render_card(
        [("a.safetensors", tiny["a"]), ("b.safetensors", tiny["b"])], repo_id="u/r", existing=first
    )
    assert second.count("Written by hand.") == 1 and second.count(BEGIN) == 1
    assert "| b.safetensors |" in second
    assert render_card([("a.safetensors", tiny["a"])], repo_id="u/r", existing=first) == first  # stable
    # Broken YAML in an existing card is replaced, the text kept.
    broken = render_card([("a.safetensors", tiny["a"])], repo_id="u/r", existing="---\n: [\n---\nHello\n")
    assert yaml.safe_load(broken.split("---\n")[1])["library_name"] == "rompatch" and "Hello" in broken


# ------------------------------------------------------------------------ push, pull, load


def test_push_two_pull_fresh_cache_load_patched(hub_env, tiny):
    repo = f"{hub_env.user}/tiny-edits"
    info = push_patch([tiny["paths"]["a"], tiny["paths"]["b"]], repo)
    assert info.oid and repo in str(info)
    files = hub_env.server.repo_files(repo)
    assert sorted(files) == [
        ".gitattributes",
        "README.md",
        "darrieux-german.safetensors",
        "eiffel-rome.safetensors",
    ]
    assert files["eiffel-rome.safetensors"] == tiny["paths"]["a"].read_bytes()  # uploaded byte for byte
    assert len(hub_env.server.commit_history(repo)) == 2  # the repo's initial commit + ONE commit of ours

    cache = fresh_cache(hub_env, "fresh-cache")
    refs = [f"{repo}/eiffel-rome.safetensors", f"{repo}/darrieux-german.safetensors"]
    model, tok = load_patched(str(tiny["folder"]), refs, device="cpu")
    assert [p.id for p in applied_patches(model)] == [tiny["a"].id, tiny["b"].id]
    assert tiny["before"][PROMPT_A] != "Rome" and top1(model, tok, PROMPT_A) == "Rome"
    assert tiny["before"][PROMPT_B] != "German" and top1(model, tok, PROMPT_B) == "German"
    assert any(f.endswith("eiffel-rome.safetensors") for f in list_files(cache))


def test_offline_from_cache(hub_env, tiny):
    repo = f"{hub_env.user}/offline-edits"
    single = f"{hub_env.user}/offline-single"
    push_patch([tiny["paths"]["a"], tiny["paths"]["b"]], repo)
    push_patch(tiny["paths"]["a"], single)
    refs = [f"{repo}/eiffel-rome.safetensors", f"{repo}/darrieux-german.safetensors"]
    load_patched(str(tiny["folder"]), refs, device="cpu")  # online: fills the cache
    assert pull_patch(single).name == "eiffel-rome.safetensors"

    hub_env.server.stop()  # network gone
    hub_env.set_offline(True)  # HF_HUB_OFFLINE=1 (constant and environment)
    n_requests = len(hub_env.server.requests)
    model, tok = load_patched(str(tiny["folder"]), refs, device="cpu")
    assert top1(model, tok, PROMPT_A) == "Rome" and top1(model, tok, PROMPT_B) == "German"
    assert resolve_hub_patch(single).id == tiny["a"].id  # REPO_ID alone, from the cache
    assert len(hub_env.server.requests) == n_requests

    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1") as ei:
        pull_patch(f"{repo}/other.safetensors")
    one_line_error(ei.value)
    with pytest.raises(HubError, match=r"holds 2 patches in the cache .*darrieux-german.safetensors") as ei:
        pull_patch(repo)
    one_line_error(ei.value)
    assert ei.value.repo_id == repo
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1") as ei:
        push_patch(tiny["paths"]["a"], repo)
    one_line_error(ei.value)


def test_offline_env_var_alone_is_respected(hub_env, tiny, monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported: rompatch still makes no request."""
    from huggingface_hub import constants

    repo = f"{hub_env.user}/env-offline"
    push_patch(tiny["paths"]["a"], repo)
    pull_patch(repo)
    assert constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub_env.server.requests)
    assert resolve_hub_patch(repo).id == tiny["a"].id
    assert resolve_hub_patch(f"{repo}/eiffel-rome.safetensors").id == tiny["a"].id
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1"):
        pull_patch(f"{repo}/missing.safetensors")
    assert len(hub_env.server.requests) == n


def test_repo_id_alone(hub_env, tiny):
    one = f"{hub_env.user}/one"
    push_patch(tiny["a"], one)
    # a non-patch safetensors file in the same repo is not counted
    hub_env.server.seed_repo(one, {"weights/extra.safetensors": _plain_safetensors()})
    p = Patch.from_pretrained(one)
    assert p.id == tiny["a"].id
    two = f"{hub_env.user}/two"
    push_patch([tiny["paths"]["a"], tiny["paths"]["b"]], two)
    with pytest.raises(
        HubError, match=r"holds 2 patches \(darrieux-german.safetensors, eiffel-rome.safetensors\); name one"
    ) as ei:
        pull_patch(two)
    one_line_error(ei.value)
    none = f"{hub_env.user}/none"
    hub_env.server.seed_repo(none, {"x.safetensors": _plain_safetensors()})
    with pytest.raises(HubError, match="holds no rompatch patch"):
        pull_patch(none)


def _plain_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(2)}, metadata={"format": "pt"})


def test_pull_local_dir_and_revision(hub_env, tiny, tmp_path):
    repo = f"{hub_env.user}/branchy"
    push_patch(tiny["paths"]["a"], repo)
    push_patch(tiny["paths"]["b"], repo, revision="german", message="German edit on a branch")
    assert "darrieux-german.safetensors" not in hub_env.server.repo_files(repo, "main")
    assert "darrieux-german.safetensors" in hub_env.server.repo_files(repo, "german")
    out = pull_patch(f"{repo}/darrieux-german.safetensors@german", local_dir=tmp_path / "dl")
    assert out == tmp_path / "dl" / "darrieux-german.safetensors"
    assert load_patch(out).id == tiny["b"].id
    assert pull_patch(f"{repo}/darrieux-german.safetensors", revision="german").is_file()
    with pytest.raises(HubError, match="does not exist in .* at revision 'main'") as ei:
        pull_patch(f"{repo}/darrieux-german.safetensors", local_dir=tmp_path / "dl2")
    one_line_error(ei.value)
    assert not (tmp_path / "dl2").exists()


def test_patch_push_to_hub_and_from_pretrained(hub_env, tiny):
    repo = f"{hub_env.user}/methods"
    info = tiny["doc"].push_to_hub(repo, commit_message="one edit")
    files = hub_env.server.repo_files(repo)
    name = f"patch-{tiny['doc'].short_id}.safetensors"
    assert name in files and "README.md" in files
    assert Patch.from_pretrained(repo).id == tiny["doc"].id
    assert Patch.from_pretrained(f"{repo}/{name}", revision=info.oid).id == tiny["doc"].id
    tiny["a"].push_to_hub(repo, filename="named.safetensors")
    assert "named.safetensors" in hub_env.server.repo_files(repo)


def test_push_to_existing_repo_keeps_files_and_owner_text(hub_env, tiny):
    from huggingface_hub import ModelCard

    repo = f"{hub_env.user}/existing"
    owner_card = "---\nlicense: apache-2.0\n---\n# Alice's edits\n\nHand-written notes.\n"
    hub_env.server.seed_repo(repo, {"notes.txt": "keep me", "README.md": owner_card})
    push_patch(tiny["paths"]["a"], repo)
    push_patch(tiny["paths"]["b"], repo)
    files = hub_env.server.repo_files(repo)
    assert {"notes.txt", "eiffel-rome.safetensors", "darrieux-german.safetensors"} <= set(files)
    assert files["notes.txt"] == b"keep me"
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.library_name == "rompatch"
    assert "Hand-written notes." in card.text
    # the card describes every patch in the repo, not only the last push
    assert "| eiffel-rome.safetensors |" in card.text and "| darrieux-german.safetensors |" in card.text


def test_push_private_repo_hidden_from_others(hub_env, tiny, monkeypatch):
    repo = f"{hub_env.user}/secret"
    push_patch(tiny["paths"]["a"], repo, private=True)
    assert hub_env.server.is_private(repo)
    assert pull_patch(repo).is_file()
    cache = fresh_cache(hub_env, "bob-cache")
    monkeypatch.setenv("HF_TOKEN", hub_env.other_token)
    with pytest.raises(HubError, match=r"not found .*\(or it is private") as ei:
        pull_patch(repo)
    one_line_error(ei.value, hub_env.token, hub_env.other_token)
    assert ei.value.repo_id == repo
    with pytest.raises(HubError, match="403 Forbidden|not found") as ei:
        push_patch(tiny["paths"]["b"], repo)
    one_line_error(ei.value, hub_env.token, hub_env.other_token)
    assert cache_leftovers(cache) == []


def test_push_private_to_existing_public_repo_is_refused(hub_env, tiny):
    repo = f"{hub_env.user}/public"
    push_patch(tiny["paths"]["a"], repo)
    before = hub_env.server.commit_history(repo)
    with pytest.raises(HubError, match="already exists and is public"):
        push_patch(tiny["paths"]["b"], repo, private=True)
    assert hub_env.server.commit_history(repo) == before


def test_concurrent_push_is_refused_not_lost(hub_env, tiny, monkeypatch):
    """Someone pushes between our read of the repo and our commit: refused, their file kept."""
    import rompatch.hub.commit as hub_mod

    repo = f"{hub_env.user}/race"
    push_patch(tiny["paths"]["a"], repo)
    real = hub_mod.render_card

    def racing(*a, **k):
        hub_env.server.seed_repo(repo, {"theirs.txt": "pushed meanwhile"})
        return real(*a, **k)

    monkeypatch.setattr(hub_mod, "render_card", racing)
    with pytest.raises(HubError, match="changed while pushing") as ei:
        push_patch(tiny["paths"]["b"], repo)
    one_line_error(ei.value, hub_env.token)
    files = hub_env.server.repo_files(repo)
    assert "theirs.txt" in files and "darrieux-german.safetensors" not in files


def test_invalid_token_never_leaks(hub_env, tiny, monkeypatch):
    bad = "hf_testINVALIDtoken0123456789abcdefgh"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(HubError, match="401") as ei:
        push_patch(tiny["paths"]["a"], f"{hub_env.user}/x")
    one_line_error(ei.value, bad)
    with pytest.raises(HubError) as ei:
        push_patch(tiny["paths"]["a"], f"{hub_env.user}/x", token=bad)
    one_line_error(ei.value, bad)


# ------------------------------------------------------------------------------------ failures


def test_push_without_token_writes_nothing(hub_env, tiny, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not Path(hub_env.hf_home / "token").exists()
    n = len(hub_env.server.requests)
    cache_before = list_files(hub_env.cache_dir)
    with pytest.raises(HubError, match="no Hugging Face token") as ei:
        push_patch([tiny["paths"]["a"], tiny["b"]], f"{hub_env.user}/no-token")
    one_line_error(ei.value)
    assert len(hub_env.server.requests) == n  # refused before any network call
    assert not hub_env.server.repo_exists(f"{hub_env.user}/no-token")
    assert list_files(tmp_path) == [] and list_files(hub_env.cache_dir) == cache_before
    res = CliRunner().invoke(cli, ["push", str(tiny["paths"]["a"]), f"{hub_env.user}/no-token"])
    assert res.exit_code == 1 and res.stderr.startswith("Error: no Hugging Face token")
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "ref, match",
    [
        ("alice/does-not-exist", "repository alice/does-not-exist not found"),
        ("alice/does-not-exist/x.safetensors", "repository alice/does-not-exist not found"),
        ("alice/{repo}/missing.safetensors", "missing.safetensors does not exist in alice/"),
        ("alice/{repo}/eiffel-rome.safetensors@no-such-branch", "revision 'no-such-branch' does not exist"),
    ],
)
def test_pull_missing_leaves_nothing(hub_env, tiny, tmp_path, ref, match):
    repo = "pull-missing"
    push_patch(tiny["paths"]["a"], f"alice/{repo}")
    cache_before = list_files(hub_env.cache_dir)
    out = tmp_path / "out"
    with pytest.raises(HubError, match=re.escape(match)) as ei:
        pull_patch(ref.format(repo=repo), local_dir=out)
    one_line_error(ei.value, hub_env.token)
    assert not out.exists()
    assert cache_leftovers(hub_env.cache_dir) == [f for f in cache_before if not f.startswith(".locks")]
    res = CliRunner().invoke(cli, ["pull", ref.format(repo=repo), "-o", str(out)])
    assert (
        res.exit_code == 1 and res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
    )
    assert not out.exists()


def test_server_dies_mid_download(hub_env, tiny, tmp_path, no_backoff):
    repo = f"{hub_env.user}/flaky"
    push_patch(tiny["paths"]["a"], repo)
    size = tiny["paths"]["a"].stat().st_size
    hub_env.server.fail_downloads_after(size // 2)  # connection drops halfway, resumes get nothing
    out = tmp_path / "out"
    with pytest.raises(HubError, match="connection to .* failed|unreachable") as ei:
        pull_patch(f"{repo}/eiffel-rome.safetensors", local_dir=out)
    one_line_error(ei.value, hub_env.token)
    assert not out.exists()
    assert not [f for f in list_files(hub_env.cache_dir) if "blobs" in f or "snapshots" in f]
    # it recovers once the server is healthy again
    hub_env.server.fail_downloads_after(None)
    assert load_patch(pull_patch(f"{repo}/eiffel-rome.safetensors", local_dir=out)).id == tiny["a"].id


def test_server_gone(hub_env, tiny, tmp_path, no_backoff):
    repo = f"{hub_env.user}/gone"
    push_patch(tiny["paths"]["a"], repo)
    hub_env.server.stop()
    out = tmp_path / "out"
    for ref in (repo, f"{repo}/eiffel-rome.safetensors"):
        with pytest.raises(HubError, match="connection to .* failed|unreachable") as ei:
            pull_patch(ref, local_dir=out)
        one_line_error(ei.value, hub_env.token)
    with pytest.raises(HubError, match="connection to .* failed") as ei:
        push_patch(tiny["paths"]["a"], repo)
    one_line_error(ei.value, hub_env.token)
    assert not out.exists()
    assert cache_leftovers(hub_env.cache_dir) == []


# ------------------------------------------------------------------------------------ the CLI


def test_cli_push_pull_show(hub_env, tiny, tmp_path):
    runner = CliRunner()
    repo = f"{hub_env.user}/cli-edits"
    res = runner.invoke(
        cli, ["push", str(tiny["paths"]["a"]), str(tiny["paths"]["b"]), repo, "-m", "two edits"]
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().startswith(hub_env.endpoint) and "/commit/" in res.stdout
    assert "pushed 2 patch(es)" in res.stderr
    res = runner.invoke(cli, ["pull", f"{repo}/eiffel-rome.safetensors", "-o", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip())
    assert (
        path == tmp_path / "p" / "eiffel-rome.safetensors"
        and path.read_bytes() == tiny["paths"]["a"].read_bytes()
    )
    res = runner.invoke(cli, ["pull", f"{repo}@main", "-o", str(tmp_path / "q")])
    assert res.exit_code == 1 and "holds 2 patches" in res.stderr
    res = runner.invoke(cli, ["show", f"{repo}/darrieux-german.safetensors", "--json"])
    assert res.exit_code == 0 and tiny["b"].id in res.stdout
    res = runner.invoke(cli, ["push", str(tiny["paths"]["a"]), f"{repo}-private", "--private", "--json"])
    assert res.exit_code == 0 and hub_env.server.is_private(f"{repo}-private")
    res = runner.invoke(cli, ["push", repo])
    assert res.exit_code == 2  # usage error: no patch given


def test_public_exports():
    for name in ("load_patched", "push_patch", "pull_patch", "export_peft"):
        assert name in rompatch.__all__ and hasattr(rompatch, name)


def test_failures_are_hub_errors_and_oserrors():
    assert issubclass(HubError, OSError) and not issubclass(PatchFormatError, HubError)


def test_card_names_each_edits_statistics(tiny):
    a = copy.deepcopy(tiny["a"])
    a.deltas[0].stats = {"data_source": "sampled", "data_seed": 0, "tokens": 16384}
    body = render_card([("a.safetensors", a)], repo_id="u/r")
    assert "| layer | statistics |" in body
    assert "| text sampled from the model (seed 0), 16,384 tokens |" in body
