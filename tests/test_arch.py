"""The architecture table, checked against tiny random models of every supported model_type."""

from __future__ import annotations

import pytest
from transformers.pytorch_utils import Conv1D

from rompatch.arch import SPECS, ModelSpec, default_layer, get_spec, module_io, register_spec
from rompatch.errors import ArchitectureError
from tests.helpers.tiny import ARCHS, make_config, make_model


def test_every_spec_has_a_tiny_model():
    assert set(SPECS) == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_matches_model(arch):
    model = make_model(arch)
    spec = get_spec(model)
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        mod = model.get_submodule(spec.mlp_out_module(layer))
        assert isinstance(mod, Conv1D) == spec.conv1d
        fan_in, fan_out = module_io(model, layer)
        assert fan_out == cfg.hidden_size
        # The MLP's output matrix reads the MLP's hidden activations.
        assert fan_in == getattr(cfg, "intermediate_size", None) or fan_in == 4 * cfg.hidden_size
        for name in (spec.block(layer), spec.mlp_module(layer), spec.attn_module(layer)):
            model.get_submodule(name)
        assert model.get_parameter(spec.mlp_out_param(layer)) is mod.weight
    for name in (spec.embed, spec.final_norm, spec.lm_head):
        model.get_submodule(name)
    assert 0 <= default_layer(model) < cfg.num_hidden_layers


def test_gpt2_xl_default_layer_is_papers():
    assert default_layer(make_config("gpt2", n_layer=48, n_embd=1600, n_head=25)) == 17


def test_smollm2_default_layer_is_tracings_peak():
    """SmolLM2-135M's shape gets layer 4 (evidence in bench/RESULTS.md); other Llama shapes keep 0.2·(n−1)."""
    smol = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                num_key_value_heads=3)  # fmt: skip
    assert default_layer(make_config("llama", **smol)) == 4
    assert default_layer(make_config("llama", **{**smol, "hidden_size": 630})) == 6


def test_unknown_architecture_message():
    class Cfg:
        model_type = "mamba9"

    with pytest.raises(
        ArchitectureError, match=r"no ModelSpec for model_type 'mamba9' .*pass spec=rompatch.ModelSpec"
    ):
        get_spec(Cfg())


def test_register_spec_for_new_architecture():
    spec = ModelSpec(
        "my_llama",
        **{
            k: getattr(SPECS["llama"], k)
            for k in ("layers", "mlp_out", "mlp", "attn", "embed", "final_norm", "lm_head")
        },
    )
    register_spec(spec)
    try:

        class Cfg:
            model_type = "my_llama"

        assert get_spec(Cfg()) is spec
        with pytest.raises(ArchitectureError, match="exists; pass overwrite=True"):
            register_spec(spec)
    finally:
        del SPECS["my_llama"]


def test_layer_out_of_range():
    with pytest.raises(ArchitectureError, match=r"layer 7 is out of range; this model has layers 0..3"):
        module_io(make_model("llama"), 7)
