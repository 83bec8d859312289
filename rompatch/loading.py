"""``load_patched``: a base model with patches applied and verified, in one call.

    model, tok = rompatch.load_patched("gpt2-xl", "alice/gpt2-xl-eiffel-rome")

Patches are resolved (local files, Hub references or ``Patch`` objects) before the model is loaded,
so a wrong reference fails fast. Each one is applied with the usual checks (shapes, lineage, base
fingerprints), and the result is verified: every touched tensor is compared with the value the
patches define, so a model that silently lost its edits is never returned.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from .apply import apply_patch, verify_applied
from .errors import BaseMismatchError, FingerprintMismatchError, ModelLoadError
from .fingerprint import dtype_name
from .models import load_model
from .patch import Patch
from .refs import PatchesLike, resolve_patches
from .signing import TrustedKeys, require_signed

log = logging.getLogger(__name__)


def _base_of(patches: Sequence[Patch]) -> tuple[str, str | None]:
    bases = {p.base.get("model") for p in patches}
    if len(bases) != 1:
        raise ModelLoadError(
            f"the patches were made on different base models ({', '.join(sorted(map(str, bases)))}); "
            "pass the base model explicitly"
        )
    revs = {p.base.get("revision") for p in patches}
    rev = revs.pop() if len(revs) == 1 else None
    if not (isinstance(rev, str) and re.fullmatch(r"[0-9a-f]{40}", rev)):
        rev = None  # only a Hub commit can be passed on (not gguf-sha256:... of embedded models)
    return str(bases.pop()), rev


def load_patched(
    base: str | os.PathLike | None,
    patches: PatchesLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    force: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    require_signature: TrustedKeys | None = None,
) -> tuple[Any, Any]:
    """Load ``base`` and apply ``patches`` in order; return ``(model, tokenizer)``.

    ``base``: an embedded alias, a local model folder or a Hub id; ``None`` uses the base model the
    patches record. ``patches``: one or a list of ``Patch`` objects, local patch files or Hub
    references ``REPO_ID[/file.safetensors][@REV]`` (nested one level, such as a ``create_patch``
    chain inside a list; see ``rompatch.refs``). ``revision`` applies to Hub references without
    ``@REV`` (as in PEFT, it is the adapter's revision); ``base_revision`` to the base model.
    ``force=True`` applies patches whose base fingerprints do not match (logged and recorded).
    ``device_map``, ``max_memory``, ``offload_folder``: as for ``load_model`` (a model spread over
    devices or offloaded; offloaded weights are patched in memory, where accelerate keeps them).
    ``require_signature``: trusted public keys (key files or ``PublicKey`` objects); every patch must
    carry a good signature by one of them, checked before the model is loaded (``rompatch.signing``;
    ``force`` does not override it), else a ``SignatureError``.

    The returned model is verified: each patch is applied, and every touched tensor holds exactly
    the patched value.
    """
    resolved = resolve_patches(patches, revision=revision)  # fail before loading the model
    if require_signature is not None:
        require_signed(resolved, require_signature)
    if base is None:
        if not resolved:
            raise ModelLoadError("no base model and no patches; pass the base model to load")
        base, recorded_rev = _base_of(resolved)
        base_revision = base_revision or recorded_rev
        log.info("loading the patches' base model %s", base)
    model, tok = load_model(
        str(base),
        device=device,
        dtype=dtype,
        revision=base_revision,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
    )
    model_type = model.config.model_type
    loaded_dtype = dtype_name(next(model.parameters()).dtype)
    for p in resolved:
        want = p.base.get("model_type")
        if want and want != model_type:
            raise BaseMismatchError(
                f"patch {p.short_id} was made for a {want} model ({p.base.get('model')}), but {base} is a "
                f"{model_type} model; load the patch's base model"
            )
        try:
            apply_patch(model, p, force=force)
        except FingerprintMismatchError as e:
            if p.base.get("dtype") and p.base["dtype"] != loaded_dtype:
                raise FingerprintMismatchError(
                    f"patch {p.short_id} was computed on {p.base['dtype']} weights but the model was loaded "
                    f"as {loaded_dtype}; load it with dtype={p.base['dtype']!r} (or force=True)",
                    parameter=e.parameter,
                    expected=e.expected,
                    found=e.found,
                ) from e
            raise
    verify_applied(model, resolved)
    log.info("loaded %s with %d patch(es): %s", base, len(resolved), ", ".join(p.short_id for p in resolved))
    return model, tok
