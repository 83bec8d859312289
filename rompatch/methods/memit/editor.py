"""MEMIT: N edits in one batch, each residual spread over a range of layers.

For requests i = 1..N and layers l₁ < … < l_L (the last is l_L):

1. Targets. δ_i = the change of the residual stream at the subject's last token, after block l_L,
   that makes the model say target i (ROME's value optimisation, ``compute_values``, batched).
2. For each layer l in order, on the model with the updates of the layers below already applied:
   k_i = the key of request i at layer l (averaged over the context templates as ROME's k*);
   r_i = (δ_i − the change the lower layers already make at l_L) / (number of layers from l on);
   ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹          (C_l = E[k kᵀ] at layer l, λ = mom2_update_weight, default d_in).
3. The patch: per layer, ΔW_l = Σ_i r_i a_iᵀ with a_i = (λ C_l + K Kᵀ)⁻¹ k_i, stored as N rank-one
   deltas (u = a_i/‖a_i‖, v = r_i ‖a_i‖, key k_i; ``hparams["solve"] = "joint"``). When N exceeds
   min(in, out) the N pairs would outweigh the dense matrix; ΔW_l is then stored as its SVD,
   min(in, out) pairs without keys, and each records ``hparams["svd_compressed"]``.

The model is left unchanged. Differences from the reference code: δ is clamped relative to ‖W k*‖
at the last layer (ROME's clamp) rather than to the residual's norm, and keys weigh the bare prompt
by ``key_prompt_weight`` as rompatch's ROME does.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ...apply import applied_patches, apply_patch, patched, revert_patch
from ...arch import EditTarget, ModelSpec, get_spec
from ...context import context_templates
from ...errors import RequestError
from ...hooks import TraceDict
from ...models import applied_on_disk, model_identity
from ...patch import ParamInfo, Patch, RankOneDelta, new_patch
from ...placement import input_device, param_value
from ...refs import PatchesLike
from ...request import EditRequest
from ...rome import (
    ValueTask,
    averaged_key,
    compute_values,
    default_chunk,
    prompt_token_limit,
    usable_templates,
    validate_request,
)
from ...scoring import probe
from ...stats import SecondMoment, get_second_moment
from ...tokens import pad_id, pad_right, subject_span
from .config import MEMITHyperParams

log = logging.getLogger(__name__)


def default_layers(model: Any, spec: ModelSpec) -> tuple[int, ...]:
    """Five layers ending two after the default ROME layer, clipped to the model."""
    last_layer = model.config.num_hidden_layers - 1 if hasattr(model.config, "num_hidden_layers") else None
    top = EditTarget.resolve(model, spec=spec).layer
    n = last_layer if last_layer is not None else top
    hi = min(top + 2, n)
    return tuple(range(max(0, hi - 4), hi + 1))


class MEMITEditor:
    """MEMIT edits of one model (module docstring). ``stats``: per layer, second-moment statistics;
    missing layers are computed (or read from the cache) from ``stats_data``/``stats_tokens``."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        *,
        hparams: MEMITHyperParams | None = None,
        spec: ModelSpec | None = None,
        stats: dict[int, SecondMoment] | None = None,
        stats_data: str | None = None,
        stats_tokens: int | None = None,
        stats_text_field: str = "text",
        progress: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.tok = model, tok
        self.spec = get_spec(model, spec)
        hp = hparams or MEMITHyperParams()
        layers = hp.layers if hp.layers is not None else default_layers(model, self.spec)
        self.targets = [EditTarget.resolve(model, spec=self.spec, layer=x) for x in layers]
        self.hparams = MEMITHyperParams(**{**hp.__dict__, "layers": tuple(t.layer for t in self.targets)})
        self.progress = progress
        self.stats = dict(stats or {})
        for t in self.targets:
            if t.layer not in self.stats:
                self.stats[t.layer] = get_second_moment(
                    model, tok, t.layer, spec=self.spec, stats_data=stats_data, n_tokens=stats_tokens,
                    text_field=stats_text_field, progress=progress, notify=notify,
                )  # fmt: skip
        self._records = {x: s.record() for x, s in self.stats.items()}
        self._templates: list[str] | None = None

    @property
    def templates(self) -> list[str]:
        if self._templates is None:
            hp = self.hparams
            self._templates = context_templates(
                self.model, self.tok, length_params=hp.context_length_params, seed=hp.seed, spec=self.spec
            )
        return self._templates

    # -- reading the model ----------------------------------------------------------------------

    @torch.no_grad()
    def _read(
        self, req: EditRequest, templates: Sequence[str], layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k at ``layer`` averaged as ROME's k*, mean residual after the last layer) at the subject's
        last token over ``templates``; float64 on the CPU."""
        seqs, idx = [], []
        for t in templates:
            text, _, last = subject_span(self.tok, t.replace("{}", req.prompt), req.subject)
            seqs.append(list(self.tok(text, add_special_tokens=True)["input_ids"]))
            idx.append(last)
        device = input_device(self.model)
        batch = pad_right(seqs, pad_id(self.tok)).to(device)
        key_mod = self.spec.mlp_out_module(layer)
        out_mod = f"{self.spec.layers}.{self.targets[-1].layer}"
        with TraceDict(self.model, [key_mod, out_mod], retain_input=True) as tr:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        rows, cols = torch.arange(len(seqs)), torch.tensor(idx)
        k, h = tr[key_mod].input, tr[out_mod].output  # each on its own module's device
        keys = k[rows.to(k.device), cols.to(k.device)].double().cpu()
        resid = h[rows.to(h.device), cols.to(h.device)].double().cpu()
        return averaged_key(keys, templates, self.hparams.key_prompt_weight), resid.mean(0)

    # -- the edit -------------------------------------------------------------------------------

    def _targets(self, reqs: list[EditRequest], kept: list[list[str]]) -> list[torch.Tensor]:
        """δ_i at the last layer (float64, CPU), optimised ``chunk`` requests at a time."""
        hp = self.hparams
        last = self.targets[-1]
        vhp = hp.value_hparams(last.layer)
        out: list[torch.Tensor] = []
        torch.manual_seed(hp.seed)
        bar = tqdm(total=len(reqs), desc="memit targets", unit="edit", disable=not self.progress, leave=False)
        try:
            chunk = hp.chunk or default_chunk(self.model)
            for i in range(0, len(reqs), chunk):
                tasks = []
                for r, t in zip(reqs[i : i + chunk], kept[i : i + chunk]):
                    k, _ = self._read(r, t, last.layer)
                    tasks.append(ValueTask(r, t, k.float()))
                for delta, _, _ in compute_values(
                    self.model, self.tok, tasks, last.layer, vhp, spec=self.spec
                ):
                    out.append(delta.double().cpu())
                bar.update(len(tasks))
        finally:
            bar.close()
        return out

    def _layer_deltas(
        self, target: EditTarget, reqs: list[EditRequest], keys: torch.Tensor, resid: torch.Tensor
    ) -> list[RankOneDelta]:
        """ΔW at one layer as rank-one deltas (SVD-compressed when N pairs outweigh the matrix)."""
        hp = self.hparams
        C = self.stats[target.layer].mom2.detach().to("cpu", torch.float64)
        n, d_in, d_out = len(reqs), keys.shape[1], resid.shape[1]
        lam = hp.mom2_update_weight if hp.mom2_update_weight is not None else float(d_in)
        A = torch.linalg.solve(lam * C + keys.T @ keys, keys.T)  # (in, N): a_i
        base = {
            **hp.to_dict(), "layer": target.layer, "solve": "joint", "method": "memit", "batch_size": n,
            "mom2_update_weight_used": lam,
        }  # fmt: skip
        stats = copy.deepcopy(self._records[target.layer])
        if n <= min(d_in, d_out):
            out = []
            for i, r in enumerate(reqs):
                a = A[:, i]
                out.append(
                    RankOneDelta(
                        u=a / a.norm(),
                        v=resid[i] * a.norm(),
                        layer=target.layer,
                        parameter=target.parameter,
                        request=r,
                        kind="memit",
                        hparams=dict(base),
                        stats=stats,
                        key=keys[i],
                    )  # fmt: skip
                )
            return out
        dense = resid.T @ A.T  # (out, in)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        rank = int((S > S[0] * torch.finfo(torch.float32).eps).sum()) if len(S) else 0
        hpd = {**base, "svd_compressed": {"edits": n, "rank": rank}}
        return [
            RankOneDelta(
                u=Vh[j],
                v=U[:, j] * S[j],
                layer=target.layer,
                parameter=target.parameter,
                request=None,
                kind="memit",
                hparams=dict(hpd),
                stats=stats,
            )  # fmt: skip
            for j in range(rank)
        ]

    def patch(self, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        """All ``requests`` in one MEMIT batch; one patch, computed on the model as it is (patches
        applied in memory or baked into its checkpoint are its ``lineage``)."""
        reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
        if not reqs:
            raise RequestError("no edit requests given")
        for r in reqs:
            validate_request(self.tok, r, max_tokens=prompt_token_limit(self.model))
        t0 = time.perf_counter()
        kept = [usable_templates(self.tok, r, self.templates)[0] for r in reqs]
        lineage = applied_on_disk(self.model) + [p.id for p in applied_patches(self.model)]
        params = {
            t.parameter: ParamInfo.of(param_value(self.model, t.parameter), self.spec.layout)
            for t in self.targets
        }
        deltas_by_layer: list[list[RankOneDelta]] = []
        applied: list[Patch] = []
        try:
            targets = torch.stack(self._targets(reqs, kept))
            base_out = None  # the last layer's residual before any update: the first layer's reads
            for j, target in enumerate(self.targets):
                reads = [self._read(r, t, target.layer) for r, t in zip(reqs, kept)]
                keys = torch.stack([k for k, _ in reads])
                out = torch.stack([h for _, h in reads])
                base_out = out if base_out is None else base_out
                done = out - base_out  # what the lower layers already do
                resid = (targets - done) / (len(self.targets) - j)
                deltas = self._layer_deltas(target, reqs, keys, resid)
                deltas_by_layer.append(deltas)
                step = new_patch(
                    deltas,
                    base=model_identity(self.model),
                    parameters={target.parameter: params[target.parameter]},
                    lineage=lineage,
                )
                apply_patch(self.model, step)
                applied.append(step)
        finally:
            for p in reversed(applied):
                revert_patch(self.model, p)
        seconds = time.perf_counter() - t0
        deltas = [d for ds in deltas_by_layer for d in ds]
        for d in deltas:
            d.timings = {"edit_seconds": round(seconds / len(deltas), 4)}
        patch = new_patch(deltas, base=model_identity(self.model), parameters=params, lineage=lineage)
        self._measure(reqs, patch)
        return patch

    def _measure(self, reqs: list[EditRequest], patch: Patch) -> None:
        """P(new) before and after on each request's prompt, into the request's delta at the last layer."""
        before = [probe(self.model, self.tok, r) for r in reqs]
        with patched(self.model, patch):
            after = [probe(self.model, self.tok, r) for r in reqs]
        by_req = {id(d.request): d for d in patch.deltas if d.request is not None}  # its last layer's
        for r, b, a in zip(reqs, before, after):
            d = by_req.get(id(r))
            if d is not None:
                d.metrics.update({f"{k}_before": round(v, 6) for k, v in b.items()})
                d.metrics.update({f"{k}_after": round(v, 6) for k, v in a.items()})


def create_memit_patch(
    model: Any,
    tok: Any,
    requests: EditRequest | Sequence[EditRequest],
    *,
    hparams: MEMITHyperParams | None = None,
    spec: ModelSpec | None = None,
    stats: dict[int, SecondMoment] | None = None,
    stats_data: str | None = None,
    stats_tokens: int | None = None,
    progress: bool = False,
    on: PatchesLike = (),
) -> Patch:
    """All ``requests`` as one MEMIT patch (``MEMITEditor``); ``on``: patches applied first, as
    ``rompatch.create.create_patch`` takes them. The model is unchanged afterwards."""
    with patched(model, on):
        editor = MEMITEditor(
            model, tok, hparams=hparams, spec=spec, stats=stats, stats_data=stats_data,
            stats_tokens=stats_tokens, progress=progress,
        )  # fmt: skip
        return editor.patch(requests)
