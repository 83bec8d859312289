"""Patches on model checkpoints on disk (safetensors folders, local or from the Hub).

- ``operations``: apply, revert and log on a checkpoint folder;
- ``reader``: opening a folder (or a Hub id) and reading tensors by byte range;
- ``writer``: writing the output folder (rewritten shards, hard links, copies);
- ``record``: ``rompatch.json`` and the undo data;
- ``rewrite``: a checkpoint's touched tensors recomputed for a patch stack;
- ``safetensors_io``: safetensors headers, and tensors' bytes by byte range;
- ``diff``: what differs between patches and checkpoints (``rompatch.diff``);
- ``extract``: a patch from two checkpoints.
"""

from .extract import extract_patch
from .operations import CheckpointResult, apply_to_checkpoint, checkpoint_log, revert_checkpoint
from .reader import Checkpoint, open_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointResult",
    "apply_to_checkpoint",
    "checkpoint_log",
    "extract_patch",
    "open_checkpoint",
    "revert_checkpoint",
]
