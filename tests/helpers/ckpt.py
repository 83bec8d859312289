"""Test helpers: multi-shard checkpoint folders from tiny models, fingerprints of folders, patch variants."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from rompatch.constants import SAFE_INDEX, SAFE_WEIGHTS
from rompatch.fingerprint import tensor_sha256
from rompatch.patch import RankOneDelta, new_patch
from rompatch.request import EditRequest
from tests.helpers.tiny import make_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def save_sharded(model, folder, *, max_shard_size: str = "60KB", tokenizer=None) -> Path:
    """``save_pretrained`` with small shards (several files even for tiny models)."""
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def weight_files(folder) -> list[Path]:
    folder = Path(folder)
    index = folder / SAFE_INDEX
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / SAFE_WEIGHTS]


def tensor_shas(folder) -> dict[str, str]:
    """sha256 of every tensor of a checkpoint folder, by key."""
    out = {}
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = tensor_sha256(st.get_tensor(k))
    return out


def read_tensor(folder, key: str) -> torch.Tensor:
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as st:
            if key in st.keys():
                return st.get_tensor(key)
    raise KeyError(key)


def file_shas(folder) -> dict[str, str]:
    """sha256 of every file under a folder (relative path -> digest), to prove it was not modified."""
    folder = Path(folder)
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_ckpt(tmp_path: Path, arch="llama", dtype=torch.float32, name="base", seed=0):
    """A tiny model and its checkpoint folder ``tmp_path / name``, in several shards."""
    model = make_model(arch, dtype=dtype, seed=seed)
    folder = save_sharded(model, tmp_path / name)
    assert len(weight_files(folder)) >= 3, "tests need multi-shard checkpoints"
    return model, folder


def leftovers(parent: Path) -> list[str]:
    """Staging folders left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".rompatch-tmp." in p.name)


def mem_shas(model) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def with_request(patch, i, **changes):
    """``patch`` with delta ``i``'s request changed."""
    d = patch.deltas[i]
    req = EditRequest(**{**d.request.to_dict(), **changes})
    deltas = list(patch.deltas)
    deltas[i] = RankOneDelta(d.u, d.v, d.layer, d.parameter, request=req, kind=d.kind)
    return new_patch(deltas, base=patch.base, parameters=patch.parameters, lineage=patch.lineage)
