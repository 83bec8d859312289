"""Reading checkpoints: a safetensors model folder (local, embedded or fetched from the Hub), by byte range.

A checkpoint is a Hugging Face model folder whose weights are ``model.safetensors`` or shards listed
in ``model.safetensors.index.json`` (or a Hub id, fetched with ``huggingface_hub``). rompatch never
loads the model: it parses each safetensors header (8-byte length + JSON), then reads only the byte
ranges of the tensors it needs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..constants import CHECKPOINT_UNDO, SAFE_INDEX, SAFE_WEIGHTS
from ..errors import CheckpointError, HubError
from ..hub.transfer import snapshot
from ..models import SOURCE_FILE, local_model_path
from ..safetensors_io import TensorEntry, read_header, read_range, sha256_bytes, sha256_range, to_tensor
from .record import Record, read_record, undo_key

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
log = logging.getLogger(__name__)

HUB_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*", "*.py"]


class Checkpoint:
    """A safetensors model folder opened for reading: its tensors' locations, config and record."""

    def __init__(self, path: str | os.PathLike, *, source: Mapping[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint folder")
        self.source: dict[str, Any] = dict(source or {"model": str(path), "revision": None})
        self.index: dict[str, Any] | None = None
        weight_map = self._weight_map()
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, dict | None] = {}
        for rel in self.files:
            self._read_shard(rel)
        if weight_map is not None:
            self._check_index(weight_map)
        self.config: dict[str, Any] = self._read_config()
        self._record: Record | None | bool = False  # False: not read yet

    def _weight_map(self) -> dict[str, str] | None:
        """Sets ``files`` (and ``index``); the index's weight map, None for a single-file checkpoint."""
        index_path = self.path / SAFE_INDEX
        if index_path.is_file():
            try:
                self.index = json.loads(index_path.read_text())
                weight_map = dict(self.index["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index_path}: not a valid safetensors index ({e}); re-download or re-save the checkpoint"
                ) from None
            for rel in set(weight_map.values()):
                self._check_shard_name(rel)
            self.files = sorted(set(weight_map.values()))
            return weight_map
        if (self.path / SAFE_WEIGHTS).is_file():
            self.files = [SAFE_WEIGHTS]
            return None
        refuse_pickle_only(self.path)
        raise CheckpointError(
            f"{self.path}: no {SAFE_WEIGHTS} or {SAFE_INDEX}; pass a Hugging Face model folder saved with "
            "safetensors (save_pretrained)"
        )

    def _check_shard_name(self, rel: Any) -> None:
        """A shard the index lists is a relative path that stays inside the folder, symlinks resolved:
        a crafted index must not make rompatch read, copy or replace a file anywhere else. A snapshot
        in the Hugging Face cache (``models--*/snapshots/REV``) links its files to the repository's
        ``blobs/``: there the repository's cache folder is the limit."""
        if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
            raise CheckpointError(
                f"{self.path}: {SAFE_INDEX} lists a shard that is not a file name ({rel!r}); re-download or "
                "re-save the checkpoint"
            )
        p = Path(rel)
        root = link_root(self.path)
        inside = (
            not p.is_absolute() and ".." not in p.parts and (self.path / p).resolve().is_relative_to(root)
        )
        if not inside:
            raise CheckpointError(
                f"{self.path}: {SAFE_INDEX} lists shard {rel!r}, outside the checkpoint folder; refusing to read "
                "it (a crafted or broken index): re-download or re-save the checkpoint"
            )

    def _read_shard(self, rel: str) -> None:
        f = self.path / rel
        if not f.is_file():
            raise CheckpointError(
                f"{self.path}: shard {rel} listed in {SAFE_INDEX} is missing; the download is incomplete"
            )
        entries, meta = read_header(f, rel=rel)
        self.metadata[rel] = meta
        for e in entries:
            self.entries[e.key] = e

    def _check_index(self, weight_map: Mapping[str, str]) -> None:
        for key, rel in weight_map.items():
            e = self.entries.get(key)
            if e is None or e.file != rel:
                raise CheckpointError(
                    f"{self.path}: {SAFE_INDEX} puts '{key}' in {rel}, but that shard does not hold it; "
                    "the index and shards do not match, re-save the checkpoint"
                )

    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            return {}
        try:
            return json.loads(cfg.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.files)} file(s), {len(self.entries)} tensors)"

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    # ---- tensors

    def key_for(self, param: str) -> str:
        """The safetensors key of model parameter ``param`` (exact, or without the base-model prefix,
        as in checkpoints saved from the bare model: ``h.0.mlp.c_proj.weight``)."""
        if param in self.entries:
            return param
        head, _, rest = param.partition(".")
        if rest and rest in self.entries:
            return rest
        raise CheckpointError(
            f"{self.path}: no tensor '{param}' in this checkpoint; the patch is for another architecture or "
            "model"
        )

    def entry(self, param: str) -> TensorEntry:
        return self.entries[self.key_for(param)]

    def read_raw(self, param: str) -> bytearray:
        e = self.entry(param)
        return read_range(self.path / e.file, e.offset, e.nbytes)

    def read(self, param: str) -> torch.Tensor:
        """One tensor, read from its byte range only."""
        e = self.entry(param)
        return to_tensor(read_range(self.path / e.file, e.offset, e.nbytes), e)

    def sha256(self, param: str) -> str:
        e = self.entry(param)
        return sha256_range(self.path / e.file, e.offset, e.nbytes)

    # ---- the record

    @property
    def record(self) -> Record | None:
        """The rompatch record, or None for a checkpoint rompatch did not write (or fully reverted)."""
        if self._record is False:
            self._record = read_record(self.path)
        return self._record  # type: ignore[return-value]

    def undo_tensor(self, name: str) -> bytearray:
        entries = self._undo_entries()
        e = entries[name]
        return read_range(self.path / CHECKPOINT_UNDO, e.offset, e.nbytes)

    def _undo_entries(self) -> dict[str, TensorEntry]:
        if not hasattr(self, "_undo"):
            entries, _ = read_header(self.path / CHECKPOINT_UNDO)
            self._undo = {e.key: e for e in entries}
        return self._undo

    def original(self, param: str) -> torch.Tensor:
        """``param`` as it was before any rompatch patch: from the undo data if tracked, else on disk."""
        rec = self.record
        if rec is not None and param in rec.tensors:
            e = self._undo_entries()[undo_key(param)]
            raw = self.undo_tensor(undo_key(param))
            if sha256_bytes(raw) != rec.tensors[param].sha256_base:
                raise CheckpointError(
                    f"{self.path / CHECKPOINT_UNDO}: the saved original of '{param}' does not match its recorded "
                    "sha256; the undo data is corrupt"
                )
            return to_tensor(raw, e)
        return self.read(param)

    def verify_record(self) -> list[str]:
        """Tracked tensors whose bytes no longer match the record (changed after rompatch wrote them)."""
        rec = self.record
        if rec is None:
            return []
        return [name for name, t in rec.tensors.items() if self.sha256(name) != t.sha256]


def link_root(folder: Path) -> Path:
    """Where symbolic links in checkpoint ``folder`` may point: inside the folder itself, or, for a
    snapshot in the Hugging Face cache (``models--*/snapshots/REV``, whose files link to the
    repository's ``blobs/``), inside the repository's cache folder. Resolved."""
    snapshots = folder.parent
    hf_cache = snapshots.name == "snapshots" and snapshots.parent.name.startswith(("models--", "datasets--"))
    return (snapshots.parent if hf_cache else folder).resolve()


def folder_files(root: Path) -> list[str]:
    """The files of checkpoint folder ``root`` (relative paths, sorted; hidden files and folders such
    as .git or .cache skipped), every symbolic link checked first: a link out of the folder
    (``link_root``), a broken link and a link to a folder containing it are refused with a
    ``CheckpointError``; links inside are followed, so their targets are carried as files."""
    limit = link_root(root)
    out: list[str] = []

    def visit(rel_dir: str, ancestors: tuple[Path, ...]) -> None:
        with os.scandir(root / rel_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = os.path.join(rel_dir, e.name) if rel_dir else e.name
            real = Path(e.path).resolve()
            if e.is_symlink():
                if not real.exists():
                    raise CheckpointError(
                        f"{e.path} is a broken symbolic link (to {os.readlink(e.path)}); remove it or restore its "
                        "target, then run again"
                    )
                if not real.is_relative_to(limit):
                    raise CheckpointError(
                        f"{e.path} is a symbolic link to {real}, outside the checkpoint folder; rompatch does not "
                        "follow links out of a checkpoint: copy the file into the folder or remove the link"
                    )
                if real.is_dir() and any(a == real or a.is_relative_to(real) for a in ancestors):
                    raise CheckpointError(
                        f"{e.path} is a symbolic link to a folder that contains it ({real}); remove the link"
                    )
            if real.is_dir():
                visit(rel, (*ancestors, real))
            elif real.is_file():
                out.append(rel)
            else:
                log.warning("skipping %s: not a regular file or folder", e.path)

    visit("", (root.resolve(),))
    return out


def refuse_pickle_only(path: Path) -> None:
    """A folder whose weights are pickle files only (no safetensors) is refused, with the one-line
    conversion to do once: rompatch never unpickles."""
    if any(path.glob("*.safetensors")) or (path / SAFE_INDEX).is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path} holds pickle weights ({', '.join(pickles[:3])}) and no safetensors; rompatch never unpickles. "
            'Convert once: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" (transformers writes "
            "safetensors by default), then pass that folder"
        )


def open_checkpoint(ref: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Open a local safetensors model folder, an embedded model, or fetch a Hub model first.

    ``ref`` is resolved as ``load_model`` resolves it (``rompatch.models.local_model_path``): an
    embedded alias is its converted folder (fetched and converted on first use), a missing local
    path is a ``NoSuchFolderError`` before any Hub call. Hub ids go through
    ``huggingface_hub.snapshot_download`` (so ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``
    apply): first the small files, then only the shards the index lists.
    """
    p = local_model_path(ref)
    if p is None:
        folder, commit = _hub_snapshot(str(ref), revision)
        return Checkpoint(folder, source={"model": str(ref), "revision": commit})
    if not p.is_dir():
        raise CheckpointError(f"{ref} is a file; pass the model folder that holds it (with config.json)")
    if revision is not None:
        raise CheckpointError(
            f"{ref} is a local folder or an embedded model; --revision only applies to Hub ids"
        )
    return Checkpoint(p, source=_local_identity(p))


def _local_identity(path: Path) -> dict[str, Any]:
    src = path / SOURCE_FILE
    if src.is_file():  # an embedded model's converted folder: same identity as load_model gives it
        try:
            info = json.loads(src.read_text())
            return {
                "model": info.get("alias", str(path)),
                "revision": f"gguf-sha256:{info.get('gguf_sha256', '')}",
            }
        except ValueError:
            pass
    return {"model": str(path.resolve()), "revision": None}


def _hub_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """A Hub model's small files, then only the weight files its index lists (through the Hub's one
    error mapping); returns the snapshot folder and its commit."""

    def fetch(patterns: list[str], rev: str | None) -> Path:
        return snapshot(repo_id, patterns, revision=rev, action=f"fetch the checkpoint {repo_id}")

    folder = fetch(HUB_FILE_PATTERNS, revision)
    commit = folder.name if len(folder.name) == 40 else revision
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{repo_id}: {SAFE_INDEX} is not a valid index ({e})") from None
    else:
        shards = [SAFE_WEIGHTS]
    folder = fetch(shards, commit)
    if not all((folder / s).is_file() for s in shards):
        if (folder / "pytorch_model.bin.index.json").is_file() or not index.is_file():
            raise CheckpointError(
                f"Hub repo {repo_id} has no safetensors weights (pickle .bin only?); rompatch never unpickles. "
                'Convert once: python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{repo_id}').save_pretrained('local-copy')\", then pass local-copy"
            )
        raise HubError(
            f"{repo_id}: some shards listed in {SAFE_INDEX} could not be fetched; retry", repo_id=repo_id
        )
    return folder, commit
