"""ROME (Meng et al. 2022): key k*, value v*, and the rank-one update, as in the paper.

    k*  = the subject's key averaged over context templates (the bare prompt weighs
          key_prompt_weight, the templates share the rest)
    δ   = argmin  NLL(target | prompts, MLP output + c_i δ at the subject) + KL essence + weight decay,
          with ‖δ‖ clamped to clamp_norm_factor · ‖W k*‖; c_i = (u·k_i)/(u·k*) is what the shipped
          update applies at template i ("per_key"; the paper's c_i = 1 is value_scaling="uniform")
    u   = C⁻¹ k* / ‖C⁻¹ k*‖            (C = E[k kᵀ], the second moment; ON by default)
    v   = δ / (u · k*)                  so that  W' k* = W k* + δ = v*

The same averaged key k* is used in u and in the denominator (the r-ROME fix for the reference
code's "disabling edits", whose denominator used a different key than u and could blow up).

Speed: the layers below the edited one are run once per edit, and so is every token before each
row's subject (into a key/value cache), since δ cannot change them; each optimisation step replays
only the blocks from the edited layer up, on the tokens from the subject on, and applies the LM
head only at the positions a loss reads. Weights are frozen, so backward computes activation
gradients only. The replay is checked against a plain full forward once per edit, with fallbacks
(see ``_Replay``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .arch import EditTarget, ModelSpec, default_neighbours, get_spec
from .context import context_templates
from .errors import RequestError
from .fingerprint import TensorMemo
from .hooks import Trace
from .models import cache_kwarg
from .neighbours import fits, near_names, neighbour_pairs
from .opening import OPENING, OPENING_MIN_P, added, opens_with_subject
from .placement import input_device, param_value
from .request import EditRequest
from .stats import SecondMoment, max_positions
from .tokens import pad_id, pad_right, subject_span, target_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ROMEHyperParams:
    """Every knob of the edit; all of it is recorded in the patch."""

    layer: int | None = None  # None: the architecture's default layer
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    early_stop_on: str = (
        "nll"  # "nll": stop once the target NLL < early_stop_loss; "total": ROME's total loss
    )
    context_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    kl_prompt: str = "{} is a"
    mom2_adjustment: bool = True
    mom2_ridge: float = 0.0  # relative ridge (× mean eigenvalue) added to C before solving; 0 = exact
    seed: int = 0
    key_prompt_weight: float = 0.5  # share of the requested prompt's own key ("{}") in k*; the
    # context templates share the rest equally (1/n_templates gives the plain average)
    max_update_ratio: float = 1.0  # ‖v uᵀ‖₂ ≤ this × ‖W‖₂ (projected during the optimisation); 0: off
    value_scaling: str = "per_key"  # "per_key": δ·(u·k_i)/(u·k*) at template i, what the shipped
    # update applies there; "uniform": δ at every template, as in the paper
    optim_autocast: str = (
        "none"  # "none" or "bfloat16": autocast for the δ optimisation only (u, v stay fp32)
    )
    # Protection (AlphaEdit-style, exact): u is kept orthogonal to the keys of the patches already
    # applied to the model (at this matrix) and to the protect_principal top eigenvectors of C, so
    # the update changes nothing there. Off by default.
    protect: bool = False
    protect_principal: int = 32
    # Neighbours (rompatch.neighbours): up to this many names the model writes next to the subject;
    # u is kept orthogonal to their keys in the edit's prompt, so the update leaves those subjects
    # unchanged there. Names whose key is nearly the subject's own (|C⁻¹-cosine| above
    # neighbour_max_cosine: aliases, not neighbours) are left out. 0: off. None: the model's default
    # (arch.default_neighbours: on only where it measurably won), fixed by ``resolved``.
    neighbours: int | None = None
    neighbour_max_cosine: float = 0.9
    # An edit kept away from its neighbours whose update ends at the size cap with P(target) on its
    # prompt below this has missed its fact: it lets go of the half of its names whose keys are most
    # like the subject's (they push u furthest from k*), then of all of them, and keeps the attempt
    # with the highest P(target). 0: never let go.
    neighbour_min_p: float = 0.5
    # A prompt that opens with a multi-token subject on a tokenizer without BOS, missed by the edit
    # (P(target) < opening.OPENING_MIN_P after the value optimisation): add a second delta keyed at
    # that prompt, orthogonal to the context templates' keys (rompatch.opening).
    opening_delta: bool = True

    def __post_init__(self) -> None:
        choices = {
            "value_scaling": ("per_key", "uniform"),
            "optim_autocast": ("none", "bfloat16"),
            "early_stop_on": ("nll", "total"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RequestError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.max_update_ratio < 0:
            raise RequestError(f"max_update_ratio must be >= 0 (0 disables it), not {self.max_update_ratio}")
        if self.protect_principal < 0:
            raise RequestError(f"protect_principal must be >= 0, not {self.protect_principal}")
        if self.neighbours is not None and self.neighbours < 0:
            raise RequestError(f"neighbours must be >= 0 (0 disables it), not {self.neighbours}")
        if not 0.0 < self.neighbour_max_cosine <= 1.0:
            raise RequestError(f"neighbour_max_cosine must be in (0, 1], not {self.neighbour_max_cosine}")
        if not 0.0 <= self.neighbour_min_p <= 1.0:
            raise RequestError(
                f"neighbour_min_p must be in [0, 1] (0: never let go), not {self.neighbour_min_p}"
            )
        if not 0.0 <= self.key_prompt_weight <= 1.0:
            raise RequestError(f"key_prompt_weight must be in [0, 1], not {self.key_prompt_weight}")

    def resolved(self, model: Any, target: EditTarget) -> ROMEHyperParams:
        """These hyperparameters with the model's defaults filled in: the layer of ``target``, and
        ``neighbours`` where it is None. What an edit records is always resolved."""
        near = default_neighbours(model, target.spec) if self.neighbours is None else self.neighbours
        return dataclasses.replace(self, layer=target.layer, neighbours=near)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["context_length_params"] = [list(x) for x in self.context_length_params]
        return d


@dataclass
class EditResult:
    """What ``compute_delta`` produced: the rank-one factors plus diagnostics."""

    u: torch.Tensor
    v: torch.Tensor
    layer: int
    parameter: str
    hparams: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    key: torch.Tensor | None = None  # k*, float32 on the CPU: where ΔW k* = δ holds
    opening: EditResult | None = None  # the second delta of a prompt that opens with its subject


# ------------------------------------------------------------------------------------ prompts


@dataclass
class _Prompts:
    seqs: list[list[int]]  # rewriting prompts (+ target minus last token), then the KL prompt
    subj_idx: list[int]  # subject's last token per sequence
    target: list[int]
    n_rewrite: int
    target_how: str


def _build_prompts(tok: Any, req: EditRequest, templates: Sequence[str], hp: ROMEHyperParams) -> _Prompts:
    tgt, how = target_ids(tok, req.text, req.target_new)
    seqs, idx = [], []
    for t in templates:
        full = t.replace("{}", req.prompt)
        text, _, last = subject_span(tok, full, req.subject)
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        seqs.append(ids + tgt[:-1])
        idx.append(last)
    kl_text, _, kl_last = subject_span(tok, hp.kl_prompt, req.subject)
    seqs.append(list(tok(kl_text, add_special_tokens=True)["input_ids"]))
    idx.append(kl_last)
    return _Prompts(seqs, idx, tgt, len(templates), how)


# A request's prompt (subject filled in) and target may have at most this many tokens, or half the
# model's context if that is less. The edit runs the prompt behind 20 context templates and through 25
# optimisation steps, so time and memory grow with its length (a 10,000-character prompt ran for 900 s
# and reached 6.9 GB on SmolLM2); fact prompts are one sentence (the longest CounterFact prompt,
# paraphrases included, has 44 SmolLM2 tokens).
MAX_PROMPT_TOKENS = 256


def prompt_token_limit(model: Any) -> int:
    """The most tokens a request's prompt with its target may have on ``model``: ``MAX_PROMPT_TOKENS``,
    or half the model's context where that is less (room for the context-template prefix)."""
    return max(1, min(MAX_PROMPT_TOKENS, max_positions(model) // 2))


def validate_request(tok: Any, req: EditRequest, *, max_tokens: int | None = None) -> None:
    """Cheap checks before any heavy work: subject present in the prompt's tokens, target non-empty,
    and (``max_tokens``, see ``prompt_token_limit``) the prompt with its longest target short enough."""
    if max_tokens is not None:  # first: tokenizing is cheap, but the checks below scan the prompt
        n = len(tok(req.text, add_special_tokens=True)["input_ids"])
        if n > max_tokens:
            raise RequestError(
                f"the prompt {req.text[:40]!r}... has {n} tokens, over the limit of {max_tokens} for this "
                f"model (min({MAX_PROMPT_TOKENS}, half its context)); shorten the prompt to the sentence that "
                "states the fact"
            )
    subject_span(tok, req.prompt, req.subject)
    longest = max(
        len(target_ids(tok, req.text, t)[0]) for t in (req.target_new, req.target_true) if t is not None
    )
    if max_tokens is not None and n + longest > max_tokens:
        raise RequestError(
            f"the prompt {req.text[:40]!r} with its target has {n + longest} tokens, over the limit of "
            f"{max_tokens} for this model; shorten the prompt or the target"
        )


def usable_templates(tok: Any, req: EditRequest, templates: Sequence[str]) -> tuple[list[str], list[str]]:
    """Drop templates that put the subject's last token at position 0.

    Without a BOS token, position 0 is the attention sink: its key is an outlier that is nearly
    orthogonal to the same subject's key anywhere else and ~0.9-cosine-similar to every other
    first token's key. An update keyed there cannot be specific (it would fire on any prompt that
    starts with a one-token subject), so such templates are left out and the choice is recorded.
    """
    keep, dropped = [], []
    for t in templates:
        _, _, last = subject_span(tok, t.replace("{}", req.prompt), req.subject)
        (dropped if last == 0 else keep).append(t)
    if dropped:
        log.warning(
            "subject %r is the first token of %r (no BOS): its position-0 key is the attention sink and "
            "cannot be edited specifically; the bare prompt is left out of the optimisation",
            req.subject,
            req.prompt,
        )
    if not keep:
        raise RequestError(f"no usable context for subject {req.subject!r} in {req.prompt!r}")
    return keep, dropped


# ---------------------------------------------------------------------------------------- keys


@torch.no_grad()
def subject_keys(
    model: Any,
    tok: Any,
    subject: str,
    layer: int,
    templates: Sequence[str],
    *,
    spec: ModelSpec | None = None,
) -> torch.Tensor:
    """The edited matrix's input at the subject's last token in each template ('... {} ...'), (n, in) fp32."""
    return filled_keys(model, tok, [(t, subject) for t in templates], layer, spec=spec)


@torch.no_grad()
def filled_keys(
    model: Any,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    layer: int,
    *,
    spec: ModelSpec | None = None,
) -> torch.Tensor:
    """The edited matrix's input at the subject's last token of each (template, subject), (n, in) fp32."""
    spec = get_spec(model, spec)
    device = input_device(model)
    seqs, idx = [], []
    for t, subject in pairs:
        text, _, last = subject_span(tok, t, subject)
        seqs.append(list(tok(text, add_special_tokens=True)["input_ids"]))
        idx.append(last)
    batch = pad_right(seqs, pad_id(tok)).to(device)
    with Trace(model, spec.mlp_out_module(layer), retain_input=True, retain_output=False, stop=True) as tr:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    k = tr.input  # on the edited layer's device
    return k[torch.arange(len(seqs), device=k.device), torch.tensor(idx, device=k.device)].float()


def averaged_key(keys: torch.Tensor, templates: Sequence[str], prompt_weight: float) -> torch.Tensor:
    """k* from per-template keys: the bare prompt ("{}") weighs ``prompt_weight``, the rest share the remainder.

    Without BOS, a subject among the prompt's first tokens has a key far from the same subject's key
    after context (cosine ~0.45 on SmolLM2); a plain average then reaches the prompt the user asked
    to edit at only ~25% of the strength it reaches the templates. Weighting the prompt's own key
    keeps the update aimed at that prompt while the templates still give it generality.
    """
    if "{}" not in templates or len(templates) == 1:
        return keys.mean(0)
    i = list(templates).index("{}")
    rest = torch.cat([keys[:i], keys[i + 1 :]]).mean(0)
    return prompt_weight * keys[i] + (1 - prompt_weight) * rest


def compute_key(
    model: Any,
    tok: Any,
    req: EditRequest,
    layer: int,
    templates: Sequence[str],
    *,
    spec: ModelSpec | None = None,
    prompt_weight: float | None = None,
) -> torch.Tensor:
    """k*: the edited matrix's input at the subject's last token over ``templates`` (float32).

    ``prompt_weight`` as in :func:`averaged_key`; None gives the plain average.
    """
    filled = [t.replace("{}", req.prompt) for t in templates]
    keys = subject_keys(model, tok, req.subject, layer, filled, spec=spec)
    return keys.mean(0) if prompt_weight is None else averaged_key(keys, templates, prompt_weight)


# -------------------------------------------------------------------------------------- values


def forward_hidden(model: Any, **inputs: Any) -> None:
    """A forward pass whose LM head runs at the last position only (hooks read what they need)."""
    try:
        model(**inputs, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        model(**inputs)


class _Replay:
    """The δ optimisation's forward: only what δ can change, with the head at the read positions.

    δ is added to the edited layer's MLP output at each row's subject token ``s``. Nothing before
    ``s`` can change, and nothing below the edited layer, so rows are laid out with their prefix
    (positions < s) left-padded and their suffix (positions >= s) right-padded: the subject sits at
    column P in every row. The prefix runs once into a key/value cache; each optimisation step then
    replays blocks ``layer..N-1`` on the suffix columns only (a few tokens a row instead of the
    whole template), from the block inputs captured on a no-grad run. The LM head runs only at the
    positions a loss reads.

    Modes, checked in order against a plain full forward of the right-padded batch: ``suffix``
    (as above), ``blocks`` (replay every column of the split layout from the edited layer), ``full``
    (a plain full forward of the right-padded batch per step, δ at each row's own subject column).
    Tolerance: 1e-3 of the logit scale in float32; in half precision 4 roundings per √depth, since
    two equivalent bf16 forwards of a deep model differ by that much (0.2 of a logit scale ~5 on a
    32-layer Llama-7B shape, where a fixed 4 roundings rejected an exact replay).
    """

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
        layer: int,
        seqs: Sequence[Sequence[int]],
        subj_idx: Sequence[int],
        reads: Sequence[tuple[int, int]],
        pad: int,
        device: torch.device,
    ) -> None:
        self.model, self.spec, self.layer = model, spec, layer
        self.blocks = model.get_submodule(spec.layers)
        self.norm = model.get_submodule(spec.final_norm)
        self.head = model.get_submodule(spec.lm_head)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.device = device  # ids, indices and the returned logits; blocks may sit elsewhere (device map)
        B = len(seqs)
        # Reference: a plain forward of the right-padded batch, head at the read positions.
        plain = pad_right(seqs, pad).to(device)
        with torch.no_grad(), Trace(model, spec.final_norm) as normed:
            forward_hidden(
                model, input_ids=plain.input_ids, attention_mask=plain.attention_mask, use_cache=False
            )
        rows = torch.tensor([r for r, _ in reads], device=device)
        self.plain_ids, self.plain_mask = plain.input_ids, plain.attention_mask
        self.plain_cols = torch.tensor([p for _, p in reads], device=device)
        h = normed.output
        self.full_logits = self._head(h[rows.to(h.device), self.plain_cols.to(h.device)])
        # Split layout: [left pad | prefix | suffix | right pad], the subject at column P.
        P = max(subj_idx)
        S = max(len(s) - i for s, i in zip(seqs, subj_idx))
        self.P = P
        ids = torch.full((B, P + S), pad, dtype=torch.long)
        mask = torch.zeros((B, P + S), dtype=torch.long)
        pos = torch.zeros((B, P + S), dtype=torch.long)
        for r, (s, i) in enumerate(zip(seqs, subj_idx)):
            a = P - i
            ids[r, a : a + len(s)] = torch.tensor(list(s))
            mask[r, a : a + len(s)] = 1
            pos[r, a : a + len(s)] = torch.arange(len(s))
        self.ids, self.mask, self.pos = ids.to(device), mask.to(device), pos.to(device)
        self.read_rows = rows
        self.read_cols = torch.tensor([p - subj_idx[r] + P for r, p in reads], device=device)
        for mode in ("suffix", "blocks"):
            try:
                if self._prepare(mode):
                    break
            except Exception as e:  # an architecture whose blocks or cache do not replay this way
                log.debug("replay mode %s unavailable: %s", mode, e)
        else:
            self.mode = "full"
        # Per row, the column where δ enters: 0 in the suffix, P in the split layout, else the subject's.
        cols = {"suffix": [0] * B, "blocks": [P] * B, "full": list(subj_idx)}[self.mode]
        self.edit_col = torch.tensor(cols, device=device)
        self.width = {"suffix": S, "blocks": P + S, "full": plain.input_ids.shape[1]}[self.mode]

    # -- set-up ---------------------------------------------------------------------------------

    def _prepare(self, mode: str) -> bool:
        P = self.P
        kw: dict[str, Any] = {"use_cache": False}
        cols = slice(0, None)
        if mode == "suffix":
            if P == 0:
                return False
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            cache_kw = cache_kwarg(self.model)
            pre_mask = self.mask[:, :P].clone()
            pre_mask[pre_mask.sum(1) == 0] = 1  # a row with no prefix: keep its (unread) pads finite
            with torch.no_grad():
                self.model(
                    input_ids=self.ids[:, :P],
                    attention_mask=pre_mask,
                    position_ids=self.pos[:, :P],
                    use_cache=True,
                    **{cache_kw: cache},
                )
            self.cache = cache
            self.cache_state = [dict(vars(lay)) for lay in cache.layers]
            kw = {"use_cache": True, cache_kw: cache}
            cols = slice(P, None)
        self.calls: dict[int, tuple[tuple, dict]] = {}
        handles = []

        def capture(j):
            def hook(mod, args, kwargs):
                self.calls[j] = (args, kwargs)

            return hook

        for j in range(self.layer, len(self.blocks)):
            handles.append(self.blocks[j].register_forward_pre_hook(capture(j), with_kwargs=True))
        try:
            with torch.no_grad():
                forward_hidden(
                    self.model,
                    input_ids=self.ids[:, cols],
                    attention_mask=self.mask,
                    position_ids=self.pos[:, cols],
                    **kw,
                )
        finally:
            for h in handles:
                h.remove()
        if len(self.calls) != len(self.blocks) - self.layer:
            return False
        self.mode = mode  # run() replays in this mode; the caller falls back if it is rejected
        with torch.no_grad():
            got = self.run()
        diff = (got - self.full_logits).abs().max().item()
        ok = diff <= replay_tolerance(self.head.weight.dtype, len(self.blocks)) * max(
            self.full_logits.abs().max().item(), 1.0
        )
        if not ok:
            log.warning("replay mode %s differs from a full forward by %.3g; trying the next", mode, diff)
        return ok

    # -- per step -------------------------------------------------------------------------------

    def run(self) -> torch.Tensor:
        """Logits (P_reads, V) at the read positions, with whatever edit hooks are active."""
        if self.mode == "full":
            out = self.model(input_ids=self.plain_ids, attention_mask=self.plain_mask, use_cache=False)
            lg = out.logits
            return lg[self.read_rows.to(lg.device), self.plain_cols.to(lg.device)].float().to(self.device)
        if self.mode == "suffix":
            for lay, state in zip(self.cache.layers, self.cache_state):
                lay.__dict__.update(state)  # back to the prefix-only cache
        h = self.calls[self.layer][0][0]
        for j in range(self.layer, len(self.blocks)):
            args, kwargs = self.calls[j]
            out = self.blocks[j](h, *args[1:], **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        cols = self.read_cols - (self.P if self.mode == "suffix" else 0)
        h = self.norm(h)
        return self._head(h[self.read_rows.to(h.device), cols.to(h.device)])

    def _head(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head (and Gemma-2 style soft-capping) on already-selected positions."""
        logits = self.head(normed).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.to(self.device)


def replay_tolerance(dtype: torch.dtype, depth: int) -> float:
    """Largest |replay − plain forward| accepted, as a fraction of the logit scale.

    Layout and caching change the order of reductions. In float32 that stays far below 1e-3; in
    half precision every block rounds its output, so allow 4 roundings per √depth.
    """
    return max(1e-3, 4 * torch.finfo(dtype).eps * math.sqrt(depth))


@contextmanager
def _frozen(model: Any):
    """Freeze parameters (no weight gradients) and restore flags and mode afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(training)


def compute_value(
    model: Any,
    tok: Any,
    req: EditRequest,
    layer: int,
    templates: Sequence[str],
    k_star: torch.Tensor,
    hp: ROMEHyperParams,
    *,
    spec: ModelSpec | None = None,
    progress: Any = None,
    scales: torch.Tensor | None = None,
    max_delta_norm: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Optimise δ for one request; return (δ, W k*, diagnostics). See ``compute_values``."""
    (out,) = compute_values(
        model,
        tok,
        [ValueTask(req, templates, k_star, scales, max_delta_norm)],
        layer,
        hp,
        spec=spec,
        progress=progress,
    )
    return out


# Edits whose δ are optimised in one batch of forward and backward passes, by device. A GPU is
# under-used by one edit's dozen short prompts, so sharing passes pays; on a CPU the passes are
# compute-bound and the padding of prompts of different lengths makes shared passes slower
# (bench/RESULTS.md, "Many edits"), so edits run one at a time there.
CHUNK = {"cuda": 16, "cpu": 1}


def default_chunk(model: Any) -> int:
    """``CHUNK`` for the device ``model`` is on (16 on CUDA, 1 elsewhere)."""
    return CHUNK.get(input_device(model).type, 1)


@dataclass
class _Rows:
    """The replayed rows of some of a batch's tasks (``members``): each task's prompts, where its δ
    enters (``subj_mask``, ``row_task``), and which logits and labels its loss reads (``spans``:
    task -> (first read, stop, first label))."""

    members: list[int]
    replay: _Replay
    subj_mask: torch.Tensor
    row_task: torch.Tensor
    labels: torch.Tensor
    spans: dict[int, tuple[int, int, int]]

    @classmethod
    def of(
        cls,
        model: Any,
        spec: ModelSpec,
        layer: int,
        tok: Any,
        prs: Sequence[_Prompts],
        tasks: Sequence[ValueTask],
        members: list[int],
        device: torch.device,
    ) -> _Rows:
        seqs, subj_idx, reads, labels, row_task, scales = [], [], [], [], [], []
        spans: dict[int, tuple[int, int, int]] = {}
        for e in members:
            pr, t = prs[e], tasks[e]
            r_reads, r_labels = _read_positions(pr)
            spans[e] = (len(reads), len(reads) + len(r_reads), len(labels))
            reads += [(len(seqs) + r, c) for r, c in r_reads]
            labels += r_labels
            seqs += pr.seqs
            subj_idx += pr.subj_idx
            row_task += [e] * len(pr.seqs)
            scales.append(torch.ones(len(pr.seqs)) if t.scales is None else t.scales.float().cpu())
        replay = _Replay(model, spec, layer, seqs, subj_idx, reads, pad_id(tok), device)
        subj_mask = torch.zeros((len(seqs), replay.width, 1), device=device)
        subj_mask[torch.arange(len(seqs), device=device), replay.edit_col] = torch.cat(scales).to(device)[
            :, None
        ]
        return cls(
            members=list(members),
            replay=replay,
            subj_mask=subj_mask,
            row_task=torch.tensor(row_task, device=device),
            labels=torch.tensor(labels, device=device),
            spans=spans,
        )


@dataclass
class ValueTask:
    """One request's δ optimisation: its usable templates, k*, the per-template scales of δ (then
    one for the KL prompt; None: unscaled, as the paper does) and a bound on ‖δ‖."""

    req: EditRequest
    templates: Sequence[str]
    k_star: torch.Tensor
    scales: torch.Tensor | None = None
    max_delta_norm: float = math.inf


def compute_values(
    model: Any,
    tok: Any,
    tasks: Sequence[ValueTask],
    layer: int,
    hp: ROMEHyperParams,
    *,
    spec: ModelSpec | None = None,
    progress: Any = None,
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """Optimise every task's δ in shared forward and backward passes; one (δ, W k*, diagnostics)
    per task, δ float32 on the model's device.

    Each task's rows get its own δ at their subject token, and the loss is the sum of the tasks'
    own losses, so each δ gets exactly the gradient it would get alone (Adam is elementwise): a
    batch computes what the tasks would compute one by one, in fewer passes. A task that reaches
    its early-stopping loss is frozen where it is while the others go on. ‖δ‖ is kept within
    ``clamp_norm_factor`` · ‖W k*‖ (ROME's clamp) and the task's ``max_delta_norm``.
    """
    spec = get_spec(model, spec)
    device = input_device(model)  # δ, labels and logits live here; the edited layer may be elsewhere
    mod = model.get_submodule(spec.mlp_out_module(layer))
    E = len(tasks)
    prs = [_build_prompts(tok, t.req, t.templates, hp) for t in tasks]

    with torch.no_grad():
        ks = torch.stack([t.k_star for t in tasks]).to(device=device, dtype=mod.weight.dtype)
        w_k = mod(ks).float().to(device)  # W k* (+ bias), (E, out)
    ref_norms = [float(x) for x in w_k.norm(dim=1)]
    delta = torch.zeros_like(w_k, requires_grad=True)
    cur: list[_Rows] = []  # the rows being replayed: every task's at first, then the unfinished ones'

    def add_delta(out, name):
        if not cur:  # building a replay: its reference passes run without δ
            return out
        rows = cur[0]
        return out + (rows.subj_mask * delta[rows.row_task][:, None, :]).to(out.device, out.dtype)

    with _frozen(model):
        cur.append(_Rows.of(model, spec, layer, tok, prs, tasks, list(range(E)), device))
        mode = cur[0].replay.mode
        kl_init = torch.log_softmax(cur[0].replay.full_logits[[cur[0].spans[e][1] - 1 for e in range(E)]], -1)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norms = torch.tensor(
            [min(hp.clamp_norm_factor * r, t.max_delta_norm) for r, t in zip(ref_norms, tasks)], device=device
        )
        losses: list[list[float]] = [[] for _ in tasks]
        steps = [0] * E
        done = torch.zeros(E, dtype=torch.bool, device=device)
        last_nll: list[torch.Tensor | None] = [None] * E
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.optim_autocast == "bfloat16")
        with Trace(model, spec.mlp_out_module(layer), retain_output=False, edit_output=add_delta):
            for step in range(hp.v_steps):
                rows = cur[0]
                finished = [e for e in rows.members if done[e]]
                if 4 * sum(len(prs[e].seqs) for e in finished) >= len(rows.row_task):
                    # a quarter of the rows belong to finished tasks: replay only the others
                    cur.clear()
                    rows = _Rows.of(
                        model, spec, layer, tok, prs, tasks, [e for e in rows.members if not done[e]], device
                    )
                    cur.append(rows)
                opt.zero_grad()
                with autocast:
                    logits = rows.replay.run()
                logits = logits.float()
                total = logits.new_zeros(())
                for e in rows.members:
                    if done[e]:
                        continue
                    steps[e] = step + 1
                    a, b, lab0 = rows.spans[e]
                    nll, loss = _loss(
                        logits[a:b],
                        rows.labels[lab0 : lab0 + prs[e].n_rewrite * len(prs[e].target)],
                        kl_init[e : e + 1],
                        delta[e],
                        n=prs[e].n_rewrite,
                        ref_norm=ref_norms[e],
                        hp=hp,
                    )
                    last_nll[e] = nll.detach()
                    losses[e].append(round(loss.item(), 4))
                    watched = nll.mean().item() if hp.early_stop_on == "nll" else loss.item()
                    if watched < hp.early_stop_loss or step == hp.v_steps - 1:
                        done[e] = True
                    else:
                        total = total + loss
                if progress is not None:
                    progress(step, losses[0][-1] if E == 1 else float(total.item()))
                if bool(done.all()):
                    break
                total.backward()
                kept = delta.detach()[done].clone()
                opt.step()
                with torch.no_grad():
                    delta[done] = kept  # a finished task stays where it stopped
                    norms = delta.norm(dim=1)
                    over = norms > max_norms
                    delta[over] *= (max_norms[over] / norms[over])[:, None]
    out = []
    for e in range(E):
        d = delta[e].detach().float()
        nll = last_nll[e]
        assert nll is not None
        diag = {
            "v_steps_run": steps[e],
            "loss_first": losses[e][0],
            "loss_last": losses[e][-1],
            "nll_last": round(nll.mean().item(), 4),
            "p_target_mean_after_opt": round(math.exp(-nll.mean().item()), 4),
            **(
                {"p_prompt_after_opt": round(math.exp(-nll[list(tasks[e].templates).index("{}")].item()), 4)}
                if "{}" in tasks[e].templates
                else {}
            ),
            "delta_norm": round(d.norm().item(), 4),
            "wk_norm": round(ref_norms[e], 4),
            "delta_capped": bool(d.norm().item() >= 0.999 * float(max_norms[e])),
            "replay": mode,
            "target_tokens": len(prs[e].target),
            "target_tokenization": prs[e].target_how,
        }
        out.append((d, w_k[e], diag))
    return out


def _read_positions(pr: _Prompts) -> tuple[list[tuple[int, int]], list[int]]:
    """(row, position) of each logit the loss reads, and its label: for rewrite prompt i, positions
    len-T .. len-1 predict the target's tokens; the KL row reads the next-token distribution after
    the subject in "{} is a" (no label)."""
    T = len(pr.target)
    reads, labels = [], []
    for i in range(pr.n_rewrite):
        L = len(pr.seqs[i])
        for j in range(T):
            reads.append((i, L - T + j))
            labels.append(pr.target[j])
    reads.append((pr.n_rewrite, pr.subj_idx[pr.n_rewrite]))
    return reads, labels


def _loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kl_init: torch.Tensor,
    delta: torch.Tensor,
    *,
    n: int,
    ref_norm: float,
    hp: ROMEHyperParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-prompt target NLL, total loss): the NLL's mean + KL on the essence prompt + weight decay."""
    logp = torch.log_softmax(logits, -1)
    nll = -logp[:-1].gather(1, labels[:, None]).view(n, -1).sum(1) / (labels.numel() // n)  # per prompt
    kl = hp.kl_factor * F.kl_div(kl_init, logp[-1:], log_target=True, reduction="batchmean")
    wd = hp.v_weight_decay * (delta.norm() / ref_norm**2)
    return nll, nll.mean() + kl + wd


# --------------------------------------------------------------------------------------- delta


def solve_key(
    k_star: torch.Tensor,
    stats: SecondMoment | None,
    hp: ROMEHyperParams,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """u ∝ C⁻¹ k* (float64 solve), or k* itself without the covariance adjustment; unit norm.

    ``protect`` (m, in): directions the update must not change. Then u is the C-weighted minimum-norm
    direction with u·k* = 1 and u·q = 0 for every q in span(protect): u = C⁻¹M (MᵀC⁻¹M)⁻¹ e₁ with
    M = [k*, Q] (Q an orthonormal basis of the protected span), so ΔW q = v (u·q) = 0.
    """
    k = k_star.detach().to("cpu", torch.float64)
    if hp.mom2_adjustment:
        if stats is None:
            raise RequestError("mom2_adjustment needs second-moment statistics; pass stats or disable it")
        if stats.mom2.shape != (k.numel(), k.numel()):
            raise RequestError(
                f"statistics are {tuple(stats.mom2.shape)} but the key has size {k.numel()}; wrong layer"
            )
        LU, piv = stats.lu_factors(hp.mom2_ridge)

        def c_inv(x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.lu_solve(LU, piv, x)
    else:

        def c_inv(x: torch.Tensor) -> torch.Tensor:
            return x

    if protect is None or len(protect) == 0:
        u = c_inv(k[:, None])[:, 0]
    else:
        M = torch.cat([k[:, None], protected_basis(protect)], dim=1)  # (in, 1 + r)
        A = c_inv(M)
        G = M.T @ A
        cond = float(torch.linalg.cond(G))
        if not math.isfinite(cond) or cond > 1e12:
            raise RequestError(
                f"the edit's key lies (almost) in the span of the {M.shape[1] - 1} protected key directions "
                f"(condition {cond:.3g}); it cannot change its fact without changing them: protect fewer "
                "directions (protect_principal, neighbours) or edit without protection"
            )
        e1 = torch.zeros(M.shape[1], dtype=torch.float64)
        e1[0] = 1.0
        u = A @ torch.linalg.solve(G, e1)
    return (u / u.norm()).to(torch.float32)


def protected_basis(protect: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (in, r) of the span of the rows of ``protect`` (near-dependent rows dropped)."""
    P = protect.detach().to("cpu", torch.float64)
    P = P / P.norm(dim=1, keepdim=True).clamp_min(1e-30)
    U, S, _ = torch.linalg.svd(P.T, full_matrices=False)
    return U[:, S > rtol * S[0]]


def spectral_norm(weight: torch.Tensor, memo: TensorMemo | None = None) -> float:
    """‖W‖₂ in float32: exact for matrices up to 4M entries, else randomized SVD (8 power iterations).

    With ``memo`` (an ``Editor``'s), kept per tensor and version, so repeated edits of the same
    matrix pay once and an edited matrix is measured again.
    """

    def norm() -> float:
        w = weight.detach().float()
        if w.numel() <= 4_000_000:
            return float(torch.linalg.matrix_norm(w, ord=2))
        with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            torch.manual_seed(0)
            return float(torch.svd_lowrank(w, q=8, niter=8)[1][0])

    return norm() if memo is None else memo.get(weight, norm)


@dataclass
class _Prepared:
    """What an edit derives before its δ optimisation."""

    templates: list[str]
    dropped: list[str]
    k_star: torch.Tensor
    keys: torch.Tensor  # the subject's key in each template, then in the KL prompt
    protect: torch.Tensor | None  # directions u must leave alone, besides the neighbours'
    w_spec: float
    seconds: float
    neighbours: _Neighbours | None = None
    u: torch.Tensor = field(init=False)
    denom: float = field(init=False)  # u · k*
    reach: torch.Tensor = field(init=False)  # (u·k_i)/(u·k*) per template, then the KL prompt
    cap: float = field(init=False)  # bound on ‖δ‖ from max_update_ratio

    def solve(self, stats: SecondMoment | None, hp: ROMEHyperParams) -> _Prepared:
        """u, u·k*, the reach per template and the cap on ‖δ‖, kept away from ``protect`` and the
        neighbours' keys."""
        near = self.neighbours
        protect = self.protect
        if near is not None and len(near.keys):
            protect = near.keys if protect is None else torch.cat([protect.to(near.keys), near.keys])
        self.u = solve_key(self.k_star, stats, hp, protect)
        self.denom = float(self.u.double() @ self.k_star.detach().cpu().double())
        # What the shipped update does at each optimised subject token: v (u·k_i) = δ (u·k_i)/(u·k*).
        self.reach = (self.keys.detach().cpu().double() @ self.u.double()) / self.denom
        # ‖v uᵀ‖₂ = ‖δ‖/(u·k*): cap it at max_update_ratio × ‖W‖₂ (0: no cap, only ROME's clamp).
        self.cap = (
            hp.max_update_ratio * self.w_spec * abs(self.denom) if hp.max_update_ratio > 0 else math.inf
        )
        if near is not None:
            near.reach_after = (
                (near.keys.double() @ self.u.double() / self.denom).abs().max().item()
                if len(near.keys)
                else 0.0
            )
        return self


def _prepare(
    model: Any,
    tok: Any,
    req: EditRequest,
    *,
    stats: SecondMoment | None,
    hp: ROMEHyperParams,
    templates: Sequence[str],
    target: EditTarget,
    spectral_memo: TensorMemo | None,
    protect: torch.Tensor | None,
) -> _Prepared:
    t0 = time.perf_counter()
    kept, dropped = usable_templates(tok, req, templates)
    filled = [t.replace("{}", req.prompt) for t in kept] + [hp.kl_prompt]
    keys = subject_keys(model, tok, req.subject, target.layer, filled, spec=target.spec)  # templates, then KL
    k_star = averaged_key(keys[:-1], kept, hp.key_prompt_weight)
    near = _neighbours(model, tok, req, k_star, stats, hp, target) if hp.neighbours else None
    w_spec = spectral_norm(param_value(model, target.parameter), spectral_memo)
    p = _Prepared(kept, dropped, k_star, keys, protect, w_spec, 0.0, near).solve(stats, hp)
    p.seconds = time.perf_counter() - t0
    return p


@dataclass
class _Neighbours:
    """The neighbours an edit keeps away from (``ROMEHyperParams.neighbours``)."""

    names: list[str]  # used
    aliases: list[str]  # left out: their key is nearly the subject's
    keys: torch.Tensor  # (m, in) float64 CPU: each used name's key in the edit's prompt(s)
    reach_before: float  # max |reach| over those keys of the unconstrained u
    reach_after: float = 0.0
    row_names: list[str] = field(default_factory=list)  # the name of each row of ``keys``
    row_cosine: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (m,) |C⁻¹-cosine| with k*
    released: list[str] = field(default_factory=list)  # let go: the edit missed its fact with them
    p_with_all: float | None = None  # P(target) on the prompt, kept away from every name

    def keeping(self, share: float, p_with_all: float) -> _Neighbours:
        """These neighbours with only ``share`` of the names (rounded down): those whose keys are most
        like the subject's (largest |C⁻¹-cosine| over their rows) go first."""
        cos = self.row_cosine
        worst: dict[str, float] = {}
        for n, c in zip(self.row_names, cos.tolist()):
            worst[n] = max(worst.get(n, 0.0), c)
        kept = set(sorted(self.names, key=lambda n: worst[n])[: int(share * len(self.names))])
        rows = torch.tensor([n in kept for n in self.row_names], dtype=torch.bool)
        return _Neighbours(
            [n for n in self.names if n in kept], self.aliases, self.keys[rows], self.reach_before,
            row_names=[n for n in self.row_names if n in kept], row_cosine=cos[rows],
            released=[n for n in self.names if n not in kept], p_with_all=p_with_all,
        )  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        out = {
            "neighbours": self.names,
            "neighbours_left_out": self.aliases,
            "neighbour_reach_before": round(self.reach_before, 4),
            "neighbour_reach_after": round(self.reach_after, 6),
        }
        if self.released:
            out.update(neighbours_released=self.released, p_prompt_with_all_neighbours=self.p_with_all)
        return out


def _neighbours(
    model: Any, tok: Any, req: EditRequest, k_star: torch.Tensor, stats: SecondMoment | None,
    hp: ROMEHyperParams, target: EditTarget,
) -> _Neighbours:  # fmt: skip
    """Names near the subject (``rompatch.neighbours.near_names``) and their keys in the edit's
    prompt; names whose key has |C⁻¹-cosine| above ``hp.neighbour_max_cosine`` with k* are aliases."""
    names = near_names(model, tok, req.subject, limit=hp.neighbours, seed=hp.seed)
    if not names:
        return _Neighbours([], [], torch.zeros(0, k_star.numel(), dtype=torch.float64), 0.0)
    pairs = neighbour_pairs(req, names)
    unfit = {n for t, n in pairs if not fits(tok, t, n)}  # a name must fit every template
    pairs = [(t, n) for t, n in pairs if n not in unfit]
    names = list(dict.fromkeys(n for _, n in pairs))
    if not names:
        return _Neighbours([], [], torch.zeros(0, k_star.numel(), dtype=torch.float64), 0.0)
    keys = filled_keys(model, tok, pairs, target.layer, spec=target.spec).detach().to("cpu", torch.float64)
    k = k_star.detach().to("cpu", torch.float64)
    if hp.mom2_adjustment and stats is not None:
        LU, piv = stats.lu_factors(hp.mom2_ridge)
        ck = torch.linalg.lu_solve(LU, piv, k[:, None])[:, 0]
        cn = torch.linalg.lu_solve(LU, piv, keys.T).T
    else:
        ck, cn = k, keys
    cos = (keys @ ck) / ((keys * cn).sum(1).clamp_min(1e-30).sqrt() * float(k @ ck) ** 0.5)
    u0 = ck / ck.norm()
    reach0 = float(((keys @ u0) / float(u0 @ k)).abs().max())
    alias = {n for (_, n), c in zip(pairs, cos.tolist()) if abs(c) > hp.neighbour_max_cosine}
    keep = torch.tensor([n not in alias for _, n in pairs])
    used = [n for n in names if n not in alias]
    return _Neighbours(
        used, sorted(alias), keys[keep], reach0,
        row_names=[n for _, n in pairs if n not in alias], row_cosine=cos.abs()[keep],
    )  # fmt: skip


def compute_deltas(
    model: Any,
    tok: Any,
    reqs: Sequence[EditRequest],
    *,
    stats: SecondMoment | None,
    hparams: ROMEHyperParams | None = None,
    templates: Sequence[str] | None = None,
    target: EditTarget | None = None,
    spec: ModelSpec | None = None,
    spectral_memo: TensorMemo | None = None,
    progress: Any = None,
    protect: torch.Tensor | None = None,
) -> list[EditResult]:
    """ROME edits of ``reqs``, each computed as if alone on ``model`` (left unchanged), with their δ
    optimised together (``compute_values``). Returns u, v, k* and diagnostics per request.

    ``target``: where the edits go (``rompatch.create.Editor`` resolves it once for many edits);
    None resolves it here from ``spec`` and ``hparams.layer``. ``spectral_memo`` keeps ‖W‖₂
    between edits of the same matrix. ``protect`` (m, in): key directions the updates must leave
    unchanged (``solve_key``).
    """
    hp = hparams or ROMEHyperParams()
    target = target or EditTarget.resolve(model, spec=spec, layer=hp.layer)
    hp = hp.resolved(model, target)
    spec, layer = target.spec, target.layer
    for req in reqs:
        validate_request(tok, req, max_tokens=prompt_token_limit(model))
    if templates is None:
        templates = context_templates(
            model, tok, length_params=hp.context_length_params, seed=hp.seed, spec=spec
        )
    torch.manual_seed(hp.seed)
    preps = [
        _prepare(
            model,
            tok,
            r,
            stats=stats,
            hp=hp,
            templates=templates,
            target=target,
            spectral_memo=spectral_memo,
            protect=protect,
        )  # fmt: skip
        for r in reqs
    ]
    t0 = time.perf_counter()
    values = _values(model, tok, reqs, preps, layer, hp, spec, progress)
    share = (time.perf_counter() - t0) / len(reqs)
    extra = _let_go(model, tok, reqs, preps, values, layer, hp, spec, stats)
    out = []
    for i, (r, p, (delta, _, diag)) in enumerate(zip(reqs, preps, values)):
        v = (delta.cpu() / p.denom).to(torch.float32)
        diag.update(
            seconds=round(p.seconds + share + extra.get(i, 0.0), 3),
            u_dot_k=round(p.denom, 6),
            k_norm=round(float(p.k_star.norm()), 4),
            v_norm=round(float(v.norm()), 4),
            update_spectral_norm=round(float(v.norm()) * float(p.u.norm()), 4),
            weight_spectral_norm=round(p.w_spec, 4),
            reach_min=round(float(p.reach[:-1].min()), 4),
            reach_kl=round(float(p.reach[-1]), 4),
            layer=layer,
        )
        if protect is not None:
            diag["protected_directions"] = len(protect)
        if p.neighbours is not None:
            diag.update(p.neighbours.metrics())
        hpd = hp.to_dict()
        hpd.update(layer=layer, context_templates=list(p.templates), templates_dropped_position0=p.dropped)
        res = EditResult(
            u=p.u,
            v=v,
            layer=layer,
            parameter=target.parameter,
            hparams=hpd,
            metrics=diag,
            key=p.k_star.detach().to("cpu", torch.float32),
        )
        if (
            hp.opening_delta
            and diag.get("p_prompt_after_opt", 1.0) < OPENING_MIN_P
            and opens_with_subject(tok, r)
        ):
            kept = [x for x in (protect, p.neighbours.keys if p.neighbours else None) if x is not None]
            try:
                res.opening = opening_delta(
                    model, tok, r, res, stats=stats, hp=hp, target=target, w_spec=p.w_spec,
                    protect=torch.cat([x.to("cpu", torch.float64) for x in kept]) if kept else None,
                )  # fmt: skip
            except RequestError as e:  # the prompt's key lies in the span of the keys it must leave alone
                log.warning("no opening delta for %r: %s", r.text, e)
                res.metrics["opening_delta_skipped"] = str(e)
        out.append(res)
    return out


def _values(model, tok, reqs, preps, layer, hp, spec, progress=None):
    """``compute_values`` of the prepared edits."""
    tasks = [
        ValueTask(r, p.templates, p.k_star, p.reach.float() if hp.value_scaling == "per_key" else None, p.cap)
        for r, p in zip(reqs, preps)
    ]
    return compute_values(model, tok, tasks, layer, hp, spec=spec, progress=progress)


def _prompt_p(diag: dict[str, Any]) -> float:
    """P(target) on the edit's own prompt after the δ optimisation (or its mean over the templates)."""
    return diag.get("p_prompt_after_opt", diag["p_target_mean_after_opt"])


def _let_go(model, tok, reqs, preps, values, layer, hp, spec, stats) -> dict[int, float]:
    """``ROMEHyperParams.neighbour_min_p``: every edit kept away from its neighbours that ends at the
    size cap below that P(target) on its prompt tries again with half of its names, then with none;
    ``preps`` and ``values`` keep the attempt with the highest P(target). Returns the extra seconds
    of each edit that tried again."""
    extra: dict[int, float] = {}
    first = {i: p.neighbours for i, p in enumerate(preps) if p.neighbours is not None and p.neighbours.names}
    p_all = {i: _prompt_p(values[i][2]) for i in first}
    for share in (0.5, 0.0):
        missed = [
            i for i in first if values[i][2]["delta_capped"] and _prompt_p(values[i][2]) < hp.neighbour_min_p
        ]
        if not missed:
            break
        t0 = time.perf_counter()
        tries = [
            dataclasses.replace(preps[i], neighbours=first[i].keeping(share, p_all[i])).solve(stats, hp)
            for i in missed
        ]
        again = _values(model, tok, [reqs[i] for i in missed], tries, layer, hp, spec)
        each = (time.perf_counter() - t0) / len(missed)
        for i, p, val in zip(missed, tries, again):
            extra[i] = extra.get(i, 0.0) + each
            if _prompt_p(val[2]) > _prompt_p(values[i][2]):
                preps[i], values[i] = p, val
    return extra


def opening_delta(
    model: Any, tok: Any, req: EditRequest, first: EditResult, *, stats: SecondMoment | None,
    hp: ROMEHyperParams, target: EditTarget, w_spec: float, protect: torch.Tensor | None = None,
) -> EditResult:  # fmt: skip
    """The second delta of an edit whose prompt opens with its subject (``rompatch.opening``): keyed at
    the prompt's subject token, orthogonal to the keys of ``first``'s context templates (and to
    ``protect``, what ``first`` was kept away from), its value optimised on the prompt alone with
    ``first`` applied, its size capped like ``first``'s (``w_spec`` = ‖W‖₂)."""
    t0 = time.perf_counter()
    ctx = [t.replace("{}", req.prompt) for t in first.hparams["context_templates"] if t != "{}"]
    pairs = [(req.prompt, req.subject)] + [(t, req.subject) for t in ctx]
    keys = filled_keys(model, tok, pairs, target.layer, spec=target.spec).detach().to("cpu", torch.float64)
    k, k_ctx = keys[0], keys[1:]
    u = solve_key(k.float(), stats, hp, k_ctx if protect is None else torch.cat([k_ctx, protect.to(k_ctx)]))
    denom = float(u.double() @ k)
    cap = hp.max_update_ratio * w_spec * abs(denom) if hp.max_update_ratio > 0 else math.inf
    with added(model, target.parameter, first.v, first.u, target.spec.layout):
        ((delta, _, diag),) = compute_values(
            model, tok, [ValueTask(req, ["{}"], k.float(), None, cap)], target.layer, hp, spec=target.spec
        )
    v = (delta.cpu() / denom).to(torch.float32)
    diag.update(
        seconds=round(time.perf_counter() - t0, 3),
        u_dot_k=round(denom, 6),
        k_norm=round(float(k.norm()), 4),
        v_norm=round(float(v.norm()), 4),
        update_spectral_norm=round(float(v.norm()) * float(u.norm()), 4),
        weight_spectral_norm=round(w_spec, 4),
        reach_contexts_max=round(float((k_ctx @ u.double() / denom).abs().max()), 6),
        first_p_prompt_after_opt=first.metrics.get("p_prompt_after_opt"),
        layer=target.layer,
    )
    hpd = {**first.hparams, "context_templates": ["{}"], OPENING: True}
    return EditResult(u, v, target.layer, target.parameter, hpd, diag, k.to(torch.float32))


def compute_delta(
    model: Any,
    tok: Any,
    req: EditRequest,
    *,
    stats: SecondMoment | None,
    hparams: ROMEHyperParams | None = None,
    templates: Sequence[str] | None = None,
    target: EditTarget | None = None,
    spec: ModelSpec | None = None,
    spectral_memo: TensorMemo | None = None,
    progress: Any = None,
    protect: torch.Tensor | None = None,
) -> EditResult:
    """Compute one ROME edit on ``model`` (left unchanged). Returns u, v, k* and diagnostics
    (``compute_deltas`` of one request)."""
    (res,) = compute_deltas(
        model, tok, [req], stats=stats, hparams=hparams, templates=templates, target=target, spec=spec,
        spectral_memo=spectral_memo, progress=progress, protect=protect,
    )  # fmt: skip
    return res
