"""One error hierarchy. Each error subclasses a builtin so callers can catch either.

Messages are one line: what is wrong, and how to fix it. The CLI prints them as they are. Where a
caller needs the particulars (which parameter, which repo, which path), the error carries them as
attributes too; they are None where the code raising it does not know them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


class RompatchError(Exception):
    """Base class of every error rompatch raises on purpose."""


class PatchFormatError(RompatchError, ValueError):
    """A patch file is not valid rompatch format v1 (or cannot be read at all)."""


class PatchVersionError(PatchFormatError):
    """A patch was written by a newer, incompatible major format version."""


class RequestError(RompatchError, ValueError):
    """An edit request is malformed (prompt without '{}', empty subject or target, ...)."""


class ArchitectureError(RompatchError, KeyError):
    """No ModelSpec is known for a model_type, or the spec does not match the model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FingerprintMismatchError(RompatchError, ValueError):
    """A tensor's sha256 differs from the one expected: the base value recorded in the patch, or
    (``verify_applied``) the patched value.

    ``parameter``: the tensor's name; ``expected`` and ``found``: the full sha256 hex digests.
    """

    def __init__(
        self,
        message: str,
        *,
        parameter: str | None = None,
        expected: str | None = None,
        found: str | None = None,
    ) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.expected = expected
        self.found = found


class NotAppliedError(RompatchError, ValueError):
    """Reverting a patch that is not applied to this model."""


class ModelLoadError(RompatchError, OSError):
    """A model could not be found, fetched or converted."""


class StatsError(RompatchError, ValueError):
    """Statistics data is missing, unreadable or unusable."""


class CheckpointError(RompatchError, OSError):
    """An on-disk checkpoint is unusable for the requested operation."""


class NoSuchFolderError(ModelLoadError, CheckpointError):
    """A local model folder (or checkpoint) that does not exist; decided before any Hub call.

    ``path``: the folder that was asked for.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = path


class LineageError(RompatchError, ValueError):
    """A patch needs another patch applied first (or a stack has conflicting lineage)."""


class ConflictError(RompatchError, ValueError):
    """Two edits disagree (same subject and relation, different targets)."""


class HubError(RompatchError, OSError):
    """A Hub operation failed (missing repo or file, no token, offline cache miss, ...).

    ``repo_id``: the Hub repo the operation was about (None before one is known, e.g. for an
    unparsable reference).
    """

    def __init__(self, message: str, *, repo_id: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id


class DeviceError(RompatchError, RuntimeError):
    """A requested device is not available (for example CUDA without a GPU)."""


class ExportError(RompatchError, ValueError):
    """A patch cannot be exported in the requested form, or the output folder is unusable."""


class BaseMismatchError(RompatchError, ValueError):
    """Patches, or a patch and the model or checkpoint it is applied to, are for different base models
    (another architecture, other shapes, another model_type)."""


class TraceError(RompatchError, ValueError):
    """A causal-tracing input is unusable (subject not in the prompt, unknown kind, bad fact file, ...)."""


class MissingDependencyError(RompatchError, ImportError):
    """An optional dependency is not installed (for example matplotlib for plots)."""


def require(module: str, extra: str, *, what: str, hint: str = "") -> ModuleType:
    """Import the optional dependency ``module`` (installed with ``rompatch[extra]``), or raise a
    one-line ``MissingDependencyError`` naming the fix: ``"<what> need <module>, ..."``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{what} need {module}, which is not installed; run pip install 'rompatch[{extra}]'"
            + (f" ({hint})" if hint else "")
        ) from None


def require_matplotlib() -> ModuleType:
    """matplotlib for plots (the ``rompatch[plot]`` extra), or the error naming the fix."""
    return require("matplotlib", "plot", what="plots", hint="or pass --no-plot")


class HubConnectionError(HubError):
    """The Hub could not be reached (connection refused, reset or timed out)."""


class EvalError(RompatchError, ValueError):
    """An evaluation input (data file, kind) or its output folder is unusable."""


class MergeError(RompatchError, ValueError):
    """Deltas cannot be re-solved jointly: a key is missing, the system is ill-conditioned, or an
    edit's target cannot be known (it was computed on top of a patch the merge lacks)."""


class AuditError(RompatchError, ValueError):
    """A patch cannot be audited as asked: no delta has a key to measure reach against, the model is
    not the patch's base, or an audit threshold or saved audit is unusable."""


class SignatureError(RompatchError, ValueError):
    """A patch's signature (``rompatch.signing``) is missing, malformed, does not verify or is by a key
    that is not trusted; or a key file is unusable.

    ``patch_id``: the patch concerned; ``key_id``: the signing key (``"ed25519:…"``), where known.
    """

    def __init__(self, message: str, *, patch_id: str | None = None, key_id: str | None = None) -> None:
        super().__init__(message)
        self.patch_id = patch_id
        self.key_id = key_id


class UnsignedPatchError(SignatureError):
    """A signature is required, and the patch carries none."""


class MalformedSignatureError(SignatureError):
    """The patch's signature metadata is not a valid signature entry (corrupt or hand-made)."""


class BadSignatureError(SignatureError):
    """The signature does not verify for this patch: it was made for another patch, altered or forged."""


class UntrustedKeyError(SignatureError):
    """The signature verifies, but was made by a key that is not among the trusted ones."""


class KeyFileError(SignatureError):
    """A key file is missing, unreadable, of another kind (a private key given as a public one, RSA,
    ...) or encrypted without a passphrase."""
