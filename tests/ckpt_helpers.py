"""Test helpers: multi-shard checkpoint folders from tiny models, and fingerprints of folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from rompatch.constants import SAFE_INDEX, SAFE_WEIGHTS
from rompatch.fingerprint import tensor_sha256


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
