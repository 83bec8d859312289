"""Architecture knowledge as data: one ModelSpec per ``config.model_type``.

Nothing here guesses from shapes or name strings. Whether the edited matrix is a GPT-2
``Conv1D`` (weight stored ``(in, out)``) or an ``nn.Linear`` (weight stored ``(out, in)``) is
declared per architecture, because a square matrix would make any shape-based guess silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ArchitectureError


@dataclass(frozen=True)
class ModelSpec:
    """Where things live in a causal LM, as module-name templates with ``{}`` for the layer."""

    model_type: str
    layers: str  # the ModuleList of blocks, e.g. "transformer.h"
    mlp_out: str  # the edited matrix's module, e.g. "transformer.h.{}.mlp.c_proj"
    mlp: str  # the whole MLP, e.g. "transformer.h.{}.mlp"
    attn: str  # the attention module, e.g. "transformer.h.{}.attn"
    embed: str  # token embedding module
    final_norm: str  # norm before the LM head
    lm_head: str  # output projection
    conv1d: bool = False  # True: weight is (in, out) and ΔW is stored transposed
    default_layer_fraction: float = 0.2  # default edit layer = round(fraction * (n_layers - 1))

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_out_module(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def mlp_module(self, layer: int) -> str:
        return self.mlp.format(layer)

    def attn_module(self, layer: int) -> str:
        return self.attn.format(layer)

    def mlp_out_param(self, layer: int) -> str:
        """Full parameter name of the edited weight, e.g. ``model.layers.6.mlp.down_proj.weight``."""
        return self.mlp_out.format(layer) + ".weight"

    @property
    def layout(self) -> str:
        return "conv1d" if self.conv1d else "linear"


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp="model.layers.{}.mlp",
    attn="model.layers.{}.self_attn",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

# Default layers follow the ROME paper where it chose one (GPT-2 XL 17/48, GPT-J 5/28) and causal
# tracing elsewhere; see docs/models.md and bench/RESULTS.md for the evidence behind each.
# The entries look alike on purpose: this table is data, one architecture per entry, every field named.
SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(
        "gpt2",
        layers="transformer.h",
        mlp_out="transformer.h.{}.mlp.c_proj",
        mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        conv1d=True,
        default_layer_fraction=17 / 47,
    ),
    "gptj": ModelSpec(
        "gptj",
        layers="transformer.h",
        mlp_out="transformer.h.{}.mlp.fc_out",
        mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        default_layer_fraction=5 / 27,
    ),
    "gpt_neox": ModelSpec(
        "gpt_neox",
        layers="gpt_neox.layers",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        mlp="gpt_neox.layers.{}.mlp",
        attn="gpt_neox.layers.{}.attention",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        default_layer_fraction=0.2,
    ),
    **{
        t: ModelSpec(t, **_LLAMA_LIKE, default_layer_fraction=0.2)
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
}


def register_spec(spec: ModelSpec, *, overwrite: bool = False) -> None:
    """Teach rompatch a new architecture (``config.model_type``) without changing its code."""
    if spec.model_type in SPECS and not overwrite:
        raise ArchitectureError(
            f"a ModelSpec for model_type '{spec.model_type}' exists; pass overwrite=True to replace it"
        )
    SPECS[spec.model_type] = spec


def model_type_of(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if not mt:
        raise ArchitectureError("model has no config.model_type; pass spec=ModelSpec(...) explicitly")
    return mt


def get_spec(model_or_config: Any, spec: ModelSpec | None = None) -> ModelSpec:
    """The ModelSpec for a model (or its config). An explicit ``spec`` wins."""
    if spec is not None:
        return spec
    mt = model_type_of(model_or_config)
    try:
        return SPECS[mt]
    except KeyError:
        known = ", ".join(sorted(SPECS))
        raise ArchitectureError(
            f"no ModelSpec for model_type '{mt}' (known: {known}); pass spec=rompatch.ModelSpec(model_type='{mt}', "
            "layers=..., mlp_out=..., ...) or call rompatch.register_spec(...) first"
        ) from None


def num_layers(model_or_config: Any) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


def default_layer(model_or_config: Any, spec: ModelSpec | None = None) -> int:
    """The default edit layer for this model: an explicit per-model choice, else the spec's fraction."""
    spec = get_spec(model_or_config, spec)
    key = _model_key(model_or_config, spec)
    if key in LAYER_OVERRIDES:
        return LAYER_OVERRIDES[key]
    return int(round(spec.default_layer_fraction * (num_layers(model_or_config) - 1)))


def default_neighbours(model_or_config: Any, spec: ModelSpec | None = None) -> int:
    """The default of ``ROMEHyperParams.neighbours`` for this model: ``NEIGHBOUR_DEFAULTS``, else 0."""
    return NEIGHBOUR_DEFAULTS.get(_model_key(model_or_config, get_spec(model_or_config, spec)), 0)


def _model_key(model_or_config: Any, spec: ModelSpec) -> tuple[str, int, int]:
    """What per-model defaults are keyed by: (model_type, n_layers, hidden_size)."""
    return (spec.model_type, num_layers(model_or_config), hidden_size(model_or_config))


def hidden_size(model_or_config: Any) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size)


# Per-model default layers chosen from evidence, keyed by (model_type, n_layers, hidden_size):
# GPT-2 XL's 17 comes from the ROME paper.  Entries for the embedded models cite bench/RESULTS.md.
LAYER_OVERRIDES: dict[tuple[str, int, int], int] = {
    ("gpt2", 48, 1600): 17,
    ("gptj", 28, 4096): 5,
    # SmolLM2-135M: causal tracing over known_1000 peaks at layer 4 for the MLP at the last subject
    # token, and on all 357 CounterFact records layer 4 beats the 0.2·(n−1) rule's layer 6 on PS,
    # NS and S with fewer capped updates (bench/RESULTS.md, "Default edit layer").
    ("llama", 30, 576): 4,
}

# Per-model defaults of ROMEHyperParams.neighbours (keep the edit away from the names the model puts
# next to its subject), keyed like LAYER_OVERRIDES. A model gets an entry only where the rule set
# before its results held: on all 357 shared CounterFact records, NS at least 1 point above plain
# ROME with ES and PS each at most 0.5 points below (bench/RESULTS.md, "Edits that stay on their
# subject"). Everywhere else the default is 0 (off).
NEIGHBOUR_DEFAULTS: dict[tuple[str, int, int], int] = {
    # Gemma-3-270m, all 357 records: NS 62.1 -> 72.2 (unedited 76.3), ES 100 both, PS 98.0 -> 97.6.
    ("gemma3_text", 18, 640): 64,
}


def check_layer(model: Any, layer: int) -> None:
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ArchitectureError(f"layer {layer} is out of range; this model has layers 0..{n - 1}")


@dataclass(frozen=True)
class EditTarget:
    """Where an edit goes: the architecture spec and the layer, resolved once (``EditTarget.resolve``)
    and passed down through statistics, keys, values and the patch."""

    spec: ModelSpec
    layer: int

    @property
    def module(self) -> str:
        """The edited MLP output projection, e.g. ``model.layers.4.mlp.down_proj``."""
        return self.spec.mlp_out_module(self.layer)

    @property
    def parameter(self) -> str:
        """Its weight's full parameter name."""
        return self.spec.mlp_out_param(self.layer)

    @classmethod
    def resolve(cls, model: Any, *, spec: ModelSpec | None = None, layer: int | None = None) -> EditTarget:
        """The spec (``spec``, else the registered one for the model type) and the layer (``layer``,
        else the model's default), checked against the model."""
        spec = get_spec(model, spec)
        layer = default_layer(model, spec) if layer is None else layer
        check_layer(model, layer)
        return cls(spec=spec, layer=layer)


def module_io(model: Any, layer: int, spec: ModelSpec | None = None) -> tuple[int, int]:
    """(in_features, out_features) of the edited matrix at ``layer``, from the declared layout."""
    spec = get_spec(model, spec)
    w = edited_weight(model, layer, spec)
    return (w.shape[0], w.shape[1]) if spec.conv1d else (w.shape[1], w.shape[0])


def edited_weight(model: Any, layer: int, spec: ModelSpec | None = None):
    spec = get_spec(model, spec)
    check_layer(model, layer)
    name = spec.mlp_out_module(layer)
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ArchitectureError(
            f"module '{name}' not found in this {spec.model_type} model; the ModelSpec does not match it"
        ) from None
    return mod.weight
