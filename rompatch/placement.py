"""Where a model's weights live, and where its computations run.

A model is either on one device, or dispatched by accelerate (``load_model(..., device_map=...)``):
its blocks spread over several devices, some maybe offloaded to CPU memory or disk. An offloaded
parameter is a ``meta`` tensor on its module; accelerate keeps its value in the module hook's
``weights_map`` and moves it to the execution device for each forward pass.

Every part of rompatch that reads, hashes or writes a weight, or places a tensor for a forward
pass, asks this module:

- ``input_device(model)``: where token ids go (the input embedding's execution device);
- ``module_device(model, name)``: where a module computes (its outputs live there);
- ``param_value(model, name)``: a parameter's value, whether resident or offloaded (never ``meta``);
- ``named_values(model)``: every parameter's value, as ``named_parameters`` would give it undispatched;
- ``write_param(model, name, value)``: set a parameter where accelerate keeps it. A resident one is
  overwritten in place; an offloaded one is replaced in the offload map's in-memory state, which
  accelerate reads before its files, so files on disk (the offload folder, or the checkpoint
  accelerate maps directly) are never written.

Invariant: for every parameter, ``param_value`` after ``write_param(v)`` is ``v`` (cast to the
parameter's dtype), and the next forward pass computes with exactly that value, on any placement.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import DeviceError


def _hooks(module: nn.Module) -> list[Any]:
    """accelerate hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model with a device map (its blocks may sit on several devices)."""
    return bool(getattr(model, "hf_device_map", None))


def _execution_device(module: nn.Module) -> torch.device | None:
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return None


def module_device(model: nn.Module, name: str) -> torch.device:
    """Where module ``name`` computes: its hook's execution device, else where its parameters are."""
    mod = model.get_submodule(name)
    for m in [mod, *_ancestors(model, name)]:
        dev = _execution_device(m)
        if dev is not None:
            return dev
    for p in mod.parameters():
        if p.device.type != "meta":
            return p.device
    return input_device(model)


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules above ``name``, nearest first (the model itself last)."""
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1)]


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embedding's execution device (for a model on one device, that
    device). accelerate moves a module's inputs to its device, but rompatch builds masks, indices
    and targets next to the ids, so they must start where the model starts."""
    if is_dispatched(model):
        emb = model.get_input_embeddings()
        for name, mod in model.named_modules():
            if mod is emb:
                return module_device(model, name)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _offload_slot(model: nn.Module, name: str) -> tuple[Mapping, str] | None:
    """(the weights map that holds offloaded parameter ``name``, its key there), or None if resident.

    The hook of the parameter's module or of one above it holds the map, keyed relative to that module.
    """
    mod_name, _, leaf = name.rpartition(".")
    parts = mod_name.split(".") if mod_name else []
    for i in range(len(parts), -1, -1):
        mod = model.get_submodule(".".join(parts[:i]))
        rel = ".".join([*parts[i:], leaf])
        for h in _hooks(mod):
            wm = getattr(h, "weights_map", None)
            if getattr(h, "offload", False) and wm is not None:
                try:
                    wm[rel]
                except KeyError:
                    continue
                return wm, rel
    return None


def _state_dict_key(wm: Mapping, key: str) -> tuple[dict, str]:
    """The in-memory dict accelerate reads ``wm[key]`` from first, and the key there."""
    prefix = ""
    while hasattr(wm, "dataset") and hasattr(wm, "prefix"):  # accelerate's PrefixedDataset
        prefix += wm.prefix
        wm = wm.dataset
    state = getattr(wm, "state_dict", wm)  # OffloadedWeightsLoader, or a plain dict
    if not isinstance(state, dict):
        raise TypeError(f"cannot write into an offload map of type {type(wm).__name__}")
    return state, prefix + key


def param_value(model: nn.Module, name: str) -> torch.Tensor:
    """The value of parameter ``name``: the parameter itself when resident, else what accelerate
    would load for it (a CPU tensor for weights offloaded to CPU or disk)."""
    p = model.get_parameter(name)
    if p.device.type != "meta":
        return p
    slot = _offload_slot(model, name)
    if slot is None:
        raise RuntimeError(f"'{name}' is on the meta device and no accelerate hook holds its value")
    wm, key = slot
    return wm[key]


def is_offloaded(model: nn.Module, name: str) -> bool:
    return model.get_parameter(name).device.type == "meta"


def named_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, value)`` for every parameter, offloaded ones read from where accelerate keeps them."""
    for name, p in model.named_parameters():
        yield name, (p if p.device.type != "meta" else param_value(model, name))


def write_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter ``name`` to ``value`` (cast to its dtype) where accelerate keeps it.

    Resident: in place through the parameter itself (not ``.data``), which bumps its version
    counter, so memos keyed on it (``fingerprint.TensorMemo``) see the change. Offloaded: a new
    CPU tensor in the offload map's in-memory state (no file is written)."""
    p = model.get_parameter(name)
    with torch.no_grad():
        if p.device.type != "meta":
            p.copy_(value.to(p.device))
            return
    slot = _offload_slot(model, name)
    if slot is None:
        raise RuntimeError(f"'{name}' is on the meta device and no accelerate hook holds its value")
    wm, rel = slot
    state, key = _state_dict_key(wm, rel)
    state[key] = _placed_like(value.detach().to(p.dtype), wm[rel])


_PAGE = 4096


def _placed_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``value`` at the same offset within a memory page as ``ref``.

    CPU BLAS kernels choose their code path, and so their summation order, by the operands'
    alignment: the same matrix at another offset can give a product that differs in the last bit.
    accelerate computes with the offloaded tensor where it lies (memory-mapped from the checkpoint,
    at the offset of its bytes in the file), so a replacement at the same offset keeps every
    forward pass bit-identical to the model on one device, where the parameter is written in place.
    """
    n, size = value.numel(), value.element_size()
    buf = torch.empty(n + _PAGE // size, dtype=value.dtype, device="cpu")
    shift = ((ref.data_ptr() - buf.data_ptr()) % _PAGE) // size
    out = buf[shift : shift + n].view(value.shape)
    out.copy_(value)
    return out


# ------------------------------------------------------------------------------ device maps

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | dict | None) -> str | dict[str, Any] | None:
    """A device map as accelerate takes it: a strategy (``auto``, ``balanced``, ``balanced_low_0``,
    ``sequential``), or module name -> device (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``) given as a
    dict, a JSON object or a JSON file."""
    if spec is None or isinstance(spec, dict):
        return _checked_map(spec) if isinstance(spec, dict) else None
    text = str(spec).strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    import json
    from pathlib import Path

    source = "--device-map"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise DeviceError(
                f"--device-map {text!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) nor a JSON "
                "file; pass one of them or a JSON object like '{\"model.layers.0\": 0, ...}'"
            )
        source, text = str(path), path.read_text()
    try:
        value = json.loads(text)
    except ValueError as e:
        raise DeviceError(f"device map {source} is not valid JSON ({e}); fix it or pass a strategy") from None
    if not isinstance(value, dict):
        raise DeviceError(f"device map {source} must be a JSON object of module name -> device")
    return _checked_map(value)


def _checked_map(dm: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in dm.items():
        if not isinstance(k, str) or not (
            isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str)
        ):
            raise DeviceError(
                f"device map entry {k!r}: {v!r} is not module name -> device (an int GPU index, 'cuda:N', "
                "'cpu' or 'disk')"
            )
        if isinstance(v, str) and v not in ("cpu", "disk", "meta"):
            try:
                torch.device(v)
            except RuntimeError:
                raise DeviceError(
                    f"device map entry {k!r}: unknown device {v!r}; use 'cuda:N', 'cpu' or 'disk'"
                ) from None
        out[k] = v
    return out


def parse_max_memory(spec: str | dict | None) -> dict[int | str, str] | None:
    """``0=20GiB,1=20GiB,cpu=64GiB`` (or a dict) -> accelerate's ``max_memory``."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict[int | str, str] = {}
    for part in str(spec).split(","):
        dev, eq, size = part.strip().partition("=")
        dev, size = dev.strip(), size.strip()
        if not eq or not dev or not size:
            raise DeviceError(
                f"--max-memory {spec!r}: expected DEVICE=SIZE pairs separated by commas, like 0=20GiB,cpu=64GiB"
            )
        key: int | str = int(dev) if dev.isdigit() else dev
        if (
            isinstance(key, str)
            and key not in ("cpu", "mps", "disk")
            and not key.startswith(("cuda:", "xpu:"))
        ):
            raise DeviceError(
                f"--max-memory: unknown device {dev!r}; use a GPU index (0, 1, ...), 'cpu' or 'mps'"
            )
        if isinstance(key, str) and key.startswith("cuda:"):
            key = int(key.split(":", 1)[1])
        out[key] = size
    return out


def describe(model: nn.Module) -> str | None:
    """One line on where a dispatched model's modules sit ('device map: 14 modules on cpu, 20 on
    disk'), or None for a model on one device."""
    dm = getattr(model, "hf_device_map", None)
    if not dm:
        return None
    counts: dict[str, int] = {}
    for dev in dm.values():
        name = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[name] = counts.get(name, 0) + 1
    parts = ", ".join(f"{n} on {d}" for d, n in counts.items())
    return f"device map: {len(dm)} modules: {parts}"
