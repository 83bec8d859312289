"""Patches on model checkpoints on disk (safetensors folders, local or from the Hub).

- ``operations``: apply, revert and log on a checkpoint folder;
- ``safetensors_io``: reading and rewriting tensors in safetensors files by byte range;
- ``diff``: what differs between patches and checkpoints (``rompatch.diff``);
- ``extract``: a patch from two checkpoints.
"""

from .extract import extract_patch
from .operations import apply_to_checkpoint, checkpoint_log, open_checkpoint, revert_checkpoint

__all__ = ["apply_to_checkpoint", "checkpoint_log", "extract_patch", "open_checkpoint", "revert_checkpoint"]
