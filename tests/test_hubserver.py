"""The fake Hub in tests/helpers/hubserver/, exercised with the real huggingface_hub client (2.4.0)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    constants,
    file_download,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from tests.helpers.hubserver import git_blob_sha1
from tests.helpers.hubserver import list_files as cached_files

# Registered here too so that this module runs on its own; a no-op once tests/conftest.py loads it.
pytest_plugins = ["tests.helpers.hub_fixtures"]

A = b"\x00\x01safetensors-ish payload" * 8
B = b'{"layer": 3, "rank": 1}'
C = b"third file"


def _new_repo(env, name: str, files: dict[str, bytes] | None = None, **kwargs) -> tuple[str, str]:
    api = env.api()
    repo_id = api.create_repo(name, **kwargs).repo_id
    ops = [CommitOperationAdd(path, data) for path, data in (files or {"a.txt": A}).items()]
    return repo_id, api.create_commit(repo_id, ops, commit_message=f"add {len(ops)} files").oid


def _no_token_in(env, text: str, *extra: str) -> None:
    for token in (*env.server.tokens, *extra):
        assert token not in text


def test_environment_points_the_client_at_the_fake_hub(hub_env):
    assert constants.ENDPOINT == hub_env.endpoint
    assert hf_hub_url("alice/x", "f.txt").startswith(hub_env.endpoint + "/alice/x/resolve/main/")
    assert huggingface_hub.hf_api.api.endpoint == hub_env.endpoint
    assert constants.HF_HUB_CACHE == str(hub_env.cache_dir)
    assert hub_env.api().whoami()["name"] == "alice"  # HF_TOKEN is alice's
    assert hub_env.api(token=hub_env.other_token).whoami()["name"] == "bob"
    with pytest.raises(HfHubHTTPError) as exc:
        hub_env.api(token="hf_notARealToken00000000000000000000").whoami()
    assert exc.value.response.status_code == 401
    _no_token_in(hub_env, str(exc.value), "hf_notARealToken00000000000000000000")


def test_subprocesses_inherit_the_environment(hub_env):
    repo, sha = _new_repo(hub_env, "sub")
    code = (
        "import sys; from huggingface_hub import HfApi, hf_hub_download;"
        "print(HfApi().whoami()['name']); print(hf_hub_download(sys.argv[1], 'a.txt'))"
    )
    out = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    user, path = out.stdout.split()
    assert user == "alice"
    assert Path(path) == hub_env.cache_dir / "models--alice--sub" / "snapshots" / sha / "a.txt"


def test_create_repo_public_private_and_exist_ok(hub_env):
    api = hub_env.api()
    url = api.create_repo("pub")
    assert url == f"{hub_env.endpoint}/alice/pub" and url.repo_id == "alice/pub"
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("pub")
    assert exc.value.response.status_code == 409
    assert api.create_repo("alice/pub", exist_ok=True).repo_id == "alice/pub"

    assert api.create_repo("priv", private=True).repo_id == "alice/priv"
    assert api.model_info("alice/priv").private is True
    assert api.model_info("alice/pub").private is False
    assert hub_env.server.is_private("alice/priv")

    # Module-level functions go through `huggingface_hub.hf_api.api`, patched by `hub_env`.
    assert huggingface_hub.create_repo("alice/viafunc").repo_id == "alice/viafunc"
    # A new repo holds the Hub's initial commit with `.gitattributes`.
    assert api.list_repo_files("alice/viafunc") == [".gitattributes"]

    bob = hub_env.api(token=hub_env.other_token)
    with pytest.raises(HfHubHTTPError) as exc:
        bob.create_repo("alice/intruder")
    assert exc.value.response.status_code == 403
    assert bob.create_repo("pub").repo_id == "bob/pub"


def test_commit_two_files_then_a_second_commit_keeps_them(hub_env):
    api = hub_env.api()
    repo = api.create_repo("patches").repo_id
    first = api.create_commit(
        repo,
        [CommitOperationAdd("a.safetensors", A), CommitOperationAdd("meta/b.json", B)],
        commit_message="two files",
    )
    assert re.fullmatch(r"[0-9a-f]{40}", first.oid)
    assert first.commit_url == f"{hub_env.endpoint}/{repo}/commit/{first.oid}"
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "a.safetensors", "meta/b.json"]

    second = api.upload_file(path_or_fileobj=C, path_in_repo="c.txt", repo_id=repo)
    assert second.oid != first.oid
    assert sorted(huggingface_hub.list_repo_files(repo)) == [
        ".gitattributes",
        "a.safetensors",
        "c.txt",
        "meta/b.json",
    ]
    assert hub_env.server.repo_files(repo)["a.safetensors"] == A
    assert hub_env.server.commit_history(repo)[:2] == [second.oid, first.oid]

    info = api.model_info(repo, files_metadata=True)
    assert info.sha == second.oid and info.private is False and info.id == repo
    sizes = {s.rfilename: (s.size, s.blob_id) for s in info.siblings}
    assert sizes["meta/b.json"] == (len(B), git_blob_sha1(B))
    assert [c.title for c in api.list_repo_commits(repo)] == [
        "Upload c.txt with huggingface_hub",
        "two files",
        "initial commit",
    ]
    # Regular uploads only: the client never touched LFS or Xet endpoints.
    assert not [
        r.path for r in hub_env.server.requests if "xet" in r.path or "lfs" in r.path or ".git/" in r.path
    ]


def test_upload_folder_tree_listing_and_deletions(hub_env, tmp_path):
    from huggingface_hub.utils._runtime import is_xet_available

    assert is_xet_available()  # so upload_folder takes 2.4.0's pipelined (Xet-session) path
    folder = tmp_path / "patch"
    (folder / "weights").mkdir(parents=True)
    (folder / "notes").mkdir()
    (folder / "config.json").write_bytes(B)
    (folder / "weights" / "a.bin").write_bytes(A)
    (folder / "weights" / "b.bin").write_bytes(C)
    (folder / "notes" / "readme.txt").write_bytes(b"notes")
    api = hub_env.api()
    repo = api.create_repo("folder").repo_id

    commit = api.upload_folder(folder_path=folder, repo_id=repo, path_in_repo="p")
    assert set(api.list_repo_files(repo)) == {
        ".gitattributes",
        "p/config.json",
        "p/weights/a.bin",
        "p/weights/b.bin",
        "p/notes/readme.txt",
    }
    tree = {e.path: e for e in api.list_repo_tree(repo, recursive=True)}
    assert {p for p, e in tree.items() if isinstance(e, RepoFolder)} == {"p", "p/weights", "p/notes"}
    assert tree["p/weights/a.bin"].size == len(A) and tree["p/weights/a.bin"].blob_id == git_blob_sha1(A)
    top = {e.path: type(e) for e in api.list_repo_tree(repo)}
    assert top == {".gitattributes": RepoFile, "p": RepoFolder}
    assert sorted(e.path for e in api.list_repo_tree(repo, path_in_repo="p/weights")) == [
        "p/weights/a.bin",
        "p/weights/b.bin",
    ]
    assert [e.path for e in api.get_paths_info(repo, ["p/config.json", "p/weights", "nope"])] == [
        "p/config.json",
        "p/weights",
    ]

    # Same content again: the preupload oids match, the client makes no commit.
    assert api.upload_folder(folder_path=folder, repo_id=repo, path_in_repo="p").oid == commit.oid

    api.create_commit(
        repo,
        [CommitOperationDelete("p/config.json"), CommitOperationDelete("p/weights/")],
        commit_message="remove",
    )
    assert set(api.list_repo_files(repo)) == {".gitattributes", "p/notes/readme.txt"}
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("p/never.txt", repo)
    assert not [r.path for r in hub_env.server.requests if "xet" in r.path or "lfs" in r.path]


def test_hf_hub_download_and_snapshot_download_populate_the_cache(hub_env, tmp_path):
    repo, sha = _new_repo(hub_env, "dl", {"a.txt": A, "sub/b.bin": B})
    storage = hub_env.cache_dir / "models--alice--dl"

    path = Path(hf_hub_download(repo, "sub/b.bin"))
    assert path == storage / "snapshots" / sha / "sub" / "b.bin"
    assert path.read_bytes() == B
    assert (storage / "refs" / "main").read_text() == sha
    assert (storage / "blobs" / git_blob_sha1(B)).is_file()  # ETag = git blob id, like the Hub

    snap = Path(snapshot_download(repo))
    assert snap == storage / "snapshots" / sha
    assert cached_files(snap) == [".gitattributes", "a.txt", "sub/b.bin"]
    assert (snap / "a.txt").read_bytes() == A

    # By commit id, a cached file is returned without any request.
    before = len(hub_env.server.requests)
    assert Path(hf_hub_download(repo, "a.txt", revision=sha)) == snap / "a.txt"
    assert len(hub_env.server.requests) == before

    out = Path(snapshot_download(repo, local_dir=tmp_path / "out"))
    assert (out / "sub" / "b.bin").read_bytes() == B


def test_offline_mode_reads_from_the_cache(hub_env):
    repo, sha = _new_repo(hub_env, "off", {"a.txt": A, "b.txt": B})
    path = hf_hub_download(repo, "a.txt")
    snap = snapshot_download(repo)
    server = hub_env.server

    # Quirk: HF_HUB_OFFLINE in the environment is read at import only; a running process ignores it.
    hub_env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(server.requests)
    hf_hub_download(repo, "a.txt")
    assert len(server.requests) > before

    hub_env.set_offline()
    before = len(server.requests)
    assert hf_hub_download(repo, "a.txt") == path
    assert snapshot_download(repo) == snap
    assert Path(hf_hub_download(repo, "b.txt", revision=sha)).read_bytes() == B
    assert len(server.requests) == before  # nothing reached the server
    with pytest.raises(OfflineModeIsEnabled):
        hub_env.api().model_info(repo)
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(repo, "not-cached.txt")
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("alice/never-downloaded")

    hub_env.set_offline(False)
    assert hub_env.api().model_info(repo).sha == sha


def test_branches_and_commit_ids(hub_env):
    api = hub_env.api()
    server = hub_env.server
    repo = api.create_repo("branchy").repo_id
    main1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="w.txt", repo_id=repo).oid

    # Like the Hub: committing to a branch that does not exist is RevisionNotFound.
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"dev", path_in_repo="w.txt", repo_id=repo, revision="dev")
    api.create_branch(repo, branch="dev")
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_branch(repo, branch="dev")
    assert exc.value.response.status_code == 409
    api.create_branch(repo, branch="dev", exist_ok=True)
    dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="w.txt", repo_id=repo, revision="dev").oid
    main2 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.txt", repo_id=repo).oid

    def read(revision: str) -> bytes:
        return Path(hf_hub_download(repo, "w.txt", revision=revision)).read_bytes()

    assert (read("dev"), read("main"), read(main1), read(dev)) == (b"dev", b"v2", b"v1", b"dev")
    assert api.model_info(repo, revision="dev").sha == dev
    assert {b.name: b.target_commit for b in api.list_repo_refs(repo).branches} == {"main": main2, "dev": dev}
    snap = Path(snapshot_download(repo, revision="dev"))
    assert snap.name == dev and (snap / "w.txt").read_bytes() == b"dev"
    assert (hub_env.cache_dir / "models--alice--branchy" / "refs" / "dev").read_text() == dev

    # Opt-in: forks missing branches from main on commit (what `hf upload --revision` does client-side).
    server.auto_create_branches = True
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, revision="feature/x")
    forked = server.repo_files(repo, "feature/x")
    assert (forked.keys(), forked["w.txt"], forked["x.txt"]) == (
        {".gitattributes", "w.txt", "x.txt"},
        b"v2",
        b"x",
    )
    assert Path(hf_hub_download(repo, "x.txt", revision="feature/x")).read_bytes() == b"x"

    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="w.txt", repo_id=repo, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert read("refs/pr/1") == b"pr" and read("main") == b"v2"


def test_private_repo_is_hidden_from_other_tokens(hub_env, tmp_path):
    repo, _ = _new_repo(hub_env, "secret", {"s.txt": b"s"}, private=True)
    assert Path(hf_hub_download(repo, "s.txt")).read_bytes() == b"s"
    for other in (hub_env.other_token, False):
        api = hub_env.api(token=other)
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(repo)
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files(repo)
        assert api.repo_exists(repo) is False
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo, "s.txt", token=other, cache_dir=tmp_path / f"cache-{other}")
        with pytest.raises(RepositoryNotFoundError):
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert hub_env.server.repo_files(repo).keys() == {".gitattributes", "s.txt"}


def test_writes_need_a_valid_token_and_errors_do_not_leak_tokens(hub_env):
    repo, sha = _new_repo(hub_env, "guarded")
    anonymous = hub_env.api(token=False)
    bad_token = "hf_notARealToken00000000000000000000"
    errors = []
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert exc.value.response.status_code == 401
    assert "must be authenticated" in str(exc.value)
    errors.append(exc.value)
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.create_repo("anon")
    assert exc.value.response.status_code == 401
    errors.append(exc.value)
    with pytest.raises(HfHubHTTPError) as exc:
        hub_env.api(token=hub_env.other_token).upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo
        )
    assert exc.value.response.status_code == 403  # bob sees alice's public repo but cannot write to it
    errors.append(exc.value)
    with pytest.raises(HfHubHTTPError) as exc:
        hub_env.api(token=bad_token).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert exc.value.response.status_code == 401
    assert "Invalid credentials" in str(exc.value)
    errors.append(exc.value)

    for err in errors:
        _no_token_in(hub_env, f"{err}\n{err!r}\n{err.server_message}", bad_token)
    assert hub_env.server.commit_history(repo)[0] == sha
    assert hub_env.server.repo_files(repo).keys() == {".gitattributes", "a.txt"}
    assert hub_env.token in hub_env.server.tokens  # so the leak check covered the HF_TOKEN in use


def test_missing_repo_file_and_revision_errors(hub_env):
    repo, _ = _new_repo(hub_env, "exists")
    api = hub_env.api()

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        hub_env.api(token=False).model_info("alice/missing")  # anonymous: 401, same error type
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/missing", "a.txt")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/missing")

    with pytest.raises(RemoteEntryNotFoundError) as exc:
        hf_hub_download(repo, "missing.txt")
    assert isinstance(exc.value, EntryNotFoundError)
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(repo, path_in_repo="no/such/dir"))
    assert api.file_exists(repo, "a.txt") and not api.file_exists(repo, "missing.txt")

    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "a.txt", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo, revision="0" * 40)
    assert api.revision_exists(repo, "main") and not api.revision_exists(repo, "nope")


def test_interrupted_download_raises_and_leaves_nothing(hub_env, monkeypatch, tmp_path):
    # `http_get` sleeps 1 s before each of its resume attempts: skip the sleeps.
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda seconds: None))
    payload = bytes(range(256)) * 40
    repo, _ = _new_repo(hub_env, "flaky", {"blob.bin": payload})
    server = hub_env.server
    storage = hub_env.cache_dir / "models--alice--flaky"

    server.fail_downloads_after(1000)
    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(repo, "blob.bin")
    # Only the ref written before the download remains: no blob, no snapshot entry, no temp file.
    assert cached_files(storage) == ["refs/main"]
    local_dir = tmp_path / "local"
    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(repo, "blob.bin", local_dir=local_dir)
    assert not (local_dir / "blob.bin").exists()
    assert not [f for f in cached_files(local_dir) if f.endswith(".incomplete") or f == "blob.bin"]

    # A single cut is survived. The client resumes with `Range` from the last chunk it got: with the
    # default 10 MB chunks a small file restarts from 0, so use small chunks to see a real resume.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)
    server.fail_downloads_after(None)
    server.break_next_download(after_bytes=1000)
    assert Path(hf_hub_download(repo, "blob.bin")).read_bytes() == payload
    assert [r.range for r in server.requests[-2:]] == [None, "bytes=768-"]


def test_stopped_server_and_injected_errors(hub_env):
    repo, sha = _new_repo(hub_env, "down")
    api = hub_env.api()
    server = hub_env.server
    path = hf_hub_download(repo, "a.txt")

    server.fail_next_requests(403, path_contains="/api/models/", message="Go away")
    with pytest.raises(HfHubHTTPError, match="Go away") as exc:
        api.model_info(repo)
    assert exc.value.response.status_code == 403
    assert api.model_info(repo).sha == sha  # only the next request failed

    server.fail_next_requests(503, method="HEAD")  # Hub down: the client falls back to its cache
    assert hf_hub_download(repo, "a.txt") == path

    server.stop()
    with pytest.raises(httpx2.ConnectError):
        api.model_info(repo)
    assert hf_hub_download(repo, "a.txt") == path


def test_dataset_repos_and_seeded_repos(hub_env):
    api = hub_env.api()
    repo = api.create_repo("data", repo_type="dataset").repo_id
    api.upload_file(path_or_fileobj=B, path_in_repo="d.json", repo_id=repo, repo_type="dataset")
    assert api.list_repo_files(repo, repo_type="dataset") == [".gitattributes", "d.json"]
    assert api.dataset_info(repo).id == repo
    path = Path(hf_hub_download(repo, "d.json", repo_type="dataset"))
    assert path.read_bytes() == B and "datasets--alice--data" in path.parts
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo)  # same id, other repo type

    # Content can be put on the server directly, e.g. a repo owned by a user with no token.
    sha = hub_env.server.seed_repo("carol/public", {"w.txt": "seeded"})
    path = Path(hf_hub_download("carol/public", "w.txt", token=False))
    assert path.read_bytes() == b"seeded" and sha in path.parts
