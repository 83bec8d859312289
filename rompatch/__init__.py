"""rompatch: rank-one fact edits (ROME) as small, reviewable, revertible patch files."""

__version__ = "0.1.0"

from .apply import applied_patches, apply_patch, patched, revert_patch, verify_applied  # noqa: E402
from .arch import ModelSpec, default_layer, get_spec, register_spec  # noqa: E402
from .errors import (  # noqa: E402
    ArchitectureError,
    FingerprintMismatchError,
    LineageError,
    ModelLoadError,
    NotAppliedError,
    PatchFormatError,
    PatchVersionError,
    RequestError,
    RompatchError,
)
from .fingerprint import tensor_sha256  # noqa: E402
from .models import load_model, model_identity  # noqa: E402
from .patch import ParamInfo, Patch, RankOneDelta, load_patch, save_patch  # noqa: E402
from .request import EditRequest, load_requests  # noqa: E402

__all__ = [
    "__version__",
    # requests and architectures
    "EditRequest",
    "load_requests",
    "ModelSpec",
    "get_spec",
    "register_spec",
    "default_layer",
    # models
    "load_model",
    "model_identity",
    # patches
    "Patch",
    "RankOneDelta",
    "ParamInfo",
    "load_patch",
    "save_patch",
    "tensor_sha256",
    # in-memory apply / revert
    "apply_patch",
    "revert_patch",
    "patched",
    "applied_patches",
    "verify_applied",
    # errors
    "RompatchError",
    "PatchFormatError",
    "PatchVersionError",
    "RequestError",
    "ArchitectureError",
    "FingerprintMismatchError",
    "LineageError",
    "NotAppliedError",
    "ModelLoadError",
]
