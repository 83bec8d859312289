"""rompatch/hub/transfer.py: Hub references, the reachability probe, and the one error mapper when the
server fails."""

from __future__ import annotations

import re
import socket
import time

import pytest

from rompatch.errors import HubError
from rompatch.hub.pull import pull_patch
from rompatch.hub.push import push_patch
from rompatch.hub.transfer import HubRef, hub_unavailable, parse_ref
from rompatch.patch import load_patch
from tests.helpers.hub import cache_leftovers, one_line_error
from tests.helpers.hubserver import list_files


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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


# ------------------------------------------------------------------------------------ probe


@pytest.mark.usefixtures("offline_env")
def test_unreachable_hub_is_decided_by_one_quick_probe(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    why = hub_unavailable("Salesforce/wikitext", repo_type="dataset")
    assert time.perf_counter() - t0 < 5
    assert why is not None and "did not answer" in why
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


@pytest.mark.usefixtures("offline_env")
def test_offline_is_answered_without_a_request(monkeypatch):
    def no_request(*a, **k):
        raise AssertionError("no request may be sent when HF_HUB_OFFLINE is set")

    monkeypatch.setattr("huggingface_hub.get_session", no_request)
    assert hub_unavailable("Salesforce/wikitext", repo_type="dataset") == "HF_HUB_OFFLINE is set"


# ------------------------------------------------------------------------------------ failures


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


@pytest.mark.usefixtures("offline_env")
def test_an_unreachable_hub_fails_a_patch_download_at_once_without_retry_noise(monkeypatch, caplog, tmp_path):
    """Issue 17, failure 7: a USER/REPO/FILE reference with no network retried for about 25 s and
    printed a dozen warnings before its error."""
    from rompatch.refs import resolve_patch

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    with pytest.raises(HubError, match=r"alice/edits.*not in the Hugging Face cache") as ei:
        resolve_patch("alice/edits/jordan.safetensors")
    assert time.perf_counter() - t0 < 10
    one_line_error(ei.value)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
