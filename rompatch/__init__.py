"""rompatch: rank-one fact edits (ROME) as small, reviewable, revertible patch files."""

__version__ = "0.1.0"

from .apply import applied_patches, apply_patch, patched, revert_patch, verify_applied  # noqa: E402
from .arch import ModelSpec, default_layer, get_spec, register_spec  # noqa: E402
from .checkpoint import apply_to_checkpoint, checkpoint_log, open_checkpoint, revert_checkpoint  # noqa: E402
from .create import create_patch  # noqa: E402
from .diff import diff  # noqa: E402
from .errors import (  # noqa: E402
    ArchitectureError,
    BaseMismatchError,
    CheckpointError,
    ConflictError,
    EvalError,
    ExportError,
    FingerprintMismatchError,
    HubError,
    LineageError,
    ModelLoadError,
    NotAppliedError,
    PatchFormatError,
    PatchVersionError,
    RequestError,
    RompatchError,
    StatsError,
)
from .evaluate import evaluate_counterfact, load_records, run_evaluation, summarize  # noqa: E402
from .extract import extract_patch  # noqa: E402
from .fingerprint import tensor_sha256  # noqa: E402
from .fluency import GenerationSettings  # noqa: E402
from .hub import pull_patch, push_patch  # noqa: E402
from .known_facts import AverageTrace, trace_known  # noqa: E402
from .loading import load_patched  # noqa: E402
from .models import load_model, model_identity  # noqa: E402
from .patch import ParamInfo, Patch, RankOneDelta, load_patch, save_patch  # noqa: E402
from .peft import export_peft  # noqa: E402
from .request import EditRequest, load_requests  # noqa: E402
from .rome import ROMEHyperParams, compute_delta  # noqa: E402
from .sequential import run_sequential  # noqa: E402
from .stack import stack_patches  # noqa: E402
from .stats import SecondMoment, get_second_moment  # noqa: E402
from .tracing import TraceResult, embedding_std, trace_fact  # noqa: E402

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
    "HubError",
    "ExportError",
    "StatsError",
    # the edit engine
    "ROMEHyperParams",
    "compute_delta",
    "create_patch",
    "SecondMoment",
    "get_second_moment",
    "evaluate_counterfact",
    "summarize",
    "run_evaluation",
    "load_records",
    "run_sequential",
    "GenerationSettings",
    "EvalError",
    # sharing and loading
    "load_patched",
    "push_patch",
    "pull_patch",
    "export_peft",
    # checkpoints on disk
    "apply_to_checkpoint",
    "revert_checkpoint",
    "checkpoint_log",
    "open_checkpoint",
    "stack_patches",
    "diff",
    "extract_patch",
    "CheckpointError",
    "ConflictError",
    "BaseMismatchError",
    # locating facts
    "trace_fact",
    "trace_known",
    "TraceResult",
    "AverageTrace",
    "embedding_std",
]
