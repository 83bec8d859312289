"""Patch format v1: rank-one deltas plus provenance in one safetensors file.

The spec is docs/patch-format.md; this module is its implementation. ``save_patch`` and
``load_patch`` mirror each other, and ``load_patch`` refuses anything the spec does not allow: a
patch file is untrusted input, so every value the code reads is parsed strictly
(``safetensors_io.strict_json``) and type-checked here, and every refusal is one ``PatchFormatError``
line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ._version import __version__
from .atomic import atomic_write
from .constants import AUDIT, FORMAT_NAME, FORMAT_VERSION, MERGED_FROM, SIGNATURE
from .errors import PatchFormatError, PatchVersionError, RequestError
from .fingerprint import DTYPE_NAMES, dtype_name, tensor_sha256
from .hub.mixin import HubMixin
from .request import EditRequest
from .safetensors_io import StrictJSONError, brief, frame_header, parse_header, strict_json

log = logging.getLogger(__name__)

LAYOUTS = ("linear", "conv1d")  # linear: weight (out, in), ΔW = v uᵀ; conv1d: weight (in, out), ΔW = u vᵀ
REQUIRED_KEYS = (
    "format",
    "format_version",
    "rompatch_version",
    "patch_id",
    "base",
    "parameters",
    "deltas",
    "lineage",
)
# Metadata keys beyond the required ones (docs/patch-format.md, "Metadata"):
STACKED_FROM = "stacked_from"  # rompatch.stack: the patches a plain stack holds
EXTRACTED_FROM = "extracted_from"  # rompatch.checkpoint.extract: what an extracted patch came from
# Provenance written when a patch is made, read by lineage and merge decisions: inside the id from 1.3.
PROVENANCE_KEYS = (EXTRACTED_FROM, MERGED_FROM, STACKED_FROM)
PROVENANCE_IN_ID_SINCE = (1, 3)
# Annotations added to a finished patch, never inside its id: an audit report (checked to be of this
# patch by its readers) and a signature over the id (rompatch.signing).
ANNOTATION_KEYS = (AUDIT, SIGNATURE)
# Other tools' annotations: kept and re-saved, never read by rompatch, not inside the id, not copied
# into checkpoint records. Any other key is not part of the format and is dropped on load.
ANNOTATION_PREFIX = "x-"

# Limits of what load_patch reads (docs/patch-format.md, "Limits").
MAX_METADATA_BYTES = 32 << 20  # the safetensors header, and the metadata map (UTF-8 keys + values)
MAX_LAYER = 1 << 16  # layer indices 0 .. 65535
MAX_DIM = (1 << 31) - 1  # a weight dimension
PARAM_DTYPES = tuple(DTYPE_NAMES.values())  # float32, float16, bfloat16, float64
DELTA_FIELDS = ("layer", "parameter", "kind", "request", "hparams", "stats", "metrics", "key", "timings")
REQUEST_FIELDS = ("prompt", "subject", "target_new", "target_true", "relation_id", "case_id")
# The metrics rompatch reads as numbers (show, merge, audit, evaluation): numbers or null when present.
NUMBER_METRICS = (
    "p_new_before",
    "p_new_after",
    "p_true_before",
    "p_true_after",
    "neighbour_reach_before",
    "neighbour_reach_after",
    "p_prompt_with_all_neighbours",
    "update_spectral_norm",
    "weight_spectral_norm",
    "v_norm",
    "v_steps_run",
    "u_dot_k",
    "seconds",
    "merge_condition",
    "merge_edits",
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"(\d{1,6})\.(\d{1,6})")


@dataclass(frozen=True)
class ParamInfo:
    """A parameter a patch touches, as it was in the model the patch was computed against."""

    shape: tuple[int, int]  # the stored weight's shape
    dtype: str  # e.g. "float32", "bfloat16"
    sha256: str  # sha256 of the tensor's little-endian bytes in that dtype
    layout: str = "linear"

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.layout == "conv1d" else self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.layout == "conv1d" else self.shape[0]

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "sha256": self.sha256, "layout": self.layout}

    @classmethod
    def of(cls, weight: torch.Tensor, layout: str = "linear") -> ParamInfo:
        """Describe a live weight tensor: its shape, dtype, layout and sha256 fingerprint."""
        return cls(
            shape=tuple(weight.shape),
            dtype=dtype_name(weight.dtype),
            sha256=tensor_sha256(weight),
            layout=layout,
        )


def _own_vector(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float32 CPU vector with storage of its own (a row of a larger tensor is copied:
    safetensors refuses tensors that share memory)."""
    t = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    return t if t.untyped_storage().nbytes() == 4 * t.numel() else t.clone()


@dataclass
class RankOneDelta:
    """ΔW = v uᵀ on one matrix (out × in): ``u`` has the input size, ``v`` the output size."""

    u: torch.Tensor  # (in,)
    v: torch.Tensor  # (out,)
    layer: int
    parameter: str  # full parameter name, e.g. "model.layers.6.mlp.down_proj.weight"
    request: EditRequest | None = None
    kind: str = "rome"  # "rome", "extracted" or "manual"
    hparams: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Wall-clock seconds ("edit_seconds", "stats_seconds"): kept in the file, outside the content hash.
    timings: dict[str, float] = field(default_factory=dict)
    # k (in,): the key this delta's target value holds at (format 1.2); None for older files and
    # extracted deltas. Merging and protection need it (see rompatch.merge).
    key: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.u = _own_vector(self.u)
        self.v = _own_vector(self.v)
        if self.key is not None:
            self.key = _own_vector(self.key)

    def vectors(self) -> dict[str, torch.Tensor]:
        """The delta's stored vectors by their tensor suffix: ``u``, ``v`` and, when it has one, ``k``."""
        return {"u": self.u, "v": self.v, **({"k": self.key} if self.key is not None else {})}

    def matrix(self, layout: str = "linear") -> torch.Tensor:
        """The dense update in the stored weight's orientation, float32."""
        d = torch.outer(self.v, self.u)  # (out, in)
        return d.T if layout == "conv1d" else d

    @property
    def seconds(self) -> float | None:
        """Wall time of the edit's computation (format 1.0 files kept it under ``metrics``)."""
        return self.timings.get("edit_seconds", self.metrics.get("seconds"))

    def stats_label(self) -> str | None:
        """One phrase for this delta's statistics (see ``stats_label``)."""
        return stats_label(self.stats)

    def meta(self, *, hashed: bool = False) -> dict[str, Any]:
        """The delta's metadata entry; ``hashed``: the part the content hash covers (no timings)."""
        out = {
            "layer": self.layer,
            "parameter": self.parameter,
            "kind": self.kind,
            "request": None if self.request is None else self.request.to_dict(),
            "hparams": self.hparams,
            "stats": self.stats,
            "metrics": self.metrics,
        }
        if self.key is not None:
            out["key"] = True
        if self.timings and not hashed:
            out["timings"] = self.timings
        return out


@dataclass
class Patch(HubMixin):
    """An ordered list of rank-one deltas on one base model, with provenance."""

    deltas: list[RankOneDelta]
    base: dict[str, Any]  # {"model", "revision", "model_type", "dtype"}
    parameters: dict[str, ParamInfo]
    lineage: list[str] = field(default_factory=list)
    created_at: str | None = None
    rompatch_version: str = __version__
    # Metadata beyond the required keys, as strings: provenance (stacked_from, merged_from,
    # extracted_from), annotations (audit, signature) and "x-" keys. Kept on round-trip.
    extra: dict[str, str] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION  # a loaded file keeps its own, so re-saving keeps its bytes

    @property
    def id(self) -> str:
        """Content hash: sha256 over the canonical metadata and the tensors' bytes (timestamps excluded)."""
        return content_hash(self)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def provenance_in_id(self) -> bool:
        """Whether the id covers this patch's provenance metadata (stacked_from, merged_from,
        extracted_from): from format 1.3. An older file's provenance is unauthenticated."""
        return provenance_in_id(self.format_version)

    @property
    def requests(self) -> list[EditRequest | None]:
        return [d.request for d in self.deltas]

    def nbytes(self) -> int:
        return sum(
            4 * (d.u.numel() + d.v.numel() + (0 if d.key is None else d.key.numel())) for d in self.deltas
        )

    def validate(self) -> None:
        _validate(self)

    def merged_from(self) -> dict[str, Any] | None:
        """For a merge (``rompatch.merge``): ``{"inputs": [{"id", "deltas": [start, stop]}, ...],
        "condition": {parameter: condition number}}``; None for any other patch."""
        raw = self.extra.get(MERGED_FROM)
        return None if not raw else extra_json(self.extra, MERGED_FROM, "patch")

    def audit(self) -> dict[str, Any] | None:
        """The audit report attached by ``rompatch audit --attach`` (``rompatch.audit.saved_audit``
        reads it as an ``AuditReport``); None when the file carries none."""
        raw = self.extra.get(AUDIT)
        return None if not raw else extra_json(self.extra, AUDIT, "patch")

    def save(self, path: str | os.PathLike) -> Path:
        return save_patch(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Patch:
        """Read and validate a patch file (``load_patch``)."""
        return load_patch(path)

    def to_bytes(self) -> bytes:
        """The patch file's bytes (canonical: equal patches give equal bytes), after validating it.
        Stamps ``created_at`` when it is not set yet, as saving does."""
        _validate(self)
        if self.created_at is None:
            self.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return canonical_safetensors(save(to_tensors(self), metadata=to_metadata(self)))

    def summary(self) -> dict[str, Any]:
        """A JSON-able description, as printed by ``rompatch show --json``."""
        edits = []
        for i, d in enumerate(self.deltas):
            p = self.parameters[d.parameter]
            r = d.request
            edits.append(
                {
                    "index": i,
                    "kind": d.kind,
                    "layer": d.layer,
                    "parameter": d.parameter,
                    "shape": list(p.shape),
                    "subject": r.subject if r else None,
                    "prompt": r.prompt if r else None,
                    "target_true": r.target_true if r else None,
                    "target_new": r.target_new if r else None,
                    "key": d.key is not None,
                    "opening": bool(d.hparams.get("opening")),  # rompatch.opening
                    "u_norm": float(d.u.norm()),
                    "v_norm": float(d.v.norm()),
                    "metrics": d.metrics,
                    "seconds": d.seconds,
                    "statistics": stats_label(d.stats),
                }
            )
        return {
            "id": self.id,
            "format_version": self.format_version,
            "rompatch_version": self.rompatch_version,
            "created_at": self.created_at,
            "base": self.base,
            "parameters": {k: v.to_json() for k, v in self.parameters.items()},
            "lineage": self.lineage,
            "merged_from": self.merged_from(),
            "audit": _audit_summary(self.audit()),
            "n_deltas": len(self.deltas),
            "tensor_bytes": self.nbytes(),
            "edits": edits,
        }


def _audit_summary(audit: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not audit or not isinstance(audit, Mapping):
        return None
    keep = ("patch_id", "model", "corpus", "tokens", "summary", "thresholds")
    return {k: audit.get(k) for k in keep}


def stats_label(stats: Mapping[str, Any]) -> str | None:
    """One phrase for a delta's statistics record: 'wikitext-2:test-raw+valid, 100,000 tokens'."""
    src = stats.get("data_source") or stats.get("source")
    if not src:
        return "none (no covariance)" if stats.get("mom2_adjustment") is False else None
    if src == "sampled":
        src = f"text sampled from the model (seed {stats.get('data_seed', '?')})"
    tokens = stats.get("tokens")
    return f"{src}, {tokens:,} tokens" if isinstance(tokens, int) else str(src)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _version_tuple(version: str) -> tuple[int, int] | None:
    m = _VERSION.fullmatch(version)
    return None if m is None else (int(m[1]), int(m[2]))


def provenance_in_id(version: str) -> bool:
    """Whether files of format ``version`` have their provenance metadata inside the id (1.3 on)."""
    v = _version_tuple(version)
    return v is None or v >= PROVENANCE_IN_ID_SINCE


def extra_json(extra: Mapping[str, str], key: str, where: str) -> Any:
    """Metadata ``key`` of ``extra`` (``Patch.extra``) parsed by ``strict_json``; a one-line
    PatchFormatError when it is not strict JSON."""
    try:
        return strict_json(extra[key])
    except StrictJSONError as e:
        raise PatchFormatError(f"{where}: metadata '{key}' {e}; the file is corrupt") from None


def content_hash(patch: Patch) -> str:
    """The patch id (docs/patch-format.md, "Content hash"). From format 1.3 it covers the provenance
    metadata too: canonical JSON of ``{key: value}``, after the lineage, when the patch has any."""
    h = hashlib.sha256()
    h.update(f"{FORMAT_NAME}/{FORMAT_VERSION.split('.')[0]}\n".encode())
    h.update(_canonical(patch.base).encode())
    h.update(_canonical({k: v.to_json() for k, v in sorted(patch.parameters.items())}).encode())
    h.update(_canonical([d.meta(hashed=True) for d in patch.deltas]).encode())
    h.update(_canonical(list(patch.lineage)).encode())
    if patch.provenance_in_id:
        prov = {k: extra_json(patch.extra, k, "patch") for k in PROVENANCE_KEYS if patch.extra.get(k)}
        if prov:
            h.update(_canonical(prov).encode())
    for d in patch.deltas:
        for t in d.vectors().values():  # u, v, then k when stored
            h.update(t.numpy().astype("<f4").tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- saving


def to_metadata(patch: Patch) -> dict[str, str]:
    meta = dict(patch.extra)
    meta.update(
        {
            "format": FORMAT_NAME,
            "format_version": patch.format_version,
            "rompatch_version": patch.rompatch_version,
            "patch_id": patch.id,
            "created_at": patch.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base": _canonical(patch.base),
            "parameters": _canonical({k: v.to_json() for k, v in patch.parameters.items()}),
            "deltas": _canonical([d.meta() for d in patch.deltas]),
            "lineage": _canonical(list(patch.lineage)),
        }
    )
    return meta


def to_tensors(patch: Patch) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, d in enumerate(patch.deltas):
        for x, t in d.vectors().items():
            out[f"deltas.{i}.{x}"] = t
    return out


def save_patch(patch: Patch, path: str | os.PathLike) -> Path:
    """Validate, then write ``patch`` to ``path`` atomically. Returns the path."""
    data = patch.to_bytes()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written canonically (keys sorted, metadata
    keys sorted, no spaces, padded with spaces to 8 bytes), so that equal content gives equal bytes.
    The safetensors writer orders metadata by a per-process hash; tensor offsets are relative to
    the data section and stay valid."""
    header, start = parse_header(data)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return frame_header(text) + data[start:]


# -------------------------------------------------------------------------------------- loading


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_key(meta: Mapping[str, str], key: str, where: str) -> Any:
    try:
        return strict_json(meta[key])
    except StrictJSONError as e:
        raise PatchFormatError(
            f"{where}: metadata key '{key}' {e}; the file is corrupt, re-download or re-create it"
        ) from None


def load_patch(path: str | os.PathLike, *, verify_id: bool = True) -> Patch:
    """Read and strictly validate a patch file. Raises PatchFormatError naming what is wrong."""
    where = str(path)
    if not os.path.isfile(path):
        raise PatchFormatError(f"{where}: no such patch file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if MAX_METADATA_BYTES < n <= os.path.getsize(path) - 8:  # refused before the header is parsed
            raise PatchFormatError(
                f"{where}: safetensors header of {n} bytes is larger than the {MAX_METADATA_BYTES >> 20} MiB a "
                "patch may have; it is not a rompatch patch, or a corrupt one"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, PatchFormatError):
            raise
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PatchFormatError(
            f"{where}: not a readable safetensors file ({detail}); the file is truncated or not a patch, "
            "re-download or re-create it"
        ) from e
    return from_safetensors(meta, tensors, where=where, verify_id=verify_id)


def _check_map(meta: Any, where: str) -> Mapping[str, str]:
    """The metadata: a non-empty map of strings to strings (valid UTF-8), within the size limit."""
    if not meta:
        raise PatchFormatError(f"{where}: safetensors file has no metadata; it is not a rompatch patch")
    if not isinstance(meta, Mapping):
        raise PatchFormatError(f"{where}: metadata must map strings to strings; it is not a rompatch patch")
    total = 0
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PatchFormatError(
                f"{where}: metadata must map strings to strings, but {brief(k)} is {type(v).__name__}; the "
                "file is corrupt"
            )
        try:
            total += len(k.encode()) + len(v.encode())
        except UnicodeEncodeError:
            raise PatchFormatError(
                f"{where}: metadata key {brief(k)} holds an unpaired surrogate, which is not valid UTF-8; "
                "the file is corrupt"
            ) from None
    if total > MAX_METADATA_BYTES:
        raise PatchFormatError(
            f"{where}: metadata of {total} bytes is larger than the {MAX_METADATA_BYTES >> 20} MiB limit; it "
            "is not a rompatch patch, or a corrupt one"
        )
    return meta


def _check_version(meta: Mapping[str, str], where: str) -> str:
    """The file's format version, after checking that it is a rompatch patch this version reads."""
    if meta.get("format") != FORMAT_NAME:
        raise PatchFormatError(
            f"{where}: metadata 'format' is {brief(meta.get('format'))}, expected '{FORMAT_NAME}'; it is not "
            "a rompatch patch"
        )
    version = meta.get("format_version", "")
    m = _VERSION.fullmatch(version)
    if m is None:
        raise PatchFormatError(f"{where}: format_version {brief(version)} is not 'MAJOR.MINOR'")
    major, ours = int(m[1]), int(FORMAT_VERSION.split(".")[0])
    if major > ours:
        raise PatchVersionError(
            f"{where}: written in patch format {version}, newer than this rompatch reads ({FORMAT_VERSION}); "
            "upgrade rompatch (pip install -U rompatch)"
        )
    if major < 1:
        raise PatchFormatError(f"{where}: format_version {version!r} is not a released version")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise PatchFormatError(
            f"{where}: metadata is missing required key(s) {', '.join(missing)}; the file is corrupt"
        )
    if not _HEX64.fullmatch(meta["patch_id"]):
        raise PatchFormatError(
            f"{where}: metadata 'patch_id' must be 64 lowercase hex characters, got {brief(meta['patch_id'])}; "
            "the file is corrupt"
        )
    return version


def _sections(meta: Mapping[str, str], where: str) -> tuple[dict, dict, list, list]:
    """The JSON sections ``base``, ``parameters``, ``deltas`` and ``lineage``, each of its type."""
    base = _json_key(meta, "base", where)
    params_raw = _json_key(meta, "parameters", where)
    deltas_raw = _json_key(meta, "deltas", where)
    lineage = _json_key(meta, "lineage", where)
    if not isinstance(base, dict) or not isinstance(base.get("model"), str):
        raise PatchFormatError(f"{where}: metadata 'base' must be an object with a 'model' string")
    for k in ("revision", "model_type", "dtype"):
        if base.get(k) is not None and not isinstance(base[k], str):
            raise PatchFormatError(
                f"{where}: metadata 'base' field '{k}' must be a string or null, got {brief(base[k])}"
            )
    if not isinstance(params_raw, dict):
        raise PatchFormatError(f"{where}: metadata 'parameters' must be an object")
    if not isinstance(deltas_raw, list):
        raise PatchFormatError(f"{where}: metadata 'deltas' must be a list")
    if not isinstance(lineage, list) or not all(isinstance(x, str) and _HEX64.fullmatch(x) for x in lineage):
        raise PatchFormatError(
            f"{where}: metadata 'lineage' must be a list of patch ids (64 lowercase hex characters)"
        )
    return base, params_raw, deltas_raw, list(lineage)


def _parameters(params_raw: Mapping[str, Any], where: str) -> dict[str, ParamInfo]:
    parameters: dict[str, ParamInfo] = {}
    for name, p in params_raw.items():
        at = f"{where}: parameter {brief(name)}"
        if not isinstance(p, dict):
            raise PatchFormatError(f"{at} must be an object with shape, dtype, sha256 and layout")
        missing = [k for k in ("shape", "dtype", "sha256") if k not in p]
        if missing:
            raise PatchFormatError(f"{at} needs shape, dtype and sha256 (missing {', '.join(missing)})")
        shape, dtype, sha, layout = p["shape"], p["dtype"], p["sha256"], p.get("layout", "linear")
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(_is_int(s) and 1 <= s <= MAX_DIM for s in shape)
        ):
            raise PatchFormatError(
                f"{at} 'shape' must be two integers from 1 to {MAX_DIM}, got {brief(shape)}"
            )
        if dtype not in PARAM_DTYPES:
            raise PatchFormatError(
                f"{at} 'dtype' must be one of {', '.join(PARAM_DTYPES)}, got {brief(dtype)}"
            )
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise PatchFormatError(f"{at} 'sha256' must be 64 lowercase hex characters, got {brief(sha)}")
        if layout not in LAYOUTS:
            raise PatchFormatError(f"{at} has layout {brief(layout)}, expected one of {LAYOUTS}")
        parameters[name] = ParamInfo(shape=tuple(shape), dtype=dtype, sha256=sha, layout=layout)  # type: ignore[arg-type]
    return parameters


def _request(i: int, req: Any, where: str) -> EditRequest | None:
    at = f"{where}: delta {i} request"
    if req is None:
        return None
    if not isinstance(req, dict):
        raise PatchFormatError(f"{where}: delta {i} 'request' must be an object or null, got {brief(req)}")
    for k, v in req.items():
        if k not in REQUEST_FIELDS:
            raise PatchFormatError(f"{at} has unknown field {brief(k)}")
        if k in ("prompt", "subject", "target_new") and not isinstance(v, str):
            raise PatchFormatError(f"{at} {k!r} must be a string, got {brief(v)}")
        if k in ("target_true", "relation_id") and v is not None and not isinstance(v, str):
            raise PatchFormatError(f"{at} {k!r} must be a string or null, got {brief(v)}")
        if k == "case_id" and v is not None and not isinstance(v, str) and not _is_int(v):
            raise PatchFormatError(f"{at} 'case_id' must be a string or an integer, got {brief(v)}")
    missing = [k for k in ("prompt", "subject", "target_new") if k not in req]
    if missing:
        raise PatchFormatError(f"{at} lacks {', '.join(missing)}")
    try:
        return EditRequest(**req)
    except RequestError as e:
        raise PatchFormatError(f"{at} is invalid ({e})") from None


def _check_values(i: int, hparams: dict, metrics: dict, timings: dict, where: str) -> None:
    """The hyperparameters, metrics and timings rompatch reads have the types it reads them as."""
    at = f"{where}: delta {i}"
    for k in NUMBER_METRICS:
        if metrics.get(k) is not None and not _is_number(metrics[k]):
            raise PatchFormatError(f"{at} metric {k!r} must be a number or null, got {brief(metrics[k])}")
    for k in ("neighbours", "neighbours_released"):
        names = metrics.get(k)
        if names is not None and not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
            raise PatchFormatError(f"{at} metric {k!r} must be a list of names, got {brief(names)}")
    if "before_merge" in metrics and not isinstance(metrics["before_merge"], dict):
        raise PatchFormatError(f"{at} metric 'before_merge' must be an object")
    for k, v in timings.items():
        if not _is_number(v):
            raise PatchFormatError(f"{at} timing {brief(k)} must be a number of seconds, got {brief(v)}")
    templates = hparams.get("context_templates")
    if templates is not None and not (
        isinstance(templates, list) and all(isinstance(t, str) for t in templates)
    ):
        raise PatchFormatError(f"{at} hparam 'context_templates' must be a list of strings")
    kinds = {
        "key_prompt_weight": (_is_number, "a number"),
        "solve": (lambda x: isinstance(x, str), "a string"),
    }
    kinds |= {"opening": (lambda x: isinstance(x, bool), "true or false")}
    kinds |= {"svd_compressed": (lambda x: isinstance(x, dict), "an object")}
    for k, (ok, what) in kinds.items():
        if hparams.get(k) is not None and not ok(hparams[k]):
            raise PatchFormatError(f"{at} hparam {k!r} must be {what} or null, got {brief(hparams[k])}")


def _delta(i: int, d: Any, tensors: Mapping[str, torch.Tensor], where: str) -> RankOneDelta:
    """Delta ``i`` from its metadata and its float32 vectors."""
    at = f"{where}: delta {i}"
    if not isinstance(d, dict):
        raise PatchFormatError(f"{at} must be an object with layer and parameter, got {brief(d)}")
    layer, parameter, kind = d.get("layer"), d.get("parameter"), d.get("kind", "rome")
    if not _is_int(layer) or not 0 <= layer < MAX_LAYER:
        raise PatchFormatError(
            f"{at} 'layer' must be an integer from 0 to {MAX_LAYER - 1}, got {brief(layer)}"
        )
    if not isinstance(parameter, str):
        raise PatchFormatError(f"{at} 'parameter' must be a string, got {brief(parameter)}")
    if not isinstance(kind, str) or not kind:
        raise PatchFormatError(f"{at} 'kind' must be a non-empty string, got {brief(kind)}")
    sections = {}
    for k in ("hparams", "stats", "metrics", "timings"):
        sections[k] = d.get(k, {})
        if not isinstance(sections[k], dict):
            raise PatchFormatError(f"{at} '{k}' must be an object, got {brief(sections[k])}")
    if "key" in d and d["key"] is not True:
        raise PatchFormatError(f"{at} 'key' must be true when present, got {brief(d['key'])}")
    _check_values(i, sections["hparams"], sections["metrics"], sections["timings"], where)
    for x in ("u", "v", "k") if f"deltas.{i}.k" in tensors else ("u", "v"):
        t = tensors[f"deltas.{i}.{x}"]
        if t.dtype != torch.float32:
            raise PatchFormatError(
                f"{where}: tensor deltas.{i}.{x} is {t.dtype}, the format requires float32"
            )
        if t.ndim != 1:
            raise PatchFormatError(
                f"{where}: tensor deltas.{i}.{x} has shape {tuple(t.shape)}, expected a vector"
            )
    return RankOneDelta(
        u=tensors[f"deltas.{i}.u"],
        v=tensors[f"deltas.{i}.v"],
        layer=layer,
        parameter=parameter,
        request=_request(i, d.get("request"), where),
        kind=kind,
        hparams=sections["hparams"],
        stats=sections["stats"],
        metrics=sections["metrics"],
        timings=sections["timings"],
        key=tensors.get(f"deltas.{i}.k"),
    )


def _deltas(deltas_raw: list, tensors: Mapping[str, torch.Tensor], where: str) -> list[RankOneDelta]:
    expected = {f"deltas.{i}.{x}" for i in range(len(deltas_raw)) for x in ("u", "v")}
    for i, d in enumerate(deltas_raw):
        if isinstance(d, dict) and d.get("key") is True:  # format 1.2: the delta stores its key
            expected.add(f"deltas.{i}.k")
    if set(tensors) != expected:
        extra = sorted(set(tensors) - expected)
        lacking = sorted(expected - set(tensors))
        raise PatchFormatError(
            f"{where}: tensors do not match the {len(deltas_raw)} deltas in the metadata "
            f"(missing: {brief(lacking or 'none', 200)}, unexpected: {brief(extra or 'none', 200)})"
        )
    return [_delta(i, d, tensors, where) for i, d in enumerate(deltas_raw)]


def components(value: Any, n_deltas: int, what: str, where: str) -> list[tuple[str, range]]:
    """``[(patch id, range of delta indices)]`` from a parsed ``stacked_from`` (a list of ``{"id",
    "deltas": [start, stop]}``) or ``merged_from["inputs"]``; a PatchFormatError naming ``what``
    (e.g. "metadata 'stacked_from'") when it is malformed."""
    at = f"{where}: {what}"
    if not isinstance(value, list) or not all(
        isinstance(c, dict) and "id" in c and "deltas" in c for c in value
    ):
        raise PatchFormatError(f"{at} must be a list of {{id, deltas}} entries; the file is corrupt")
    out = []
    for c in value:
        cid, rng = c["id"], c["deltas"]
        if not isinstance(cid, str) or not _HEX64.fullmatch(cid):
            raise PatchFormatError(f"{at} must hold ids of 64 lowercase hex characters, got {brief(cid)}")
        if not (isinstance(rng, list) and len(rng) == 2 and all(_is_int(x) for x in rng)) or not (
            0 <= rng[0] <= rng[1] <= n_deltas
        ):
            raise PatchFormatError(
                f"{at} has delta range {brief(rng)} that is not [start, stop] within its {n_deltas} deltas"
            )
        out.append((cid, range(rng[0], rng[1])))
    return out


def _check_provenance(key: str, value: Any, n_deltas: int, where: str) -> None:
    if key == STACKED_FROM:
        components(value, n_deltas, f"metadata '{key}'", where)
    elif key == MERGED_FROM:
        if not isinstance(value, dict) or not isinstance(value.get("condition", {}), dict):
            raise PatchFormatError(
                f"{where}: metadata '{key}' must be an object {{inputs: [{{id, deltas}}], condition: {{parameter: "
                "number}}; the file is corrupt"
            )
        components(value.get("inputs"), n_deltas, f"metadata '{key}' inputs", where)
        if not all(_is_number(c) for c in value.get("condition", {}).values()):
            raise PatchFormatError(f"{where}: metadata '{key}' condition numbers must be numbers")
    elif not isinstance(value, dict):
        raise PatchFormatError(f"{where}: metadata '{key}' must be a JSON object; the file is corrupt")


def _extra(meta: Mapping[str, str], n_deltas: int, where: str) -> tuple[dict[str, str], list[str]]:
    """The metadata kept beyond the required keys (provenance, annotations, "x-" keys), each checked,
    and the keys dropped as not part of the format."""
    extra: dict[str, str] = {}
    dropped = []
    for k, v in meta.items():
        if k in REQUIRED_KEYS or k == "created_at":
            continue
        if k in PROVENANCE_KEYS:
            _check_provenance(k, _json_key(meta, k, where), n_deltas, where)
            extra[k] = v
        elif k == AUDIT:
            try:
                report = strict_json(v)
                if not isinstance(report, dict):
                    raise StrictJSONError("is not a JSON object")
                extra[k] = v
            except StrictJSONError as e:  # an annotation outside the id: dropped, not fatal
                log.warning(
                    "%s: attached audit dropped (it %s); attach it again with rompatch audit --attach",
                    where,
                    e,
                )
        elif k in ANNOTATION_KEYS or k.startswith(ANNOTATION_PREFIX):
            extra[k] = v
        else:
            dropped.append(k)
    if dropped:
        log.debug("%s: metadata key(s) %s are not part of the format; dropped", where, brief(dropped, 200))
    return extra, dropped


def from_safetensors(
    meta: Mapping[str, str] | None,
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str = "patch",
    verify_id: bool = True,
) -> Patch:
    """A ``Patch`` from a file's metadata and tensors, validated (docs/patch-format.md, "Validation"):
    the metadata map and its size, the format and version, every section and every field read,
    the tensors against the deltas, and (``verify_id``) the content hash."""
    meta = _check_map(meta, where)
    version = _check_version(meta, where)
    base, params_raw, deltas_raw, lineage = _sections(meta, where)
    parameters = _parameters(params_raw, where)
    deltas = _deltas(deltas_raw, tensors, where)
    extra, dropped = _extra(meta, len(deltas), where)
    created_at, rompatch_version = meta.get("created_at"), meta["rompatch_version"]
    patch = Patch(
        deltas=deltas,
        base=base,
        parameters=parameters,
        lineage=lineage,
        created_at=created_at,
        rompatch_version=rompatch_version,
        extra=extra,
        format_version=version,
    )
    _validate(patch, where=where)
    if verify_id and patch.id != meta["patch_id"]:
        unknown = dropped + sorted({k for d in deltas_raw for k in d if k not in DELTA_FIELDS})
        if unknown and _version_tuple(version) > _version_tuple(FORMAT_VERSION):
            raise PatchFormatError(
                f"{where}: written in patch format {version} with metadata this rompatch does not know "
                f"({brief(unknown, 120)}) inside its id; upgrade rompatch (pip install -U rompatch)"
            )
        raise PatchFormatError(
            f"{where}: content hash {patch.short_id} does not match the recorded patch_id {meta['patch_id'][:12]}; "
            "the file was modified after it was written"
        )
    return patch


def _validate(patch: Patch, *, where: str = "patch") -> None:
    if not patch.deltas:
        raise PatchFormatError(f"{where}: a patch needs at least one delta")
    for name, p in patch.parameters.items():
        if len(p.shape) != 2 or min(p.shape) <= 0:
            raise PatchFormatError(
                f"{where}: parameter {brief(name)} has shape {list(p.shape)}, expected a 2-D matrix"
            )
        if p.layout not in LAYOUTS:
            raise PatchFormatError(
                f"{where}: parameter {brief(name)} has layout {p.layout!r}, expected one of {LAYOUTS}"
            )
        if len(p.sha256) != 64:
            raise PatchFormatError(f"{where}: parameter {brief(name)} sha256 must be 64 hex characters")
    for i, d in enumerate(patch.deltas):
        if d.parameter not in patch.parameters:
            raise PatchFormatError(
                f"{where}: delta {i} edits {brief(d.parameter)}, which is not listed under 'parameters'"
            )
        p = patch.parameters[d.parameter]
        if d.u.numel() != p.in_features or d.v.numel() != p.out_features:
            raise PatchFormatError(
                f"{where}: delta {i} has u of size {d.u.numel()} and v of size {d.v.numel()}, but "
                f"{brief(d.parameter)} {list(p.shape)} ({p.layout}) needs u={p.in_features} and v={p.out_features}"
            )
        if d.key is not None and d.key.numel() != p.in_features:
            raise PatchFormatError(
                f"{where}: delta {i} has a key of size {d.key.numel()}, but {brief(d.parameter)} needs "
                f"{p.in_features}"
            )
        for x in ("u", "v", "key"):
            t = getattr(d, x)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise PatchFormatError(
                    f"{where}: delta {i} tensor {x} holds NaN or Inf values; the edit diverged"
                )
        if not _is_int(d.layer) or not 0 <= d.layer < MAX_LAYER:
            raise PatchFormatError(f"{where}: delta {i} has invalid layer {brief(d.layer)}")
    for k, v in patch.extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PatchFormatError(f"{where}: metadata {brief(k)} must be a string key with a string value")
        known = k in PROVENANCE_KEYS or k in ANNOTATION_KEYS or k.startswith(ANNOTATION_PREFIX)
        if not known:
            raise PatchFormatError(
                f"{where}: metadata key {brief(k)} is not part of the format; put annotations of your own under "
                f"a key starting with '{ANNOTATION_PREFIX}'"
            )
        if k in PROVENANCE_KEYS:
            _check_provenance(k, extra_json(patch.extra, k, where), len(patch.deltas), where)


def new_patch(
    deltas: Sequence[RankOneDelta],
    *,
    base: Mapping[str, Any],
    parameters: Mapping[str, ParamInfo],
    lineage: Sequence[str] = (),
) -> Patch:
    """Build and validate a patch (created_at is filled in at save time)."""
    p = Patch(deltas=list(deltas), base=dict(base), parameters=dict(parameters), lineage=list(lineage))
    _validate(p)
    return p
