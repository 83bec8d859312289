"""MEMIT's hyperparameters; all of them are recorded in every delta of a MEMIT patch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ...errors import RequestError
from ...rome import ROMEHyperParams


@dataclass(frozen=True)
class MEMITHyperParams:
    """MEMIT: targets at the last layer of ``layers``, residuals spread over ``layers``.

    ``layers`` None: five layers ending two after the architecture's default ROME layer (GPT-J's
    MEMIT range 3-8 sits around its ROME layer 5 the same way), clipped to the model. The value
    optimisation is ROME's (``compute_values``) at the last layer with δ added uniformly at every
    template (MEMIT's z), with the same step, learning-rate, KL, weight-decay and clamp settings.
    ``mom2_update_weight`` is λ in ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹ (C_l = E[k kᵀ] at layer l).
    For one edit the layer then applies s/(1+s) of its share, s = kᵀC⁻¹k/λ; a typical key has
    kᵀC⁻¹k = d_in (the trace of C⁻¹E[kkᵀ]), so None takes λ = d_in (s ≈ 1, whatever the width).
    The reference values, 20,000 for GPT-2 XL (d_in 6,400) and 15,000 for GPT-J (16,384), give s of
    0.3 and 1.1; 15,000 on SmolLM2's d_in of 1,536 would give 0.1 and edits that barely move.
    """

    layers: tuple[int, ...] | None = None
    mom2_update_weight: float | None = None
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    context_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    kl_prompt: str = "{} is a"
    key_prompt_weight: float = 0.5
    seed: int = 0
    chunk: int | None = None  # requests whose δ are optimised in shared passes; None: by device (rome.CHUNK)

    def __post_init__(self) -> None:
        if self.mom2_update_weight is not None and self.mom2_update_weight <= 0:
            raise RequestError(f"mom2_update_weight must be > 0, not {self.mom2_update_weight}")
        if self.layers is not None and (not self.layers or list(self.layers) != sorted(set(self.layers))):
            raise RequestError(f"layers must be distinct and increasing, not {list(self.layers)}")
        if self.chunk is not None and self.chunk < 1:
            raise RequestError(f"chunk must be >= 1, not {self.chunk}")

    def value_hparams(self, layer: int) -> ROMEHyperParams:
        """ROME hyperparameters for the target optimisation at ``layer`` (the last MEMIT layer)."""
        return ROMEHyperParams(
            layer=layer,
            v_steps=self.v_steps,
            v_lr=self.v_lr,
            v_weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor,
            kl_factor=self.kl_factor,
            early_stop_loss=self.early_stop_loss,
            context_length_params=self.context_length_params,
            kl_prompt=self.kl_prompt,
            key_prompt_weight=self.key_prompt_weight,
            seed=self.seed,
            value_scaling="uniform",
            max_update_ratio=0.0,
            neighbours=0,  # MEMIT spreads the update over layers; it keeps no neighbours
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["context_length_params"] = [list(x) for x in self.context_length_params]
        d["layers"] = None if self.layers is None else list(self.layers)
        return d
