"""ROME (Meng et al. 2022): key k*, value v*, and the rank-one update, as in the paper.

    k*  = mean over context templates of the edited matrix's input at the subject's last token
    δ   = argmin  NLL(target | prompts, MLP output + δ at the subject) + KL essence + weight decay,
          with ‖δ‖ clamped to clamp_norm_factor · ‖W k*‖
    u   = C⁻¹ k* / ‖C⁻¹ k*‖            (C = E[k kᵀ], the second moment; ON by default)
    v   = δ / (u · k*)                  so that  W' k* = W k* + δ = v*

The same averaged key k* is used in u and in the denominator (the r-ROME fix for the reference
code's "disabling edits", whose denominator used a different key than u and could blow up).

Speed: the layers below the edited one are run once per edit; each optimisation step replays only
the blocks from the edited layer up (with their captured call arguments), and the LM head is
applied only at the positions a loss reads. Weights are frozen, so backward computes activation
gradients only. The replay is checked against a full forward once per edit and falls back to full
forwards if they disagree.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .arch import ModelSpec, check_layer, default_layer, get_spec
from .context import context_templates
from .errors import RequestError
from .hooks import Trace
from .request import EditRequest
from .stats import SecondMoment
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
    key: str = "averaged"  # r-ROME: the averaged k* is used in u and in the denominator
    value: str = "Wk*+delta"  # v* = W k* + δ, so v = δ / (u·k*)
    target_spacing: str = "continuation"  # targets are the tokens that follow "prompt" + " " + target
    fact_token: str = "subject_last"
    optim_autocast: str = (
        "none"  # "none" or "bfloat16": autocast for the δ optimisation only (u, v stay fp32)
    )

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


def validate_request(tok: Any, req: EditRequest) -> None:
    """Cheap checks before any heavy work: subject present in the prompt's tokens, target non-empty."""
    subject_span(tok, req.prompt, req.subject)
    target_ids(tok, req.text, req.target_new)
    if req.target_true is not None:
        target_ids(tok, req.text, req.target_true)


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
def compute_key(
    model: Any,
    tok: Any,
    req: EditRequest,
    layer: int,
    templates: Sequence[str],
    *,
    spec: ModelSpec | None = None,
) -> torch.Tensor:
    """k*: the edited matrix's input at the subject's last token, averaged over ``templates`` (float32)."""
    spec = get_spec(model, spec)
    device = next(model.parameters()).device
    seqs, idx = [], []
    for t in templates:
        text, _, last = subject_span(tok, t.replace("{}", req.prompt), req.subject)
        seqs.append(list(tok(text, add_special_tokens=True)["input_ids"]))
        idx.append(last)
    batch = pad_right(seqs, pad_id(tok)).to(device)
    with Trace(model, spec.mlp_out_module(layer), retain_input=True, retain_output=False, stop=True) as tr:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    keys = tr.input[torch.arange(len(seqs), device=device), torch.tensor(idx, device=device)]  # (n, in)
    return keys.float().mean(0)


# -------------------------------------------------------------------------------------- values


def forward_hidden(model: Any, batch) -> None:
    """A forward pass whose LM head runs at the last position only (hooks read what they need)."""
    try:
        model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1
        )
    except TypeError:  # a model without logits_to_keep
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


class _Replay:
    """Runs blocks ``layer..N-1`` from captured inputs, then the head at selected positions only."""

    def __init__(self, model: Any, spec: ModelSpec, layer: int, batch, positions: torch.Tensor) -> None:
        self.model, self.spec, self.layer = model, spec, layer
        self.blocks = model.get_submodule(spec.layers)
        self.norm = model.get_submodule(spec.final_norm)
        self.head = model.get_submodule(spec.lm_head)
        self.positions = positions  # (P, 2): (row, pos)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.calls: dict[int, tuple[tuple, dict]] = {}
        handles = []

        def capture(j):
            def hook(mod, args, kwargs):
                self.calls[j] = (args, kwargs)

            return hook

        for j in range(layer, len(self.blocks)):
            handles.append(self.blocks[j].register_forward_pre_hook(capture(j), with_kwargs=True))
        try:
            with torch.no_grad(), Trace(model, spec.final_norm) as normed:
                forward_hidden(model, batch)
        finally:
            for h in handles:
                h.remove()
        self.full_logits = self.head_at(normed.output)  # (P, V), from the full forward
        self.ok = len(self.calls) == len(self.blocks) - layer
        if self.ok:
            with torch.no_grad():
                diff = (self.run() - self.full_logits).abs().max().item()
            scale = self.full_logits.abs().max().item()
            self.ok = diff <= 1e-3 * max(scale, 1.0)
            if not self.ok:
                log.warning(
                    "replay from layer %d differs from a full forward by %.3g; using full forwards",
                    layer,
                    diff,
                )

    def run(self) -> torch.Tensor:
        args, kwargs = self.calls[self.layer]
        h = args[0]
        for j in range(self.layer, len(self.blocks)):
            args, kwargs = self.calls[j]
            out = self.blocks[j](h, *args[1:], **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head_at(self.norm(h))

    def head_at(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head (and Gemma-2 style soft-capping) at the selected positions only."""
        h = normed[self.positions[:, 0], self.positions[:, 1]]  # (P, C)
        logits = self.head(h).float()  # (P, V)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


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
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Optimise δ; return (δ, W k*, diagnostics). δ is float32 on the model's device."""
    spec = get_spec(model, spec)
    device = next(model.parameters()).device
    mod = model.get_submodule(spec.mlp_out_module(layer))
    pr = _build_prompts(tok, req, templates, hp)
    batch = pad_right(pr.seqs, pad_id(tok)).to(device)
    n = pr.n_rewrite
    T = len(pr.target)
    # Loss positions: for rewrite prompt i, positions len-T .. len-1 predict the target's tokens.
    rows, cols, labels = [], [], []
    for i in range(n):
        L = batch.lengths[i]
        for j in range(T):
            rows.append(i)
            cols.append(L - T + j)
            labels.append(pr.target[j])
    rows.append(n)
    cols.append(pr.subj_idx[n])  # KL: next-token distribution after the subject in "{} is a"
    positions = torch.tensor([rows, cols], device=device).T  # (P, 2)
    labels_t = torch.tensor(labels, device=device)
    subj_mask = torch.zeros(batch.input_ids.shape, device=device, dtype=torch.float32)
    subj_mask[torch.arange(len(pr.seqs)), torch.tensor(pr.subj_idx)] = 1.0
    subj_mask = subj_mask.unsqueeze(-1)  # (B, T, 1)

    with torch.no_grad():
        w_k = mod(k_star.to(device=device, dtype=mod.weight.dtype)).float()  # W k* (+ bias)
    ref_norm = w_k.norm().item()
    delta = torch.zeros_like(w_k, requires_grad=True)

    def add_delta(out, name):
        return out + (subj_mask * delta).to(out.dtype)

    with _frozen(model):
        replay = _Replay(model, spec, layer, batch, positions)
        kl_init = torch.log_softmax(replay.full_logits[-1:], -1).detach()
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norm = hp.clamp_norm_factor * ref_norm
        losses = []
        steps = 0
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.optim_autocast == "bfloat16")
        with Trace(model, spec.mlp_out_module(layer), retain_output=False, edit_output=add_delta):
            for step in range(hp.v_steps):
                steps = step + 1
                opt.zero_grad()
                with autocast:
                    if replay.ok:
                        logits = replay.run()
                    else:
                        out = model(
                            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                        )
                        logits = out.logits[positions[:, 0], positions[:, 1]]
                logits = logits.float()
                logp = torch.log_softmax(logits, -1)
                nll = -logp[:-1].gather(1, labels_t[:, None]).view(n, T).sum(1) / T  # per prompt
                nll_loss = nll.mean()
                kl = hp.kl_factor * F.kl_div(kl_init, logp[-1:], log_target=True, reduction="batchmean")
                wd = hp.v_weight_decay * (delta.norm() / ref_norm**2)
                loss = nll_loss + kl + wd
                losses.append(round(loss.item(), 4))
                if progress is not None:
                    progress(step, loss.item())
                watched = nll_loss.item() if hp.early_stop_on == "nll" else loss.item()
                if watched < hp.early_stop_loss or step == hp.v_steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    p_target = math.exp(-nll.mean().item())
    diag = {
        "v_steps_run": steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "nll_last": round(nll_loss.item(), 4),
        "p_target_mean_after_opt": round(p_target, 4),
        "delta_norm": round(delta.norm().item(), 4),
        "wk_norm": round(ref_norm, 4),
        "replay": bool(replay.ok),
        "target_tokens": T,
        "target_tokenization": pr.target_how,
    }
    return delta.detach().float(), w_k, diag


# --------------------------------------------------------------------------------------- delta


def solve_key(k_star: torch.Tensor, stats: SecondMoment | None, hp: ROMEHyperParams) -> torch.Tensor:
    """u ∝ C⁻¹ k* (float64 solve), or k* itself without the covariance adjustment; unit norm."""
    k = k_star.detach().to("cpu", torch.float64)
    if hp.mom2_adjustment:
        if stats is None:
            raise RequestError("mom2_adjustment needs second-moment statistics; pass stats or disable it")
        C = stats.mom2.to(torch.float64)
        if C.shape != (k.numel(), k.numel()):
            raise RequestError(
                f"statistics are {tuple(C.shape)} but the key has size {k.numel()}; wrong layer"
            )
        if hp.mom2_ridge > 0:
            C = C + hp.mom2_ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
        u = torch.linalg.solve(C, k)
    else:
        u = k
    return (u / u.norm()).to(torch.float32)


def compute_delta(
    model: Any,
    tok: Any,
    req: EditRequest,
    *,
    stats: SecondMoment | None,
    hparams: ROMEHyperParams | None = None,
    templates: Sequence[str] | None = None,
    spec: ModelSpec | None = None,
    progress: Any = None,
) -> EditResult:
    """Compute one ROME edit on ``model`` (left unchanged). Returns u, v and diagnostics."""
    hp = hparams or ROMEHyperParams()
    spec = get_spec(model, spec)
    layer = default_layer(model, spec) if hp.layer is None else hp.layer
    check_layer(model, layer)
    validate_request(tok, req)
    if templates is None:
        templates = context_templates(model, tok, length_params=hp.context_length_params, seed=hp.seed)
    templates, dropped = usable_templates(tok, req, templates)
    t0 = time.perf_counter()
    torch.manual_seed(hp.seed)
    k_star = compute_key(model, tok, req, layer, templates, spec=spec)
    u = solve_key(k_star, stats, hp)
    delta, w_k, diag = compute_value(
        model, tok, req, layer, templates, k_star, hp, spec=spec, progress=progress
    )
    denom = float(u.double() @ k_star.detach().cpu().double())
    v = (delta.cpu() / denom).to(torch.float32)
    weight = model.get_submodule(spec.mlp_out_module(layer)).weight
    w32 = weight.detach().float()
    w_spec = float(torch.linalg.matrix_norm(w32, ord=2))
    diag.update(
        seconds=round(time.perf_counter() - t0, 3),
        u_dot_k=round(denom, 6),
        k_norm=round(float(k_star.norm()), 4),
        v_norm=round(float(v.norm()), 4),
        update_spectral_norm=round(float(v.norm()) * float(u.norm()), 4),
        weight_spectral_norm=round(w_spec, 4),
        layer=layer,
    )
    hpd = hp.to_dict()
    hpd.update(layer=layer, context_templates=list(templates), templates_dropped_position0=dropped)
    return EditResult(u=u, v=v, layer=layer, parameter=spec.mlp_out_param(layer), hparams=hpd, metrics=diag)
