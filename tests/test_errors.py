"""The error hierarchy: attributes for callers, and errors that survive pickling (worker processes)."""

from __future__ import annotations

import pickle

from rompatch.errors import (
    FingerprintMismatchError,
    HubConnectionError,
    HubError,
    NoSuchFolderError,
    PatchFormatError,
)


def test_attributes_default_to_none_and_survive_pickling():
    assert HubError("offline").repo_id is None
    assert FingerprintMismatchError("differs").parameter is None
    errors = [
        FingerprintMismatchError("m", parameter="w", expected="a" * 64, found="b" * 64),
        HubConnectionError("down", repo_id="alice/edits"),
        NoSuchFolderError("no such folder: x", path="x"),
    ]
    for e in errors:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and vars(back) == vars(e)


def test_failures_are_hub_errors_and_oserrors():
    assert issubclass(HubError, OSError) and not issubclass(PatchFormatError, HubError)
