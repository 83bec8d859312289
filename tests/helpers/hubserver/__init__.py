"""An in-memory, Hugging Face Hub-compatible HTTP server for tests.

The real ``huggingface_hub`` client (2.4.0) talks to it through ``HF_ENDPOINT`` (see
``tests/helpers/hub_fixtures.py`` for what has to be patched besides the environment variable).
Standard library only.

What it serves, modelled on what the 2.4.0 client sends and parses:

* ``GET  /api/whoami-v2``
* ``POST /api/repos/create``, ``DELETE /api/repos/delete``
* ``GET  /api/{models,datasets,spaces}/{ns}/{name}[/revision/{rev}]`` (repo info, ``blobs=true``)
* ``GET  /api/.../tree/{rev}[/{path}]`` (``recursive``), ``POST /api/.../paths-info/{rev}``
* ``GET  /api/.../refs``, ``GET /api/.../commits/{rev}``
* ``POST /api/.../preupload/{rev}``: every file is ``uploadMode: "regular"``, so the content travels
  base64-encoded inside the commit and neither LFS nor Xet is ever used
* ``POST /api/.../commit/{rev}`` (NDJSON: ``header``, ``file``, ``deletedFile``, ``deletedFolder``;
  ``create_pr=1``; ``parentCommit``)
* ``POST/DELETE /api/.../branch/{branch}``
* ``POST /api/validate-yaml`` (always valid)
* ``HEAD/GET /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``
  (git blob sha1, like the Hub for non-LFS files), ``Content-Length`` and ``Range`` support.

Behaviour that mirrors the real Hub on purpose (and may surprise):

* A new repo starts with an ``initial commit`` holding ``.gitattributes`` (pass
  ``initial_gitattributes=False`` to get an empty repo instead).
* Committing to (or pre-uploading for) a branch that does not exist is ``404 RevisionNotFound``
  ("Invalid rev id"), as on the Hub: create it with ``create_branch`` first. Set
  ``auto_create_branches=True`` to have such commits fork the branch from ``main`` instead.
* Unknown or private-and-not-yours repos: ``401`` for anonymous requests, ``404`` for authenticated
  ones, both with ``X-Error-Code: RepoNotFound`` (the client raises ``RepositoryNotFoundError``).
* A token that is not in ``tokens`` gets ``401 Invalid credentials in Authorization header`` on
  every route, public reads included.
* Writes without a token get ``401``; writes by a user who can see the repo but does not own it
  get ``403``.

Not modelled (differences from the real Hub to keep in mind):

* LFS/Xet storage. On the Hub, ``*.safetensors`` (matched by ``.gitattributes``) and large or binary
  files are LFS/Xet files: their ``ETag``/cache blob name is the sha256, they carry ``X-Xet-Hash`` and
  ``lfs`` metadata in tree listings, and ``/resolve`` may redirect to a CDN. Here every file is a plain
  git blob served inline.
* Discussions and pull-request APIs: ``create_pr=True`` works through ``create_commit``/``upload_file``
  (``?create_pr=1`` on the commit route) but not through ``upload_folder``, which with ``hf_xet``
  installed calls ``create_pull_request`` (``POST /api/.../discussions``, answered 404 here).
* Tags, gated repos, pagination (all listings fit in one page), rate limits.

Failure injection (faults.py): :meth:`HubServer.fail_downloads_after`, :meth:`HubServer.break_next_download`,
:meth:`HubServer.fail_next_requests` and :meth:`HubServer.stop`.

The package: ``server.py`` (``HubServer``: lifecycle, authentication, dispatch), ``store.py`` (repos,
commits, files, access), ``api.py`` (``/api`` routes and reads), ``commits.py`` (preupload, commit,
branches), ``resolve.py`` (downloads), ``faults.py`` (failure injection), ``responses.py`` (errors and
JSON), ``httpd.py`` (the threading HTTP server and handler).
"""

from tests.helpers.hubserver.server import HubServer, RequestRecord
from tests.helpers.hubserver.store import git_blob_sha1, list_files

__all__ = ["HubServer", "RequestRecord", "git_blob_sha1", "list_files"]
