"""``Patch.from_pretrained`` and ``Patch.push_to_hub``, the way huggingface_hub's ``ModelHubMixin`` does it.

``Patch`` inherits ``HubMixin``. The mixin handles the Hub and calls back into the class for the
format: ``cls.load(path)`` to read a file and ``self.to_bytes()`` to write one. It imports nothing
from the patch format module, so the format module can build on it without an import loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from .commit import Upload, commit_patches, require_repo_id
from .transfer import PATCH_SUFFIX, fetch_patch, is_local_patch_ref, single_local_patch

P = TypeVar("P", bound="HubMixin")


class HubMixin:
    """Hub methods for a class with ``load(path)`` (a classmethod), ``to_bytes()`` and ``short_id``."""

    @classmethod
    def from_pretrained(cls: type[P], ref: str | os.PathLike, revision: str | None = None) -> P:
        """Load a patch from a local file, a local folder holding one patch, or a Hub reference
        ``REPO_ID[/path.safetensors][@REV]`` (downloaded into the Hugging Face cache)."""
        if is_local_patch_ref(ref):  # never sent to the Hub, so a missing file is reported as one
            path = Path(ref).expanduser()
            return cls.load(single_local_patch(path) if path.is_dir() else path)  # type: ignore[attr-defined]
        return fetch_patch(str(ref), cls.load, revision=revision)[0]  # type: ignore[attr-defined]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        filename: str | None = None,
        base_model: str | None = None,
    ) -> Any:
        """Upload this patch (and a model card) to ``repo_id``; see ``rompatch.push_patch``."""
        require_repo_id(repo_id)
        name = filename or f"patch-{self.short_id}{PATCH_SUFFIX}"
        return commit_patches(
            repo_id,
            [Upload(name=name, patch=self, data=self.to_bytes())],  # type: ignore[arg-type, attr-defined]
            load=type(self).load,  # type: ignore[attr-defined]
            private=private,
            revision=revision,
            message=commit_message,
            token=token,
            base_model=base_model,
        )
