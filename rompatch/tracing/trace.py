"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Which hidden states carry a fact? The prompt is run three ways:

1. **clean**: every state is recorded, and the answer token's probability ``clean_prob``;
2. **corrupted**: Gaussian noise is added to the *subject* tokens' input embeddings (``samples``
   draws, std = ``noise`` × the embedding std); the answer's probability drops to ``corrupted_prob``;
3. **corrupted with one restoration**: as 2, but one state (token ``t``, layer ``l``) is put back to
   its clean value. The probability it recovers, ``scores[kind][t, l]``, shows how much that state
   carries the fact; ``scores - corrupted_prob`` is its *indirect effect*.

Kinds (as in the reference code, kmeng01/rome ``experiments/causal_trace.py``):

- ``"hidden"``: one block output ``h_t^(l)`` (the residual stream after block ``l``);
- ``"mlp"`` / ``"attn"``: the MLP / attention module output at token ``t`` for a *window* of layers
  around ``l``: ``[l - window // 2, l + ceil(window / 2))`` clipped to the model (10 layers by default).

Faithful to the reference, with these choices (all recorded in the result):

- The noise is added to the embedding module's output, which is what the model consumes (Gemma's
  embedding module applies its ``sqrt(hidden)`` scale inside, so the scaled value is corrupted), and
  its std is measured on that same output (``embedding_std``). The noise is drawn once per trace from
  ``seed`` and reused for every cell, as the reference's fixed ``RandomState(1)`` does, so cells
  differ only by what they restore.
- Multi-token answers: only the probability of the answer's *first* token is measured, as in the
  paper.
- Batched: the reference runs one forward pass per cell (a clean row plus ``samples`` corrupted
  rows). Here the clean states are recorded once, and one forward pass holds ``samples`` corrupted
  rows for each of many cells (all noise samples of a cell are rows of the same pass).
- Nothing is recomputed that a restoration cannot change (``reuse_prefix``, on by default): a pass
  whose cells restore at layers ``>= l0`` and tokens ``>= t0`` replays the corrupted run's outputs
  of blocks ``< l0`` and feeds only tokens ``>= t0``, with the corrupted run's keys/values of the
  earlier tokens as a cache (attention is causal). Cells at tokens before the subject restore a
  state the noise never reached; they are not run and get ``corrupted_prob``. The result equals
  the full recomputation to float rounding (tested on every built-in architecture).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch import ModelSpec, get_spec, num_layers
from ..atomic import atomic_write
from ..constants import TRACE_BATCH_SIZE as DEFAULT_BATCH_SIZE
from ..constants import TRACE_KINDS as KINDS
from ..constants import TRACE_NOISE as DEFAULT_NOISE
from ..constants import TRACE_SAMPLES as DEFAULT_SAMPLES
from ..constants import TRACE_WINDOW as DEFAULT_WINDOW
from ..constants import data_dir
from ..errors import ArchitectureError, RequestError, TraceError
from ..hooks import Trace, TraceDict
from ..models import cache_kwarg, model_identity
from ..placement import input_device
from ..stats import max_positions, text_lines
from ..tokens import find_subject, target_ids, token_spans

log = logging.getLogger(__name__)

CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
WIKITEXT_FILE = Path("wikitext-2") / "wiki.test.tokens"
STD_MAX_TOKENS = 20_000
STD_MAX_LENGTH = 1024  # one text measured for the embedding std is cut at this many tokens
TRACE_FORMAT = "rompatch-trace/1"


# ----------------------------------------------------------------------------------------- tokens


# Tracing tokenizes as editing does (``rompatch.tokens``): the same subject tokens and the same target
# ids (``target_ids``: the target after one space), so a trace measures what an edit would change.


@contextmanager
def _as_trace_error() -> Iterator[None]:
    """Editing's ``RequestError`` (subject or target unusable) as tracing's ``TraceError``."""
    try:
        yield
    except RequestError as e:
        raise TraceError(str(e)) from None


def prompt_tokens(tok: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (special tokens included, as the model sees them) and each token's
    character span in ``text``; special tokens get an empty span."""
    if not getattr(tok, "is_fast", False):
        raise TraceError(
            "causal tracing needs a fast tokenizer (one with offset mappings); load it with use_fast=True"
        )
    ids, spans = token_spans(tok, text)
    if not ids:
        raise TraceError(f"prompt {text!r} tokenizes to nothing; pass a non-empty prompt")
    return ids, spans


def subject_range(tok: Any, text: str, subject: str) -> tuple[int, int]:
    """Token range ``[start, end)`` of the first occurrence of ``subject`` in ``text``: every token
    that overlaps the subject's characters (``rompatch.tokens.find_subject``, as editing finds it)."""
    prompt_tokens(tok, text)  # a fast tokenizer, a non-empty prompt
    with _as_trace_error():
        first, last = find_subject(tok, text, subject)
    return first, last + 1


def answer_ids(tok: Any, prompt: str, target: str) -> list[int]:
    """The ids of ``target`` as the continuation of ``prompt``, exactly as editing computes a target's
    ids (``rompatch.tokens.target_ids``: one space before the target)."""
    with _as_trace_error():
        return target_ids(tok, prompt, target)[0]


def _token_labels(tok: Any, text: str, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[str]:
    return [text[s:e] if e > s else str(tok.convert_ids_to_tokens(int(i))) for i, (s, e) in zip(ids, spans)]


# ------------------------------------------------------------------------------ embedding std


@dataclass(frozen=True)
class EmbeddingStd:
    """The std of the embedding module's output over a text sample (all elements of all tokens,
    special tokens excluded), and where the sample came from."""

    value: float
    source: str
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "n_tokens": self.n_tokens}


def wikitext_sample(*, max_chars: int = 200_000) -> tuple[list[str], str] | None:
    """Paragraphs of WikiText-2 test (``data_dir()/wikitext-2/wiki.test.tokens``, headings skipped,
    its `` @-@ `` style tokenization undone), in file order; ``None`` if the file is missing."""
    root = data_dir()
    path = None if root is None else root / WIKITEXT_FILE
    if path is None or not path.is_file():
        return None
    texts, total = [], 0
    for line in text_lines(path, detok=True, encoding="utf-8-sig"):
        if line.startswith("="):  # a heading
            continue
        texts.append(line)
        total += len(line)
        if total >= max_chars:
            break
    return texts, str(path)


@torch.no_grad()
def embedding_std(
    model: Any,
    tok: Any,
    texts: Sequence[str] | None = None,
    *,
    max_tokens: int = STD_MAX_TOKENS,
    source: str | None = None,
    spec: ModelSpec | None = None,
) -> EmbeddingStd:
    """Std of what the embedding module outputs (what the first block consumes) over ``texts``.

    ``texts=None``: WikiText-2 test paragraphs (see ``wikitext_sample``); an error if the file is
    missing. Only the embedding runs (the forward pass stops after it). At most ``max_tokens``
    tokens are used. The reference code measures the same statistic over the subjects of its fact
    set; a general text sample does not depend on the facts traced.
    """
    spec = get_spec(model, spec)
    if texts is None:
        sample = wikitext_sample()
        if sample is None:
            raise TraceError(
                f"WikiText-2 ({WIKITEXT_FILE}) not found under $ROMPATCH_DATA ({data_dir()}); set it, or pass texts= "
                "or an absolute noise std"
            )
        texts, src = sample
        source = source or f"wikitext-2 test ({src})"
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise TraceError("no text to measure the embedding std on; pass non-empty texts")
    device = input_device(model)
    limit = min(max_positions(model), STD_MAX_LENGTH)
    chunks, n = [], 0
    for text in texts:
        enc = tok(
            text, return_special_tokens_mask=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        keep = enc["special_tokens_mask"][0] == 0
        if not keep.any():
            continue
        with Trace(model, spec.embed, stop=True) as t:
            model(input_ids=enc["input_ids"].to(device), use_cache=False)
        e = t.output[0][keep.to(t.output.device)].double().cpu()  # (n, D)
        chunks.append(e)
        n += e.shape[0]
        if n >= max_tokens:
            break
    if not chunks:
        raise TraceError("the texts contain no ordinary tokens; pass real text to measure the embedding std")
    allv = torch.cat(chunks)[:max_tokens]
    return EmbeddingStd(float(allv.std()), source or f"{len(texts)} given text(s)", int(allv.shape[0]))


@dataclass(frozen=True)
class Noise:
    """The absolute noise std and how it was chosen (``TraceResult.noise``)."""

    std: float
    record: dict[str, Any]  # {"std", "multiplier", "embedding_std": {"value", "source", "n_tokens"}}


def resolve_noise(
    model: Any, tok: Any, settings: TraceSettings, *, fallback_texts: Sequence[str], spec: ModelSpec | None
) -> Noise:
    """``settings.noise_std`` as given, else ``settings.noise`` × the embedding std (given, measured
    on WikiText-2, or on ``fallback_texts`` when WikiText is missing)."""
    noise_std, noise, embed_std = settings.noise_std, settings.noise, settings.embed_std
    if noise_std is not None:
        if not (noise_std > 0 and math.isfinite(noise_std)):
            raise TraceError(f"noise std {noise_std} must be a positive number")
        return Noise(float(noise_std), {"std": float(noise_std), "multiplier": None, "embedding_std": None})
    if not (noise > 0 and math.isfinite(noise)):
        raise TraceError(f"noise multiplier {noise} must be a positive number (the paper uses 3)")
    if embed_std is None:
        if wikitext_sample(max_chars=1) is not None:
            embed_std = embedding_std(model, tok, spec=spec)
        else:
            log.warning(
                "WikiText-2 not found under $ROMPATCH_DATA (%s); measuring the embedding std on the prompts",
                data_dir(),
            )
            embed_std = embedding_std(
                model, tok, fallback_texts, spec=spec, source="the traced prompts (WikiText-2 not found)"
            )
    std = noise * embed_std.value
    return Noise(std, {"std": std, "multiplier": float(noise), "embedding_std": embed_std.to_dict()})


# ------------------------------------------------------------------------------------- engine


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _with_first(x: Any, h: torch.Tensor) -> Any:
    return (h, *x[1:]) if isinstance(x, tuple) else h


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


_MISSING = object()


class CausalTracer:
    """One prompt, prepared for tracing: clean states recorded, noise drawn, corrupted run done.

    ``probabilities(sets)`` is the batched core: each set lists ``(token, module_name)`` states to
    restore together; it returns the answer's probability (mean over noise samples) per set.
    ``scores(kind)`` builds the heatmap for one kind from it. ``trace_fact`` is the usual entry point.
    """

    def __init__(
        self,
        model: Any,
        tok: Any,
        prompt: str,
        subject: str,
        *,
        noise_std: float,
        target: str | None = None,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        kinds: Sequence[str] = KINDS,
        spec: ModelSpec | None = None,
        reuse_prefix: bool = True,
    ) -> None:
        if samples < 1:
            raise TraceError(f"samples={samples}; pass at least 1 noise sample (the paper uses 10)")
        kinds = _check_kinds(kinds)
        self.model, self.tok, self.prompt, self.subject = model, tok, prompt, subject
        self.spec = spec = get_spec(model, spec)
        self.n_layers = num_layers(model)
        self.samples, self.seed, self.noise_std = int(samples), int(seed), float(noise_std)
        ids, spans = prompt_tokens(tok, prompt)
        self.token_ids = ids
        self.tokens = _token_labels(tok, prompt, ids, spans)
        self.subject_range = subject_range(tok, prompt, subject)
        self.device = input_device(model)
        self.input_ids = torch.tensor([ids], device=self.device)
        self.names = {
            "hidden": [spec.block(i) for i in range(self.n_layers)],
            "mlp": [spec.mlp_module(i) for i in range(self.n_layers)],
            "attn": [spec.attn_module(i) for i in range(self.n_layers)],
        }
        self.layer_of = {n: i for names in self.names.values() for i, n in enumerate(names)}
        self._check_modules(kinds)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        with torch.no_grad(), eval_mode(model):
            embed_out = self._clean_run(kinds, target)
            self._draw_noise(embed_out)
            self._corrupted_run(reuse_prefix)

    # -- preparation

    def _check_modules(self, kinds: Sequence[str]) -> None:
        for name in [self.spec.embed, *(n for k in kinds for n in self.names[k])]:
            try:
                self.model.get_submodule(name)
            except AttributeError:
                raise ArchitectureError(
                    f"module '{name}' not found in this {self.spec.model_type} model; the ModelSpec does not "
                    "match it"
                ) from None

    def _clean_run(self, kinds: Sequence[str], target: str | None) -> torch.Tensor:
        """The clean run: the states to restore, and the answer. Returns the embedding output (1, T, D)."""
        embed = self.spec.embed
        traced = [embed, *dict.fromkeys(n for k in ("hidden", *kinds) for n in self.names[k])]
        with TraceDict(self.model, traced) as td:
            probs = torch.softmax(self._logits(self.input_ids), dim=-1)[0]
        self.clean = {n: td[n].output[0] for n in traced if n != embed}  # name -> (T, D)
        self.answer_ids = (
            [int(probs.argmax())] if target is None else answer_ids(self.tok, self.prompt, target)
        )
        self.target = target
        self.answer_id = self.answer_ids[0]
        self.answer = self.tok.decode([self.answer_id])
        self.clean_prob = float(probs[self.answer_id])
        return td[embed].output

    def _draw_noise(self, embed_out: torch.Tensor) -> None:
        """One draw per sample, reused for every cell: ``self.noise`` (S, n_subject_tokens, D)."""
        s0, s1 = self.subject_range
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.samples, s1 - s0, embed_out.shape[-1], generator=g, dtype=torch.float32)
        self.noise = (noise * self.noise_std).to(self.device, embed_out.dtype)

    def _corrupted_run(self, reuse_prefix: bool) -> None:
        """The corrupted run: the low score, every block's output and the keys/values, for replay."""
        self._reuse = reuse_prefix
        self._block_extra: tuple = ()
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        shape: dict[str, Any] = {}

        def record_shape(module, args, output):
            shape["extra"] = tuple(output[1:]) if isinstance(output, tuple) else ()

        handle = self.model.get_submodule(self.spec.block(0)).register_forward_hook(record_shape)
        try:
            retain = self.names["hidden"] if reuse_prefix else []
            with TraceDict(self.model, [self.spec.embed, *retain], edit_output=self._corrupt_edit(1)) as td:
                out = self._forward(self.input_ids.expand(self.samples, -1), want_cache=reuse_prefix)
                p = torch.softmax(out.logits[:, -1].float(), dim=-1)
        finally:
            handle.remove()
        self.corrupted_prob = float(p[:, self.answer_id].mean())
        self._corrupted = {n: td[n].output for n in retain}  # name -> (S, T, D)
        if shape.get("extra") and any(x is not None for x in shape["extra"]):
            log.debug("block outputs carry extra tensors; not replaying block prefixes")
            self._reuse = False
        self._block_extra = shape.get("extra", ())
        if self._reuse:
            self._kv = self._cache_tensors(out)

    # -- forward helpers

    def _forward(self, ids: torch.Tensor, *, cache: Any = None, want_cache: bool = False) -> Any:
        kw: dict[str, Any] = {"input_ids": ids, "use_cache": bool(want_cache or cache is not None)}
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1
        if cache is not None:
            kw[cache_kwarg(self.model)] = cache
        return self.model(**kw)

    def _logits(self, ids: torch.Tensor, *, cache: Any = None) -> torch.Tensor:
        return self._forward(ids, cache=cache).logits[:, -1].float()

    def _cache_tensors(self, out: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each layer's (keys, values) from the corrupted run, if the model returned a cache whose
        layers hold every prompt position; ``None`` disables prefix-token reuse."""
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        T = len(self.token_ids)
        if layers is None or len(layers) != self.n_layers:
            log.debug("no per-layer cache returned; not reusing prompt prefixes")
            return None
        kv = []
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if (
                not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor))
                or k.dim() != 4
                or k.shape[-2] != T
            ):
                log.debug("cache layout not understood; not reusing prompt prefixes")
                return None
            kv.append((k, v))
        return kv

    def _prefix_cache(self, t0: int, copies: int) -> Any:
        """A fresh cache holding the corrupted run's keys/values of positions ``< t0``, per row."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(self._kv):
            cache.update(k[:, :, :t0].repeat(copies, 1, 1, 1), v[:, :, :t0].repeat(copies, 1, 1, 1), i)
        return cache

    def _corrupt_edit(self, copies: int, t0: int = 0):
        """Adds the noise to the subject's embeddings; the fed positions start at prompt token ``t0``."""
        s0, s1 = self.subject_range
        a = max(s0, t0)
        noise = self.noise[:, a - s0 :]
        noise = noise.repeat(copies, 1, 1) if copies > 1 else noise  # row c*S + s gets sample s

        def edit(output: Any, name: str) -> Any:
            if name != self.spec.embed or a >= s1:
                return output
            h = _first(output).clone()
            h[:, a - t0 : s1 - t0] += noise
            return _with_first(output, h)

        return edit

    @contextmanager
    def _replay(self, first_layer: int, copies: int, t0: int = 0) -> Iterator[None]:
        """Blocks ``0 .. first_layer-1`` return their recorded corrupted outputs instead of computing."""
        if not self._reuse or first_layer <= 0:
            yield
            return
        h = self._corrupted[self.names["hidden"][first_layer - 1]][:, t0:].repeat(
            copies, 1, 1
        )  # (B, T-t0, D)
        out = (h, *self._block_extra) if self._block_extra else h

        def replayed(*args: Any, **kwargs: Any) -> Any:
            return out

        blocks = [self.model.get_submodule(self.spec.block(i)) for i in range(first_layer)]
        saved = [b.__dict__.get("forward", _MISSING) for b in blocks]
        try:
            for b in blocks:
                b.forward = replayed
            yield
        finally:
            for b, s in zip(blocks, saved):
                if s is _MISSING:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = s

    # -- the batched core

    def window_layers(self, layer: int, window: int) -> range:
        """The reference's window: ``[layer - window // 2, layer + ceil(window / 2))`` within the model."""
        if window < 1:
            raise TraceError(f"window={window}; pass a window of at least 1 layer (the paper uses 10)")
        return range(max(0, layer - window // 2), min(self.n_layers, layer - (-window // 2)))

    def cell_set(
        self, kind: str, token: int, layer: int, *, window: int = DEFAULT_WINDOW
    ) -> list[tuple[int, str]]:
        """The states one heatmap cell restores."""
        if kind == "hidden":
            return [(token, self.names["hidden"][layer])]
        return [(token, self.names[kind][i]) for i in self.window_layers(layer, window)]

    def probabilities(
        self, sets: Sequence[Sequence[tuple[int, str]]], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """The answer's probability (mean over the noise samples) with each set of states restored.

        Many sets go into one forward pass (``batch_size`` corrupted rows, ``samples`` per set). With
        ``reuse_prefix``, a pass starts at the lowest layer and the first token its sets restore:
        lower blocks replay their corrupted outputs and earlier tokens come from the corrupted run's
        key/value cache, since nothing restored can change them (attention is causal).
        """
        T = len(self.token_ids)
        first: list[int] = []
        start: list[int] = []
        for st in sets:
            layers, toks = [self.n_layers], [T - 1]
            for t, name in st:
                if name not in self.layer_of:
                    raise TraceError(
                        f"cannot restore '{name}': only block, MLP and attention outputs are traced"
                    )
                if name not in self.clean:
                    raise TraceError(f"'{name}' was not recorded; include its kind in kinds=")
                if not -T <= t < T:
                    raise TraceError(f"token {t} is out of range; the prompt has {T} tokens")
                layers.append(self.layer_of[name])
                toks.append(t % T)
            first.append(min(layers))
            start.append(min(toks) if self._kv is not None else 0)
        per = max(1, batch_size // self.samples)
        groups: dict[int, list[int]] = defaultdict(list)  # same first token: one cache prefix
        for i in range(len(sets)):
            groups[start[i]].append(i)
        out = np.empty(len(sets), dtype=np.float64)
        with torch.no_grad(), eval_mode(self.model):
            for t0, members in sorted(groups.items()):
                members.sort(key=lambda i: first[i])  # a chunk replays the blocks below its lowest layer
                n_chunks = -(-len(members) // per)
                size = -(-len(members) // n_chunks)  # balanced chunks
                for k in range(0, len(members), size):
                    chunk = members[k : k + size]
                    p = self._run([sets[i] for i in chunk], min(first[i] for i in chunk), t0)
                    out[chunk] = p.mean(dim=1).double().cpu().numpy()
        return out

    def _run(self, sets: Sequence[Sequence[tuple[int, str]]], first_layer: int, t0: int = 0) -> torch.Tensor:
        S, n = self.samples, len(sets)
        T = len(self.token_ids)
        rows: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for c, st in enumerate(sets):
            for t, name in st:
                r, tt = rows[name]
                r.extend(range(c * S, (c + 1) * S))
                tt.extend([t % T] * S)
        index = {}  # on each module's own device (a device map may spread the blocks)
        for name, (r, tt) in rows.items():
            dev = self.clean[name].device
            index[name] = (
                torch.tensor(r, device=dev),
                torch.tensor(tt, device=dev) - t0,  # position in the fed tokens
                self.clean[name][torch.tensor(tt, device=dev)],  # (k, D) clean values
            )
        corrupt = self._corrupt_edit(n, t0)

        def edit(output: Any, name: str) -> Any:
            if name == self.spec.embed:
                return corrupt(output, name)
            r, pos, value = index[name]
            h = _first(output).index_put((r, pos), value)  # out of place
            return _with_first(output, h)

        cache = self._prefix_cache(t0, n) if t0 > 0 else None
        with TraceDict(self.model, [self.spec.embed, *index], retain_output=False, edit_output=edit):
            with self._replay(first_layer, n, t0):
                logits = self._logits(self.input_ids[:, t0:].expand(n * S, -1), cache=cache)
        return torch.softmax(logits, dim=-1)[:, self.answer_id].view(n, S)

    def scores(
        self, kind: str, *, window: int = DEFAULT_WINDOW, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """The heatmap ``(n_tokens, n_layers)``: the answer's probability with cell ``(t, l)`` restored."""
        (kind,) = _check_kinds([kind])
        T, L = len(self.token_ids), self.n_layers
        s0 = self.subject_range[0]
        out = np.full((T, L), self.corrupted_prob, dtype=np.float64)  # tokens before the subject: no effect
        cells = [(t, layer) for t in range(s0, T) for layer in range(L)]
        sets = [self.cell_set(kind, t, layer, window=window) for t, layer in cells]
        probs = self.probabilities(sets, batch_size=batch_size)
        for (t, layer), p in zip(cells, probs):
            out[t, layer] = p
        return out


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise TraceError(
            f"unknown kind(s) {', '.join(map(repr, bad)) or '(none)'}; choose from {', '.join(KINDS)}"
        )
    return kinds


# ------------------------------------------------------------------------------------- results


@dataclass
class TraceResult:
    """Causal tracing of one prompt. ``scores[kind]`` is ``(n_tokens, n_layers)``: the probability
    of the answer's first token with that cell restored (mean over the noise samples)."""

    prompt: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]  # [start, end) token indices
    answer: str  # decoded first answer token (the measured one)
    answer_id: int
    answer_ids: list[int]  # every token of the target; only the first is measured
    target: str | None  # None: the answer is the clean run's top prediction
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, np.ndarray]
    n_layers: int
    samples: int
    window: int
    noise: dict[str, Any]  # {"std", "multiplier", "embedding_std": {"value", "source", "n_tokens"}}
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # the whole trace, noise-std measurement included
    timings: dict[str, float] = field(default_factory=dict)  # seconds per kind

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k in self.scores)

    @property
    def last_subject_token(self) -> int:
        return self.subject_range[1] - 1

    @property
    def total_effect(self) -> float:
        return self.clean_prob - self.corrupted_prob

    def indirect_effect(self, kind: str) -> np.ndarray:
        return self.scores[kind] - self.corrupted_prob

    @property
    def suggested_layer(self) -> int | None:
        """The layer where the MLP effect at the last subject token peaks (centre of the window);
        ``None`` when the MLP kind was not traced."""
        if "mlp" not in self.scores:
            return None
        return int(np.argmax(self.scores["mlp"][self.last_subject_token]))

    def no_effect_note(self) -> str:
        """Why restorations show nothing when the noise does not lower the answer's probability."""
        return (
            f"note: the noise does not lower p({self.answer.strip()}) ({self.clean_prob:.4f} clean, "
            f"{self.corrupted_prob:.4f} corrupted), so restorations cannot show where the model recalls it; "
            "trace an answer the model gives"
        )

    def weak_subject_note(self) -> str | None:
        """A warning when the MLP effect at the last subject token (where ROME edits) is weak and the
        strongest MLP effect lies at another token; ``None`` otherwise or without the MLP kind."""
        if self.suggested_layer is None:
            return None
        ie = self.scores["mlp"][self.last_subject_token, self.suggested_layer] - self.corrupted_prob
        t, layer, best = self.strongest("mlp")
        if not (self.total_effect > 0 and ie < 0.1 * self.total_effect and t != self.last_subject_token):
            return None
        return (
            f"note: the MLP effect at the last subject token is weak for this prompt ({ie:.4f} of a total "
            f"effect of {self.total_effect:.4f}); the strongest MLP effect is at token {t} {self.tokens[t]!r}, "
            f"layer {layer} ({best:.4f}). ROME edits at the last subject token: check the average over "
            "many facts (--known) before choosing a layer"
        )

    def strongest(self, kind: str) -> tuple[int, int, float]:
        """``(token, layer, indirect effect)`` of the cell with the largest effect for ``kind``."""
        ie = self.indirect_effect(kind)
        t, layer = divmod(int(np.argmax(ie)), ie.shape[1])
        return t, layer, float(ie[t, layer])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": TRACE_FORMAT,
            "model": self.model,
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "subject_range": list(self.subject_range),
            "answer": {
                "token": self.answer,
                "id": self.answer_id,
                "target": self.target,
                "ids": self.answer_ids,
            },
            "measured": "probability of the answer's first token at the last prompt position",
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "total_effect": self.total_effect,
            "suggested_layer": self.suggested_layer,
            "n_layers": self.n_layers,
            "samples": self.samples,
            "window": self.window,
            "noise": self.noise,
            "seed": self.seed,
            "seconds": self.seconds,
            "timings": self.timings,
            "kinds": list(self.kinds),
            "scores": {k: self.scores[k].tolist() for k in self.kinds},
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceResult:
        if d.get("format") != TRACE_FORMAT:
            raise TraceError(f"not a rompatch trace (format {d.get('format')!r}, expected {TRACE_FORMAT!r})")
        a = d["answer"]
        return cls(
            prompt=d["prompt"],
            subject=d["subject"],
            tokens=list(d["tokens"]),
            token_ids=[int(i) for i in d["token_ids"]],
            subject_range=(int(d["subject_range"][0]), int(d["subject_range"][1])),
            answer=a["token"],
            answer_id=int(a["id"]),
            answer_ids=[int(i) for i in a["ids"]],
            target=a.get("target"),
            clean_prob=float(d["clean_prob"]),
            corrupted_prob=float(d["corrupted_prob"]),
            scores={k: np.asarray(v, dtype=np.float64) for k, v in d["scores"].items()},
            n_layers=int(d["n_layers"]),
            samples=int(d["samples"]),
            window=int(d["window"]),
            noise=dict(d["noise"]),
            seed=int(d.get("seed", 0)),
            model=dict(d.get("model") or {}),
            seconds=float(d.get("seconds", 0.0)),
            timings={k: float(v) for k, v in (d.get("timings") or {}).items()},
        )


@dataclass(frozen=True)
class TraceSettings:
    """How each fact is traced: the keyword arguments of ``trace_fact`` that ``trace_known`` shares
    (see ``trace_fact`` for their meaning)."""

    samples: int = DEFAULT_SAMPLES
    noise: float = DEFAULT_NOISE
    noise_std: float | None = None
    embed_std: EmbeddingStd | None = None
    window: int = DEFAULT_WINDOW
    kinds: Sequence[str] = KINDS
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0

    def checked(self) -> TraceSettings:
        """These settings with the kinds deduplicated; an error naming the fix for a bad value."""
        kinds = _check_kinds(self.kinds)
        if self.window < 1:
            raise TraceError(f"window={self.window}; pass a window of at least 1 layer (the paper uses 10)")
        if self.batch_size < 1:
            raise TraceError(f"batch_size={self.batch_size}; pass at least 1")
        return replace(self, kinds=kinds)


def trace_fact(
    model: Any,
    tok: Any,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    spec: ModelSpec | None = None,
    reuse_prefix: bool = True,
    **settings: Any,
) -> TraceResult:
    """Causal tracing of one fact: where in the network does ``prompt`` recall its answer?

    ``prompt`` holds the subject (or a ``{}`` where it goes). The answer is the model's top next
    token, or the first token of ``target`` (tokenized as editing does). ``settings`` are the fields
    of ``TraceSettings``: ``samples`` noise draws; ``noise``, a multiple of the embedding std
    (measured on WikiText-2, or pass ``embed_std``), or ``noise_std``, an absolute std; ``window``:
    layers restored together for the ``mlp``/``attn`` kinds; ``kinds``; ``batch_size``: corrupted
    rows per forward pass; ``seed``. Returns arrays; ``rompatch.tracing.plotting`` draws them.
    """
    t0 = time.perf_counter()
    if "{}" in prompt:
        prompt = prompt.replace("{}", subject, 1)
    options = TraceSettings(**settings).checked()
    subject_range(tok, prompt, subject)  # fail before measuring anything
    noise = resolve_noise(model, tok, options, fallback_texts=[prompt], spec=spec)
    return trace_prompt(
        model,
        tok,
        prompt,
        subject,
        options,
        noise,
        target=target,
        spec=spec,
        reuse_prefix=reuse_prefix,
        t0=t0,
    )


def trace_prompt(
    model: Any,
    tok: Any,
    prompt: str,
    subject: str,
    settings: TraceSettings,
    noise: Noise,
    *,
    target: str | None = None,
    spec: ModelSpec | None = None,
    reuse_prefix: bool = True,
    t0: float | None = None,
) -> TraceResult:
    """``trace_fact`` with checked settings and a resolved noise (the subject written in ``prompt``);
    ``t0``: when the trace started (``perf_counter``), for ``seconds``."""
    t0 = time.perf_counter() if t0 is None else t0
    tracer = CausalTracer(
        model,
        tok,
        prompt,
        subject,
        noise_std=noise.std,
        target=target,
        samples=settings.samples,
        seed=settings.seed,
        kinds=settings.kinds,
        spec=spec,
        reuse_prefix=reuse_prefix,
    )
    scores, timings = {}, {}
    for kind in settings.kinds:
        tk = time.perf_counter()
        scores[kind] = tracer.scores(kind, window=settings.window, batch_size=settings.batch_size)
        timings[kind] = round(time.perf_counter() - tk, 3)
        log.info("traced %s for %r in %.1f s", kind, prompt, timings[kind])
    return TraceResult(
        prompt=prompt,
        subject=subject,
        tokens=tracer.tokens,
        token_ids=tracer.token_ids,
        subject_range=tracer.subject_range,
        answer=tracer.answer,
        answer_id=tracer.answer_id,
        answer_ids=tracer.answer_ids,
        target=target,
        clean_prob=tracer.clean_prob,
        corrupted_prob=tracer.corrupted_prob,
        scores=scores,
        n_layers=tracer.n_layers,
        samples=tracer.samples,
        window=int(settings.window),
        noise=noise.record,
        seed=int(settings.seed),
        model=model_identity(model),
        seconds=round(time.perf_counter() - t0, 3),
        timings=timings,
    )


# ------------------------------------------------------------------------------------- writers


def write_json(path: Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def save_trace(result: TraceResult, out_dir: str | os.PathLike, *, name: str = "scores") -> list[Path]:
    """Write ``<name>.json`` (everything) and ``<name>.npz`` (arrays plus the JSON as ``meta``)."""
    out = Path(out_dir)
    d = result.to_dict()
    arrays: dict[str, np.ndarray] = {
        "token_ids": np.asarray(result.token_ids, dtype=np.int64),
        "subject_range": np.asarray(result.subject_range, dtype=np.int64),
        "answer_id": np.asarray(result.answer_id, dtype=np.int64),
        "clean_prob": np.asarray(result.clean_prob),
        "corrupted_prob": np.asarray(result.corrupted_prob),
        "meta": np.asarray(json.dumps({k: v for k, v in d.items() if k != "scores"}, ensure_ascii=False)),
    }
    for k in result.kinds:
        arrays[f"scores_{k}"] = result.scores[k]
        arrays[f"effect_{k}"] = result.indirect_effect(k)
    return [write_json(out / f"{name}.json", d), write_npz(out / f"{name}.npz", arrays)]


def load_trace(path: str | os.PathLike) -> TraceResult:
    """Read a trace written by ``save_trace`` (its ``.json``, or the folder holding ``scores.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "scores.json"
    try:
        return TraceResult.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise TraceError(f"{p} not found; pass a scores.json written by `rompatch trace`") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TraceError(f"{p} is not a valid trace ({e}); write it again with `rompatch trace`") from None
