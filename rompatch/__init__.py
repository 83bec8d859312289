"""rompatch: rank-one fact edits (ROME) as small, reviewable, revertible patch files.

Every public name is imported from its submodule on first use (PEP 562), so ``import rompatch``
(and ``rompatch --help``) does not import torch; ``from rompatch import X`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# Each public name and the submodule that defines it.
_EXPORTS = {
    # requests and architectures
    "EditRequest": "request",
    "load_requests": "request",
    "ModelSpec": "arch",
    "get_spec": "arch",
    "register_spec": "arch",
    "default_layer": "arch",
    "default_neighbours": "arch",
    # models
    "load_model": "models",
    "model_identity": "models",
    # patches
    "Patch": "patch",
    "RankOneDelta": "patch",
    "ParamInfo": "patch",
    "load_patch": "patch",
    "save_patch": "patch",
    "tensor_sha256": "fingerprint",
    # in-memory apply / revert
    "apply_patch": "apply",
    "revert_patch": "apply",
    "patched": "apply",
    "applied_patches": "apply",
    "verify_applied": "apply",
    # errors
    "RompatchError": "errors",
    "PatchFormatError": "errors",
    "PatchVersionError": "errors",
    "RequestError": "errors",
    "ArchitectureError": "errors",
    "FingerprintMismatchError": "errors",
    "LineageError": "errors",
    "NotAppliedError": "errors",
    "ModelLoadError": "errors",
    "HubError": "errors",
    "ExportError": "errors",
    "StatsError": "errors",
    "NoSuchFolderError": "errors",
    "HubConnectionError": "errors",
    "DeviceError": "errors",
    "TraceError": "errors",
    "MissingDependencyError": "errors",
    # the edit engine
    "ROMEHyperParams": "rome",
    "compute_delta": "rome",
    "create_patch": "create",
    "create_patches": "create",
    "Editor": "create",
    "EditTarget": "arch",
    "SecondMoment": "stats",
    "get_second_moment": "stats",
    "evaluate_counterfact": "evaluation.evaluate",
    "summarize": "evaluation.evaluate",
    "run_evaluation": "evaluation.evaluate",
    "load_records": "evaluation.evaluate",
    "run_sequential": "evaluation.sequential",
    "GenerationSettings": "evaluation.fluency",
    "EvalError": "errors",
    # sharing and loading
    "load_patched": "loading",
    "push_patch": "hub.push",
    "pull_patch": "hub.pull",
    "export_peft": "hub.peft",
    # checkpoints on disk
    "apply_to_checkpoint": "checkpoint.operations",
    "revert_checkpoint": "checkpoint.operations",
    "checkpoint_log": "checkpoint.operations",
    "open_checkpoint": "checkpoint.reader",
    "stack_patches": "stack",
    "merge_patches": "merge",
    "MergeError": "errors",
    # what a patch changes beyond its fact
    "audit_patch": "audit",
    "AuditReport": "audit",
    "AuditError": "errors",
    "diff": "checkpoint.diff",
    "extract_patch": "checkpoint.extract",
    "CheckpointError": "errors",
    "ConflictError": "errors",
    "BaseMismatchError": "errors",
    # who made a patch
    "sign_patch": "signing",
    "verify_signature": "signing",
    "SignatureError": "errors",
    "UnsignedPatchError": "errors",
    "MalformedSignatureError": "errors",
    "BadSignatureError": "errors",
    "UntrustedKeyError": "errors",
    "KeyFileError": "errors",
    # locating facts
    "trace_fact": "tracing.trace",
    "trace_known": "tracing.known_facts",
    "TraceResult": "tracing.trace",
    "AverageTrace": "tracing.known_facts",
    "embedding_std": "tracing.trace",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
