"""Test helpers: patches from chosen vectors (independent of the edit engine), and the tiny models,
request and hyperparameters that the edit tests share."""

from __future__ import annotations

import pytest
import torch

from rompatch.arch import get_spec, module_io
from rompatch.models import model_identity
from rompatch.patch import ParamInfo, Patch, RankOneDelta, new_patch
from rompatch.request import EditRequest
from rompatch.rome import ROMEHyperParams
from tests.helpers.tiny import make_model
from tests.helpers.tiny_tokenizer import make_tokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def vector_patch(
    model, layer: int = 1, *, seed: int = 0, scale: float = 0.5, n: int = 1, lineage=(), subject="Alice"
):
    """A patch with ``n`` random rank-one deltas on ``layer``'s MLP output matrix, fingerprinted on ``model``."""
    spec = get_spec(model)
    name = spec.mlp_out_param(layer)
    fan_in, fan_out = module_io(model, layer)
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for i in range(n):
        u = torch.randn(fan_in, generator=g)
        u = u / u.norm()
        v = torch.randn(fan_out, generator=g) * scale
        req = EditRequest("{} works in the city of", f"{subject}{i}" if n > 1 else subject, "Rome", "Paris")
        deltas.append(
            RankOneDelta(
                u=u, v=v, layer=layer, parameter=name, request=req, kind="manual", hparams={"seed": seed}
            )
        )
    weight = model.get_parameter(name)
    return new_patch(
        deltas,
        base=model_identity(model),
        parameters={name: ParamInfo.of(weight.data, spec.layout)},
        lineage=list(lineage),
    )


def mixed_patch(model, *, seed: int = 0) -> Patch:
    """Two deltas on layer 1 and one on layer 2: different ranks per module (rank_pattern)."""
    p1 = vector_patch(model, 1, n=2, seed=seed + 1)
    p2 = vector_patch(model, 2, n=1, seed=seed + 2, subject="Bob")
    return Patch(deltas=p1.deltas + p2.deltas, base=p1.base, parameters={**p1.parameters, **p2.parameters})


# ------------------------------------------------------------------ the edit engine on tiny models
# (tests/test_create.py, test_rome.py, test_stats.py, test_cuda.py, cli/test_create.py)

# In a random tiny model attention is near-uniform, so a change at the subject reaches the last
# position only diluted; the subject therefore ends the prompt here. Larger init and learning rate
# give activation scales like a trained model's (see tests/tiny.make_model).
REQ = EditRequest("The Space Needle is located in {}", "the city of", "Rome", "Seattle")
# A random matrix is no trained MLP: moving the tiny model's prediction takes an update larger than
# the matrix itself, so the cap on ‖ΔW‖₂ (max_update_ratio) is off here and tested on its own
# (tests/test_rome.py).
HP = ROMEHyperParams(layer=1, v_steps=40, v_lr=3.0, context_length_params=((3, 2),), max_update_ratio=0)
INIT = 0.3


def edit_model(arch, **kw):
    model = make_model(arch, init_range=INIT, **kw)
    if arch in ("gemma2", "gemma3_text"):
        # Gemma 2/3 re-normalise the MLP output (post_feedforward_layernorm, scale 1 + w). At random
        # init (w = 0) that caps the MLP's contribution far below the residual stream; trained models
        # learn large w. Give the tiny model a trained-like scale so an MLP edit can move the output.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.post_feedforward_layernorm.weight.fill_(4.0)
    return model


def edit_tokenizer(arch):
    # Llama-family tokenizers add BOS and (Gemma) pad on the left; GPT-style ones do neither.
    llama_like = arch not in ("gpt2", "gptj", "gpt_neox")
    return make_tokenizer(bos=llama_like, padding_side="left" if arch.startswith("gemma") else "right")


def greedy_next(model, tok, text):
    ids = tok(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        return int(model(**ids).logits[0, -1].argmax())


def save_edit_folder(folder):
    """The tiny Llama of the edit tests saved as a model folder (for the CLI and checkpoints)."""
    make_model("llama", init_range=INIT).save_pretrained(folder)
    edit_tokenizer("llama").save_pretrained(folder)
    return folder
