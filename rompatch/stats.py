"""Second-moment statistics C = E[k kᵀ] of the edited matrix's input ("keys"), streamed and cached.

Collection runs the model only up to the edited module (``Trace(..., stop=True)``), accumulates
``kᵀk`` per batch in float32 and the running sum in float64, and shows tokens/s. The cache key
covers everything that changes the result: a sha256 of exactly the weights that feed the key
(embeddings, blocks below the layer, and the edited block except its output matrix, so edits at
that layer reuse the statistics), the layer, the data source and its hash, the token budget, the
sequence length, the dtype and the tokenizer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arch import ModelSpec, check_layer, get_spec, module_io, num_layers
from .cached import identity_key, read_cached, write_cached
from .constants import DEFAULT_SAMPLED_TOKENS, DEFAULT_STATS_TOKENS, ENV_DATA, cache_dir, data_dir
from .distributed import SINGLE, Group
from .errors import StatsError
from .fingerprint import TensorMemo, dtype_name, tensor_sha256
from .hooks import Trace
from .hub.transfer import hub_unavailable
from .placement import input_device, named_values
from .sampled import SamplerSettings, sampled_chunks, sampler_identity
from .tokens import bos_prefix, pad_right

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
HF_DEFAULT = "Salesforce/wikitext:wikitext-103-raw-v1"
STATS_VERSION = 1


# ---------------------------------------------------------------------------------- text sources


@dataclass
class TextSource:
    """Where statistics text comes from. ``identity`` goes into the cache key and the patch.

    A corpus yields texts (``_texts``); the sampled source yields token sequences (``_chunks``).
    ``reason`` says why this source was chosen, for the one line the CLI prints.
    """

    name: str
    identity: dict[str, Any]
    _texts: Callable[[], Iterator[str]] | None = None
    reason: str = ""
    default_tokens: int = DEFAULT_STATS_TOKENS
    _chunks: Callable[[int, bool], Iterator[list[int]]] | None = None

    def texts(self) -> Iterator[str]:
        if self._texts is None:
            raise StatsError(f"statistics source {self.name} yields tokens, not texts")
        yield from self._texts()

    def describe(self) -> str:
        return f"statistics text: {self.name}" + (f" ({self.reason})" if self.reason else "")


_WIKITEXT_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]


def _file_sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def text_lines(path: Path, *, detok: bool = False, encoding: str = "utf-8") -> Iterator[str]:
    """The non-empty lines of a text file, stripped; ``detok``: WikiText's `` @-@ `` style undone.
    Statistics and tracing's noise scale read WikiText-2 through it."""
    with open(path, encoding=encoding, errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if detok:
                for a, b in _WIKITEXT_DETOK:
                    line = line.replace(a, b)
            yield line


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StatsError(
                    f"{path}:{i}: not valid JSON ({e.msg}); each line must be an object"
                ) from None
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise StatsError(f"{path}:{i}: no string field '{field}'; pass --stats-text-field NAME")
            if text.strip():
                yield text


def local_wikitext() -> list[Path] | None:
    """WikiText-2 from the shared data folder ($ROMPATCH_DATA), if set and present: raw test, then valid."""
    d = data_dir()
    if d is None:
        return None
    files = [d / "wikitext-2" / "raw" / "wiki.test.raw", d / "wikitext-2" / "wiki.valid.tokens"]
    return files if all(f.is_file() for f in files) else None


def _wikitext2_source(files: list[Path]) -> TextSource:
    sha = _file_sha(files)

    def gen():
        for f in files:
            yield from text_lines(f, detok=f.suffix == ".tokens")

    return TextSource(
        "wikitext-2 (test raw + valid)",
        {"source": "wikitext-2:test-raw+valid", "sha256": sha},
        gen,
        reason=f"found under ${ENV_DATA}",
    )


def _sampled_source(model: Any, tok: Any, seed: int, reason: str) -> TextSource:
    settings = SamplerSettings(seed=seed)
    if max_positions(model) < settings.seq_len:  # a model with a short context samples shorter texts
        settings = SamplerSettings(seed=seed, seq_len=max_positions(model))
    ident = sampler_identity(model, tok, settings, _tokenizer_sha(tok))

    def chunks(n_tokens: int, progress: bool) -> Iterator[list[int]]:
        return sampled_chunks(model, tok, ident, settings, n_tokens, progress=progress)

    return TextSource(
        f"text sampled from the model (seed {seed})",
        ident,
        reason=reason,
        default_tokens=DEFAULT_SAMPLED_TOKENS,
        _chunks=chunks,
    )


def _parse_sampled(spec: str) -> int | None:
    """``sampled`` or ``sampled:SEED`` → the seed; anything else → None."""
    m = re.fullmatch(r"sampled(?::(-?\d+))?", spec)
    return None if m is None else int(m.group(1) or 0)


def _default_source(model: Any, tok: Any, text_field: str) -> TextSource:
    """$ROMPATCH_DATA's WikiText-2, else WikiText-103 from the Hub after one quick probe, else
    text sampled from the model itself."""
    files = local_wikitext()
    if files:
        return _wikitext2_source(files)
    where = f"${ENV_DATA} is not set" if data_dir() is None else f"no WikiText-2 under ${ENV_DATA}"
    why = hub_unavailable(HF_DEFAULT.split(":")[0], repo_type="dataset")
    if why is None:
        try:
            src = _hf_source(HF_DEFAULT, text_field)
            src.reason = f"{where}; streamed from the Hub"
            return src
        except StatsError as e:
            why = str(e)
    if model is None or tok is None:
        raise StatsError(
            f"no statistics text: {where} and {why}; pass --stats-data FILE.txt, FILE.jsonl or a dataset id"
        )
    return _sampled_source(model, tok, 0, f"{where} and {why}")


def check_stats_data(spec: str | None, *, text_field: str = "text") -> None:
    """Cheap checks of ``--stats-data`` before a model is loaded: a named file must exist and be text."""
    if spec is None or _parse_sampled(spec) is not None:
        return
    text_source(spec, text_field=text_field)


def text_source(
    spec: str | None, *, text_field: str = "text", model: Any = None, tok: Any = None
) -> TextSource:
    """Resolve ``--stats-data``: a .txt/.raw/.tokens file, a .jsonl file, ``sampled[:SEED]`` (text
    the model writes itself; needs ``model`` and ``tok``), or a HF dataset id
    (``name[:config][@split]``, streamed with the ``datasets`` library). ``None``: WikiText-2 from
    $ROMPATCH_DATA when present, else WikiText-103 from the Hub when it answers one quick probe,
    else sampled text."""
    if spec is None:
        return _default_source(model, tok, text_field)
    seed = _parse_sampled(spec)
    if seed is not None:
        if model is None or tok is None:
            raise StatsError("--stats-data sampled needs the model: pass model= and tok=")
        return _sampled_source(model, tok, seed, "asked for with --stats-data")
    path = Path(spec).expanduser()
    if path.exists() or re.search(r"\.(txt|raw|tokens|jsonl)$", spec):
        if not path.is_file():
            raise StatsError(
                f"cannot read statistics file {spec}: no such file; pass an existing .txt or .jsonl file"
            )
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 16)
        except OSError as e:
            raise StatsError(f"cannot read statistics file {spec}: {e.strerror}") from None
        if not _looks_like_text(head):
            raise StatsError(
                f"statistics file {spec} is not UTF-8 text (binary data in its first bytes); pass a plain "
                "text or .jsonl file"
            )
        sha = _file_sha([path])
        if path.suffix == ".jsonl":
            return TextSource(
                path.name,
                {"source": f"file:{path.name}", "field": text_field, "sha256": sha},
                lambda: _jsonl(path, text_field),
                reason="--stats-data",
            )
        if path.suffix not in (".txt", ".raw", ".tokens", ".text", ""):
            raise StatsError(
                f"statistics file {spec} must be .txt (plain text) or .jsonl (one JSON object per line)"
            )
        return TextSource(
            path.name,
            {"source": f"file:{path.name}", "sha256": sha},
            lambda: text_lines(path),
            reason="--stats-data",
        )
    return _hf_source(spec, text_field)


def _looks_like_text(head: bytes) -> bool:
    """Whether a file's first bytes are UTF-8 text: no NUL byte, and they decode (a character cut
    at the end of the sample is allowed)."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


def _hf_source(spec: str, text_field: str) -> TextSource:
    m = re.fullmatch(r"([\w.\-]+/[\w.\-]+|[\w.\-]+)(?::([\w.\-]+))?(?:@([\w.\-\[\]:%]+))?", spec)
    if not m:
        raise StatsError(
            f"--stats-data {spec!r} is neither a file nor a dataset id like 'wikimedia/wikipedia:20231101.en'"
        )
    name, config, split = m.group(1), m.group(2), m.group(3) or "train"
    try:
        import datasets
    except ImportError:
        raise StatsError(
            "reading a Hub dataset needs the 'datasets' package: pip install 'rompatch[datasets]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        first = next(iter(ds))
    except Exception as e:  # datasets raises many types (connection, not found, offline)
        raise StatsError(f"cannot stream dataset {spec!r}: {str(e).splitlines()[0][:200]}") from None
    if text_field not in first:
        raise StatsError(
            f"dataset {spec!r} has no field '{text_field}' (fields: {', '.join(first)}); pass --stats-text-field"
        )

    def gen():
        for row in ds:
            t = row[text_field]
            if isinstance(t, str) and t.strip():
                yield t

    return TextSource(
        spec,
        {"source": f"hf:{name}", "config": config, "split": split, "field": text_field},
        gen,
        reason="--stats-data",
    )


# ------------------------------------------------------------------------------------ collection


@dataclass
class SecondMoment:
    """E[k kᵀ] over ``count`` keys, plus where it came from."""

    mom2: torch.Tensor  # (d, d) float32, the mean of k kᵀ
    count: int
    identity: dict[str, Any]
    # C's LU factors, kept by the statistics they factor (one ridge at a time: 11008² is ~1 GB)
    _factors: TensorMemo = field(default_factory=lambda: TensorMemo(1), repr=False, compare=False)

    @property
    def sha256(self) -> str:
        return tensor_sha256(self.mom2)

    def lu_factors(self, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """LU factors (float64, CPU) of C (+ ``ridge`` × its mean eigenvalue), computed once per ridge.

        The factorisation is O(n³) (n = 6400 for GPT-2 XL, 11008 for Llama-7B: seconds of CPU); each
        edit then solves in O(n²), with the same LAPACK LU that ``torch.linalg.solve`` would use.
        """

        def factor() -> tuple[torch.Tensor, torch.Tensor]:
            C = self.mom2.detach().to("cpu", torch.float64)
            if ridge > 0:
                C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
            return torch.linalg.lu_factor(C)

        return self._factors.get(self.mom2, factor, float(ridge))

    def principal_directions(self, m: int) -> torch.Tensor:
        """The ``m`` eigenvectors of C with the largest eigenvalues, (m, n) float64 on the CPU, computed
        once: the key directions the base model uses most (what ``protect`` keeps an update away from)."""

        def eig() -> torch.Tensor:
            _, vecs = torch.linalg.eigh(self.mom2.detach().to("cpu", torch.float64))
            return vecs.flip(1).T.contiguous()  # rows, largest eigenvalue first

        return self._factors.get(self.mom2, eig, "eigenvectors")[:m]

    def record(self) -> dict[str, Any]:
        """What a patch stores about its statistics."""
        return {
            **{k: v for k, v in self.identity.items() if k not in ("weights_sha256", "seconds")},
            "tokens": self.count,
            "sha256": self.sha256,
            "weights_sha256": self.identity.get("weights_sha256"),
        }


def key_weights_sha(model: Any, layer: int, spec: ModelSpec) -> str:
    """sha256 over the weights that determine the edited matrix's input at ``layer``."""
    n = num_layers(model)
    later = tuple(f"{spec.block(j)}." for j in range(layer + 1, n))
    out_mod = spec.mlp_out_module(layer) + "."
    skip_heads = (spec.final_norm + ".", spec.lm_head + ".")
    h = hashlib.sha256()
    for name, p in named_values(model):
        if name.startswith(later) or name.startswith(out_mod) or name.startswith(skip_heads):
            continue
        h.update(name.encode())
        h.update(tensor_sha256(p).encode())
    return h.hexdigest()


def _tokenizer_sha(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def token_chunks(
    tok: Any, source: TextSource, seq_len: int, n_tokens: int, progress: bool = False
) -> Iterator[list[int]]:
    """Pack the source's texts into sequences of ``seq_len`` tokens (BOS first when the tokenizer adds
    one); a token source's sequences are taken as they are. Stops at ``n_tokens`` tokens."""
    if source._chunks is not None:
        produced = 0
        for c in source._chunks(n_tokens, progress):
            c = c[: n_tokens - produced]
            yield c
            produced += len(c)
            if produced >= n_tokens:
                return
        return
    prefix = bos_prefix(tok)
    sep = tok.eos_token_id
    body = seq_len - len(prefix)
    buf: list[int] = []
    produced = 0
    for text in source.texts():
        buf += tok(text, add_special_tokens=False)["input_ids"]
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            take = min(body, n_tokens - produced - len(prefix))
            if take <= 0:
                return
            yield prefix + buf[:take]
            produced += take + len(prefix)
            buf = buf[body:]
            if produced >= n_tokens:
                return
    if buf and produced < n_tokens:
        yield prefix + buf[: max(1, n_tokens - produced - len(prefix))]


@torch.no_grad()
def collect_second_moment(
    model: Any,
    tok: Any,
    layer: int,
    *,
    source: TextSource,
    n_tokens: int = DEFAULT_STATS_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    spec: ModelSpec | None = None,
    progress: bool = False,
    identity: dict[str, Any] | None = None,
    snapshots: Sequence[int] = (),
    on_snapshot: Callable[[SecondMoment], None] | None = None,
    group: Group = SINGLE,
) -> SecondMoment:
    """Stream ``n_tokens`` tokens of ``source`` through layers 0..``layer`` and average k kᵀ.

    ``snapshots``: token counts at which ``on_snapshot`` receives the statistics so far (at batch
    granularity), so one pass yields the statistics of several budgets.

    ``group`` (``rompatch.distributed``, under torchrun): every process reads the same token stream
    and runs the batches ``i`` with ``i % world == rank``, the batches a single process would run;
    the sums and counts are then added over the processes (float64), so the result equals a single
    process's up to the order of the float64 additions.
    """
    if group.world > 1 and snapshots:
        raise StatsError("statistics snapshots need one process; run without torchrun")
    from tqdm.auto import tqdm

    spec = get_spec(model, spec)
    check_layer(model, layer)
    device = input_device(model)
    module = spec.mlp_out_module(layer)
    total: torch.Tensor | None = None
    count = 0
    bar = tqdm(
        total=n_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"statistics layer {layer}" + (f" (rank 0 of {group.world})" if group.world > 1 else ""),
        disable=not progress or not group.is_main,
        leave=False,
    )
    t0 = time.perf_counter()
    pending = sorted(x for x in snapshots if x < n_tokens)
    chunks = token_chunks(tok, source, seq_len, n_tokens, progress and group.is_main)
    for i in itertools.count():
        batch = [c for _, c in zip(range(batch_size), chunks)]
        if not batch:
            break
        if not group.mine(i):  # another process's batch; the bar shows the whole stream
            bar.update(sum(len(c) for c in batch))
            continue
        padded = pad_right(batch, tok.pad_token_id or 0)
        ids, mask = padded.input_ids, padded.attention_mask
        with Trace(model, module, retain_input=True, retain_output=False, stop=True) as tr:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        k = tr.input[mask.to(tr.input.device).bool()].to(torch.float32)  # (N, d), on the layer's device
        kk = (k.T @ k).to(torch.float64).cpu()  # (d, d)
        total = kk if total is None else total.add_(kk)
        count += k.shape[0]
        while pending and count >= pending[0]:
            pending.pop(0)
            if on_snapshot is not None:
                snap_id = dict(
                    identity or {}, collected_tokens=count, seconds=round(time.perf_counter() - t0, 2)
                )
                on_snapshot(
                    SecondMoment(mom2=(total / count).to(torch.float32), count=count, identity=snap_id)
                )
        bar.update(k.shape[0])
        bar.set_postfix_str(f"{bar.n / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
    bar.close()
    if group.world > 1:  # add the processes' sums and counts
        d = module_io(model, layer, spec)[0]
        total = group.all_sum(torch.zeros(d, d, dtype=torch.float64) if total is None else total)
        count = int(group.all_sum(torch.tensor([count], dtype=torch.float64)).item())
    if count == 0 or total is None:
        raise StatsError(f"statistics source {source.name} produced no text; pass a non-empty --stats-data")
    elapsed = time.perf_counter() - t0
    log.info("statistics: %d tokens in %.1f s (%.0f tok/s)", count, elapsed, count / max(elapsed, 1e-9))
    ident = dict(identity or {})
    ident.update(collected_tokens=count, seconds=round(elapsed, 2))
    if group.world > 1:
        ident["processes"] = group.world
    return SecondMoment(mom2=(total / count).to(torch.float32), count=count, identity=ident)


def max_positions(model: Any) -> int:
    """The model's context length (GPT-2 ``n_positions``, others ``max_position_embeddings``)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return DEFAULT_SEQ_LEN


# ------------------------------------------------------------------------------------------ cache


def stats_identity(
    model: Any, tok: Any, layer: int, source: TextSource, *, n_tokens: int, seq_len: int, spec: ModelSpec
) -> dict[str, Any]:
    return {
        "version": STATS_VERSION,
        "model_type": model.config.model_type,
        "weights_sha256": key_weights_sha(model, layer, spec),
        "layer": layer,
        "module": spec.mlp_out_module(layer),
        **{f"data_{k}": v for k, v in source.identity.items()},
        "n_tokens": n_tokens,
        "seq_len": seq_len,
        "dtype": dtype_name(next(model.parameters()).dtype),
        "tokenizer_sha256": _tokenizer_sha(tok),
    }


def _cache_path(identity: dict[str, Any]) -> Path:
    key = identity_key(identity, 40)
    return cache_dir() / "stats" / f"{identity['model_type']}-L{identity['layer']}-{key}.safetensors"


def load_cached(identity: dict[str, Any]) -> SecondMoment | None:
    path = _cache_path(identity)
    entry = read_cached(path, identity)
    if entry is None:
        return None
    tensors, meta = entry
    try:
        return SecondMoment(
            mom2=tensors["mom2"], count=int(meta["count"]), identity=json.loads(meta["full_identity"])
        )
    except (KeyError, ValueError) as e:  # written by something else: recomputed, never trusted
        log.warning("ignoring unreadable statistics cache %s (%s)", path, e)
        return None


def save_cached(identity: dict[str, Any], sm: SecondMoment) -> Path:
    meta = {"full_identity": json.dumps(sm.identity, sort_keys=True), "count": str(sm.count)}
    return write_cached(_cache_path(identity), identity, {"mom2": sm.mom2}, meta)


def get_second_moment(
    model: Any,
    tok: Any,
    layer: int,
    *,
    stats_data: str | None = None,
    n_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    text_field: str = "text",
    spec: ModelSpec | None = None,
    use_cache: bool = True,
    progress: bool = False,
    notify: Callable[[str], None] | None = None,
    group: Group = SINGLE,
) -> SecondMoment:
    """Cached E[k kᵀ] for ``layer``: computed once per (weights, layer, data, budget, dtype, tokenizer).

    ``n_tokens`` None takes the source's default budget (100,000 tokens of a corpus, 16,384 of
    sampled text). ``notify`` receives one line naming the statistics text and why it was chosen.
    ``group``: the torchrun processes that share the pass (``collect_second_moment``); rank 0 writes
    the cache entry, under the same identity as one process would.
    """
    spec = get_spec(model, spec)
    check_layer(model, layer)
    if n_tokens is not None and n_tokens < 1:
        raise StatsError(f"--stats-tokens must be positive, got {n_tokens}")
    source = text_source(stats_data, text_field=text_field, model=model, tok=tok)
    n_tokens = source.default_tokens if n_tokens is None else n_tokens
    seq_len = source.identity["seq_len"] if source._chunks is not None else min(seq_len, max_positions(model))
    identity = stats_identity(model, tok, layer, source, n_tokens=n_tokens, seq_len=seq_len, spec=spec)
    hit = load_cached(identity) if use_cache else None
    if not group.all_true(hit is not None):
        hit = None  # every process takes part in the pass, or none does
    line = f"{source.describe()}; {n_tokens:,} tokens at layer {layer}" + (", cached" if hit else "")
    log.info(line)
    if notify is not None and group.is_main:
        notify(line)
    if hit is not None:
        return hit
    sm = collect_second_moment(
        model,
        tok,
        layer,
        source=source,
        n_tokens=n_tokens,
        seq_len=seq_len,
        spec=spec,
        progress=progress,
        identity=identity,
        group=group,
    )
    if use_cache and group.is_main:
        try:
            save_cached(identity, sm)
        except OSError as e:
            log.warning("could not cache statistics: %s", e)
    group.barrier()  # the entry is written before any process goes on to use it
    return sm


__all__ = [
    "DEFAULT_STATS_TOKENS",
    "check_stats_data",
    "SecondMoment",
    "TextSource",
    "collect_second_moment",
    "get_second_moment",
    "text_source",
]
