"""Helpers of the Hub tests: one-line errors, fresh caches, what a cache holds, a non-patch file."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers.hubserver import list_files


class NoSleep:
    """``time`` without the waiting: huggingface_hub retries an unreachable Hub with 1+2+4+8+8 s of
    backoff per request, which is right for users and only slow for tests."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def one_line_error(e: BaseException, *secrets: str) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    for s in secrets:
        assert s not in msg
    return msg


def fresh_cache(hub_env, name: str) -> Path:
    """Point huggingface_hub at a new, empty cache folder (as a fresh machine would have)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager

    new = hub_env.hf_home / name
    new.mkdir()
    mp = hub_env.monkeypatch
    for attr in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        mp.setattr(constants, attr, str(new))
    mp.setattr(_cache_manager, "HF_HUB_CACHE", str(new))
    mp.setenv("HF_HUB_CACHE", str(new))
    return new


def cache_leftovers(cache: Path) -> list[str]:
    """Files in the HF cache other than lock files (which huggingface_hub keeps by design)."""
    return [f for f in list_files(cache) if not f.startswith(".locks")] if cache.exists() else []


def plain_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(2)}, metadata={"format": "pt"})
