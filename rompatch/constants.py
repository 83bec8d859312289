"""File names, environment variables and defaults, in one place."""

from __future__ import annotations

import os
from pathlib import Path

FORMAT_NAME = "rompatch"
# Metadata key of a merged patch (rompatch.merge): its inputs and each matrix's condition number.
MERGED_FROM = "merged_from"
AUDIT = "audit"  # metadata key of an attached audit report (outside the content hash)
# Metadata key of a signature over the patch id (rompatch.signing; outside the content hash).
SIGNATURE = "signature"
FORMAT_VERSION = "1.3"  # major.minor; a newer major is refused by load_patch; 1.1 added per-delta timings,
# 1.2 optional per-delta keys (deltas.{i}.k), 1.3 provenance (stacked_from, merged_from, extracted_from) in the id

ENV_CACHE = "ROMPATCH_CACHE"
ENV_DATA = "ROMPATCH_DATA"

DEFAULT_MODEL = "smollm2-135m"

# Where rompatch's source lives. rompatch is not released on a package index: install it from
# this repository (pip install "rompatch @ git+URL") or from a checkout (pip install -e .).
# A placeholder until the repository is published under its final address.
PROJECT_URL = "https://github.com/OWNER/rompatch"

# On-disk checkpoint bookkeeping written by `rompatch apply`.
CHECKPOINT_RECORD = "rompatch.json"
# Undo data (safetensors format). Deliberately NOT named *.safetensors: loaders such as vLLM glob
# "*.safetensors" in a folder without an index and would try to load it as model weights.
CHECKPOINT_UNDO = "rompatch-undo.st"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# Statistics budgets: tokens of a corpus, and of text sampled from the model (see bench/RESULTS.md).
DEFAULT_STATS_TOKENS = 100_000
DEFAULT_SAMPLED_TOKENS = 16_384  # two batches of 64 sequences of 128 tokens: see bench/RESULTS.md

# Causal tracing's defaults (rompatch.tracing.trace).
TRACE_KINDS = ("hidden", "mlp", "attn")
TRACE_SAMPLES = 10
TRACE_NOISE = 3.0  # multiplier of the embedding std (the paper's 3σ)
TRACE_WINDOW = 10
TRACE_BATCH_SIZE = 128  # corrupted rows per forward pass (at most)


def cache_dir() -> Path:
    """rompatch's cache root: $ROMPATCH_CACHE, else $XDG_CACHE_HOME/rompatch, else ~/.cache/rompatch."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rompatch"


def data_dir() -> Path | None:
    """The evaluation data folder from $ROMPATCH_DATA (CounterFact, known_1000, zsRE, WikiText-2), or
    None when it is not set. The product never needs it: only evaluation, tracing's defaults and the
    tests read it."""
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else None
