"""Patch format v1: rank-one deltas plus provenance in one safetensors file.

The spec is docs/patch-format.md; this module is its implementation. ``save_patch`` and
``load_patch`` mirror each other, and ``load_patch`` refuses anything the spec does not allow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
from .constants import AUDIT, FORMAT_NAME, FORMAT_VERSION, MERGED_FROM
from .errors import PatchFormatError, PatchVersionError
from .fingerprint import dtype_name, tensor_sha256
from .hub.mixin import HubMixin
from .request import EditRequest
from .safetensors_io import frame_header, parse_header

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
    extra: dict[str, str] = field(default_factory=dict)  # unknown metadata keys, kept on round-trip
    format_version: str = FORMAT_VERSION  # a loaded file keeps its own, so re-saving keeps its bytes

    @property
    def id(self) -> str:
        """Content hash: sha256 over the canonical metadata and the tensors' bytes (timestamps excluded)."""
        return content_hash(self)

    @property
    def short_id(self) -> str:
        return self.id[:12]

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
        try:
            return None if not raw else json.loads(raw)
        except ValueError as e:
            raise PatchFormatError(
                f"patch {self.short_id}: metadata '{MERGED_FROM}' is not JSON ({e})"
            ) from None

    def audit(self) -> dict[str, Any] | None:
        """The audit report attached by ``rompatch audit --attach`` (``rompatch.audit.saved_audit``
        reads it as an ``AuditReport``); None when the file carries none."""
        raw = self.extra.get(AUDIT)
        try:
            return None if not raw else json.loads(raw)
        except ValueError as e:
            raise PatchFormatError(f"patch {self.short_id}: metadata '{AUDIT}' is not JSON ({e})") from None

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
    if not audit:
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


def content_hash(patch: Patch) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT_NAME}/{FORMAT_VERSION.split('.')[0]}\n".encode())
    h.update(_canonical(patch.base).encode())
    h.update(_canonical({k: v.to_json() for k, v in sorted(patch.parameters.items())}).encode())
    h.update(_canonical([d.meta(hashed=True) for d in patch.deltas]).encode())
    h.update(_canonical(list(patch.lineage)).encode())
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


def _json_key(meta: Mapping[str, str], key: str, where: str) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise PatchFormatError(
            f"{where}: metadata key '{key}' is not valid JSON ({e.msg}); the file is corrupt"
        ) from e


def load_patch(path: str | os.PathLike, *, verify_id: bool = True) -> Patch:
    """Read and strictly validate a patch file. Raises PatchFormatError naming what is wrong."""
    where = str(path)
    if not os.path.isfile(path):
        raise PatchFormatError(f"{where}: no such patch file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PatchFormatError(
            f"{where}: not a readable safetensors file ({detail}); the file is truncated or not a patch, "
            "re-download or re-create it"
        ) from e
    return from_safetensors(meta, tensors, where=where, verify_id=verify_id)


def _check_version(meta: Mapping[str, str] | None, where: str) -> str:
    """The file's format version, after checking that it is a rompatch patch this version reads."""
    if not meta:
        raise PatchFormatError(f"{where}: safetensors file has no metadata; it is not a rompatch patch")
    if meta.get("format") != FORMAT_NAME:
        raise PatchFormatError(
            f"{where}: metadata 'format' is {meta.get('format')!r}, expected '{FORMAT_NAME}'; it is not a rompatch patch"
        )
    version = meta.get("format_version", "")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise PatchFormatError(f"{where}: format_version {version!r} is not 'MAJOR.MINOR'") from None
    ours = int(FORMAT_VERSION.split(".")[0])
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
    return version


def _sections(meta: Mapping[str, str], where: str) -> tuple[dict, dict, list, list]:
    """The JSON sections ``base``, ``parameters``, ``deltas`` and ``lineage``, each of its type."""
    base = _json_key(meta, "base", where)
    params_raw = _json_key(meta, "parameters", where)
    deltas_raw = _json_key(meta, "deltas", where)
    lineage = _json_key(meta, "lineage", where)
    if not isinstance(base, dict) or not isinstance(base.get("model"), str):
        raise PatchFormatError(f"{where}: metadata 'base' must be an object with a 'model' string")
    if not isinstance(params_raw, dict):
        raise PatchFormatError(f"{where}: metadata 'parameters' must be an object")
    if not isinstance(deltas_raw, list):
        raise PatchFormatError(f"{where}: metadata 'deltas' must be a list")
    if not isinstance(lineage, list) or not all(isinstance(x, str) for x in lineage):
        raise PatchFormatError(f"{where}: metadata 'lineage' must be a list of patch ids")
    return base, params_raw, deltas_raw, list(lineage)


def _parameters(params_raw: Mapping[str, Any], where: str) -> dict[str, ParamInfo]:
    parameters: dict[str, ParamInfo] = {}
    for name, p in params_raw.items():
        try:
            shape = tuple(int(s) for s in p["shape"])
            parameters[name] = ParamInfo(
                shape=shape, dtype=str(p["dtype"]), sha256=str(p["sha256"]), layout=p.get("layout", "linear")
            )  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise PatchFormatError(
                f"{where}: parameter '{name}' needs shape, dtype and sha256 ({e})"
            ) from None
    return parameters


def _delta(i: int, d: Any, tensors: Mapping[str, torch.Tensor], where: str) -> RankOneDelta:
    """Delta ``i`` from its metadata and its two float32 vectors."""
    try:
        req = d.get("request")
        delta = RankOneDelta(
            u=tensors[f"deltas.{i}.u"],
            v=tensors[f"deltas.{i}.v"],
            layer=int(d["layer"]),
            parameter=str(d["parameter"]),
            request=None if req is None else EditRequest(**req),
            kind=str(d.get("kind", "rome")),
            hparams=dict(d.get("hparams", {})),
            stats=dict(d.get("stats", {})),
            metrics=dict(d.get("metrics", {})),
            timings=dict(d.get("timings", {})),
            key=tensors.get(f"deltas.{i}.k"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PatchFormatError(
            f"{where}: delta {i} metadata is malformed ({e}); needs layer and parameter"
        ) from None
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
    return delta


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
            f"(missing: {lacking or 'none'}, unexpected: {extra or 'none'})"
        )
    return [_delta(i, d, tensors, where) for i, d in enumerate(deltas_raw)]


def from_safetensors(
    meta: Mapping[str, str] | None,
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str = "patch",
    verify_id: bool = True,
) -> Patch:
    """A ``Patch`` from a file's metadata and tensors, validated (docs/patch-format.md): the format
    and version, every section, the tensors against the deltas, and (``verify_id``) the content hash."""
    version = _check_version(meta, where)
    assert meta is not None
    base, params_raw, deltas_raw, lineage = _sections(meta, where)
    parameters = _parameters(params_raw, where)
    deltas = _deltas(deltas_raw, tensors, where)
    extra = {k: v for k, v in meta.items() if k not in REQUIRED_KEYS and k != "created_at"}
    patch = Patch(
        deltas=deltas,
        base=base,
        parameters=parameters,
        lineage=lineage,
        created_at=meta.get("created_at"),
        rompatch_version=meta["rompatch_version"],
        extra=extra,
        format_version=version,
    )
    _validate(patch, where=where)
    if verify_id and patch.id != meta["patch_id"]:
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
                f"{where}: parameter '{name}' has shape {list(p.shape)}, expected a 2-D matrix"
            )
        if p.layout not in LAYOUTS:
            raise PatchFormatError(
                f"{where}: parameter '{name}' has layout {p.layout!r}, expected one of {LAYOUTS}"
            )
        if len(p.sha256) != 64:
            raise PatchFormatError(f"{where}: parameter '{name}' sha256 must be 64 hex characters")
    for i, d in enumerate(patch.deltas):
        if d.parameter not in patch.parameters:
            raise PatchFormatError(
                f"{where}: delta {i} edits '{d.parameter}', which is not listed under 'parameters'"
            )
        p = patch.parameters[d.parameter]
        if d.u.numel() != p.in_features or d.v.numel() != p.out_features:
            raise PatchFormatError(
                f"{where}: delta {i} has u of size {d.u.numel()} and v of size {d.v.numel()}, but '{d.parameter}' "
                f"{list(p.shape)} ({p.layout}) needs u={p.in_features} and v={p.out_features}"
            )
        if d.key is not None and d.key.numel() != p.in_features:
            raise PatchFormatError(
                f"{where}: delta {i} has a key of size {d.key.numel()}, but '{d.parameter}' needs {p.in_features}"
            )
        for x in ("u", "v", "key"):
            t = getattr(d, x)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise PatchFormatError(
                    f"{where}: delta {i} tensor {x} holds NaN or Inf values; the edit diverged"
                )
        if not math.isfinite(float(d.layer)) or d.layer < 0:
            raise PatchFormatError(f"{where}: delta {i} has invalid layer {d.layer}")


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
