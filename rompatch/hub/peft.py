"""Exact export of patches as a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

A patch's deltas on one matrix are ``ΔW = Σᵢ vᵢ uᵢᵀ`` (out × in). A LoRA adapter adds
``scaling · B A`` with ``A`` (r × in), ``B`` (out × r) and ``scaling = lora_alpha / r``. So the export is
exact, not a fit:

- ``r`` = the number of deltas on the module; row ``i`` of ``lora_A`` is ``uᵢᵀ``, column ``i`` of
  ``lora_B`` is ``vᵢ``, and ``lora_alpha = r`` makes ``scaling = 1``;
- modules with a different number of deltas get their own rank through ``rank_pattern`` and the
  matching ``alpha_pattern`` (so every module still has scale 1);
- GPT-2's ``Conv1D`` stores its weight as (in × out); PEFT handles that with ``fan_in_fan_out=True``
  and still keeps ``lora_A``/``lora_B`` in the (r × in)/(out × r) orientation.

Tensor names follow what PEFT 0.21 writes and reads (``peft.utils.save_and_load``): the module path
inside ``PeftModel`` (``base_model.model.<module>``) followed by ``.lora_A.weight`` /
``.lora_B.weight``, with the adapter name removed. ``peft`` itself is not needed to export.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..arch import SPECS
from ..atomic import staged_folder
from ..errors import ExportError, LineageError, PatchFormatError
from ..models import EMBEDDED
from ..patch import Patch
from ..refs import PatchesLike, resolve_patches

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def _module_of(parameter: str) -> str:
    if not parameter.endswith(".weight"):
        raise ExportError(f"'{parameter}' is not a weight matrix; only '.weight' parameters can be exported")
    return parameter[: -len(".weight")]


def _split_layer(module: str, layer: int, model_type: str) -> tuple[str, str]:
    """``model.layers.6.mlp.down_proj`` -> (``model.layers``, ``mlp.down_proj``), checked against the spec."""
    spec = SPECS.get(model_type)
    if spec is not None:
        head = f"{spec.layers}.{layer}."
        if module.startswith(head):
            return spec.layers, module[len(head) :]
    m = re.fullmatch(rf"(.+?)\.{layer}\.(.+)", module)
    if m is None:
        raise ExportError(
            f"cannot find layer {layer} in module name '{module}'; the patch's layer does not match its parameter"
        )
    return m.group(1), m.group(2)


def _resolve_base_name(patch: Patch) -> str | None:
    name = patch.base.get("model")
    if name in EMBEDDED:
        return EMBEDDED[name].hf_id
    return name


def _ordered(patches: Sequence[Patch], *, force: bool) -> list[Patch]:
    seen: list[str] = []
    for p in patches:
        if p.id in seen:
            raise ExportError(f"patch {p.short_id} is given twice; pass each patch once")
        missing = [x for x in p.lineage if x not in seen]
        if missing and not force:
            raise LineageError(
                f"patch {p.short_id} was computed on top of {', '.join(m[:12] for m in missing)}, which is not "
                "exported before it; export the whole stack in order (export-peft FIRST SECOND ... -o DIR), "
                "or force=True (--force) for an adapter meant for a checkpoint that already has those patches"
            )
        seen.append(p.id)
    return list(patches)


@dataclass
class _Modules:
    """The deltas of each edited module, in application order (patch order, then file order)."""

    deltas: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    tail_of: dict[str, str] = field(default_factory=dict)  # module → its name inside a block
    containers: set[str] = field(default_factory=set)  # the ModuleLists of blocks

    @classmethod
    def of(cls, plist: Sequence[Patch], model_type: str) -> _Modules:
        m = cls()
        for p in plist:
            for d in p.deltas:
                module = _module_of(d.parameter)
                layout = p.parameters[d.parameter].layout
                if m.layouts.setdefault(module, layout) != layout:
                    raise PatchFormatError(
                        f"'{d.parameter}' is declared with layouts {m.layouts[module]} and {layout} by different patches"
                    )
                container, tail = _split_layer(module, d.layer, model_type)
                m.containers.add(container)
                m.tail_of[module] = tail
                m.layers[module] = d.layer
                m.deltas.setdefault(module, []).append((d.u, d.v))
        if len(set(m.layouts.values())) != 1:
            raise ExportError(
                "the patches edit both Conv1D and Linear matrices; a LoRA config has one fan_in_fan_out, "
                "export them as separate adapters"
            )
        return m

    def ranks(self) -> dict[str, int]:
        return {m: len(ds) for m, ds in self.deltas.items()}

    def cover_layers(self, num_layers: int) -> None:
        """All-zero LoRA weights for the edited module type on every other layer (exact: zero terms)."""
        if len(self.containers) != 1 or max(self.layers.values()) >= num_layers:
            raise ExportError(
                f"--num-layers {num_layers} does not cover the edited layers {sorted(set(self.layers.values()))}; "
                "pass the base model's number of layers"
            )
        container = next(iter(self.containers))
        shapes = {self.tail_of[m]: (ds[0][0].numel(), ds[0][1].numel()) for m, ds in self.deltas.items()}
        r_all = max(self.ranks().values())
        for tail, (n_in, n_out) in shapes.items():
            for layer in range(num_layers):
                module = f"{container}.{layer}.{tail}"
                ds = self.deltas.setdefault(module, [])
                self.layers.setdefault(module, layer)
                ds.extend([(torch.zeros(n_in), torch.zeros(n_out))] * (r_all - len(ds)))

    def pad_to_one_rank(self) -> None:
        """Zero-pad every module to the largest rank (exact: zero terms)."""
        r_all = max(self.ranks().values())
        for ds in self.deltas.values():
            n_in, n_out = ds[0][0].numel(), ds[0][1].numel()
            ds.extend([(torch.zeros(n_in), torch.zeros(n_out))] * (r_all - len(ds)))

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for module, ds in sorted(self.deltas.items(), key=lambda kv: (self.layers[kv[0]], kv[0])):
            a = torch.stack([u for u, _ in ds], dim=0)  # (r_m, in): rows are uᵢᵀ
            b = torch.stack([v for _, v in ds], dim=1)  # (out, r_m): columns are vᵢ
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(torch.float32).contiguous()
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(torch.float32).contiguous()
        return out


def _model_type(plist: Sequence[Patch]) -> str:
    model_types = {p.base.get("model_type") for p in plist}
    if len(model_types) != 1:
        raise ExportError(
            f"the patches are for different architectures ({', '.join(sorted(map(str, model_types)))}); "
            "export patches of one base model together"
        )
    bases = {(p.base.get("model"), p.base.get("revision")) for p in plist}
    if len(bases) > 1:
        log.warning("the patches record different base models: %s", sorted(map(str, bases)))
    return str(model_types.pop())


def _lora_config(modules: _Modules, first: Patch, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json that makes PEFT compute exactly Σ vᵢ uᵢᵀ (scale 1 on every module)."""
    ranks = modules.ranks()
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank (ties: the larger) is the default
    rank_pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    base_name = base_model_name_or_path if base_model_name_or_path is not None else _resolve_base_name(first)
    revision = first.base.get("revision")
    if not (isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision)):
        revision = None  # only a Hub commit is meaningful to PEFT (not gguf-sha256:... of embedded models)
    layers_pattern = sorted({c.rsplit(".", 1)[-1] for c in modules.containers})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": revision,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),  # alpha = rank on every module: scale 1 everywhere
        "target_modules": sorted(set(modules.tail_of.values())),
        "layers_to_transform": sorted(set(modules.layers.values())),
        "layers_pattern": layers_pattern[0] if len(layers_pattern) == 1 else layers_pattern,
        "fan_in_fan_out": next(iter(modules.layouts.values())) == "conv1d",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def peft_adapter(
    patches: PatchesLike,
    *,
    base_model_name_or_path: str | None = None,
    force: bool = False,
    num_layers: int | None = None,
    uniform_rank: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``(adapter_config, tensors)`` of the LoRA adapter equal to ``patches`` applied in order.

    ``patches``: a ``Patch``, a patch file, a Hub reference, or a sequence of them (see ``rompatch.refs``).

    ``num_layers``: also write all-zero LoRA weights for the edited module type on every other layer
    ``0..num_layers-1`` and give every module the same rank (zero-padded), for servers that load a
    module type only when every layer has weights for it (TGI, LoRAX). Still exactly the patch.
    ``uniform_rank``: zero-pad every module to the largest rank instead of using ``rank_pattern``
    (for runtimes that scale by ``lora_alpha`` / each tensor's rank, like llama.cpp). Implied by
    ``num_layers``.
    """
    plist = resolve_patches(patches)
    if not plist:
        raise ExportError("no patch to export; pass at least one patch")
    plist = _ordered(plist, force=force)
    modules = _Modules.of(plist, _model_type(plist))
    if num_layers is not None:
        modules.cover_layers(num_layers)
    if uniform_rank:
        modules.pad_to_one_rank()
    return _lora_config(modules, plist[0], base_model_name_or_path), modules.tensors()


def export_peft(
    patch: PatchesLike,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    force: bool = False,
    num_layers: int | None = None,
    uniform_rank: bool = False,
) -> Path:
    """Write the PEFT LoRA adapter equal to ``patch`` (or a stack of patches, in order) into ``out_dir``.

    ``patch``: a ``Patch``, a patch file, a Hub reference, or a sequence of them, such as the list
    ``create_patch(..., mode="sequential")`` returns (see ``rompatch.refs``).

    ``out_dir`` must not exist, be empty, or hold a previous adapter export (which is replaced). The
    folder is written under a temporary name and renamed into place, so a failure leaves nothing.
    ``base_model_name_or_path`` defaults to the patch's base (an embedded alias becomes its upstream
    Hub id). A patch whose lineage is not exported before it is refused unless ``force=True``.
    ``num_layers``, ``uniform_rank``: exact zero padding for other runtimes (see ``peft_adapter``).
    """
    out = Path(out_dir)
    plist = resolve_patches(patch)
    config, tensors = peft_adapter(
        plist,
        base_model_name_or_path=base_model_name_or_path,
        force=force,
        num_layers=num_layers,
        uniform_rank=uniform_rank,
    )
    _check_target(out)
    # an existing export is swapped atomically, checked again at the swap
    with staged_folder(out, error=ExportError, may_replace=_check_target) as tmp:
        meta = {
            "format": "pt",
            "rompatch_version": __version__,
            "rompatch_patch_ids": json.dumps([p.id for p in plist]),
        }
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info(
        "exported %d patch(es) as a rank-%d LoRA adapter on %d module(s) into %s",
        len(plist),
        config["r"],
        len(tensors) // 2,
        out,
    )
    return out


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; pass a folder path to -o/out_dir")
    if out.is_dir():
        extra = sorted(x.name for x in out.iterdir() if x.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
        if extra:
            raise ExportError(
                f"{out} already holds other files ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); "
                "choose a new or empty folder"
            )
