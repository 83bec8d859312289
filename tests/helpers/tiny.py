"""Tiny, randomly initialised models of every architecture in rompatch.arch, built in code."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 512
_COMMON_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    vocab_size=VOCAB,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS: dict[str, dict] = {
    "gpt2": dict(
        n_embd=64, n_layer=4, n_head=4, n_positions=128, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    ),
    "gptj": dict(
        n_embd=64,
        n_layer=4,
        n_head=4,
        rotary_dim=8,
        n_positions=128,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
        vocab_size=VOCAB,
        rotary_pct=0.25,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": _COMMON_LLAMA,
    "mistral": _COMMON_LLAMA,
    "qwen2": _COMMON_LLAMA,
    "qwen3": dict(_COMMON_LLAMA, head_dim=16),
    "gemma": dict(_COMMON_LLAMA, head_dim=16),
    "gemma2": dict(_COMMON_LLAMA, head_dim=16, sliding_window=64),
    "gemma3_text": dict(_COMMON_LLAMA, head_dim=16, sliding_window=64),
}
ARCHS = list(CONFIGS)


def make_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})


def make_model(
    model_type: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init_range: float | None = None,
    **overrides,
):
    """A tiny random causal LM in eval mode.

    ``init_range`` sets ``config.initializer_range``: the default (0.02) makes MLP outputs tiny, so
    edit-engine tests pass a larger value to get activation scales like a trained model's.
    """
    torch.manual_seed(seed)
    if init_range is not None:
        overrides["initializer_range"] = init_range
    model = AutoModelForCausalLM.from_config(make_config(model_type, **overrides))
    model.eval()
    return model.to(dtype)
