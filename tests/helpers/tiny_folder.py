"""A tiny model folder with a word-level tokenizer (so load_model/greedy work on it), and
``steer_patch``, a patch that provably changes what the model says next.

Used by tests/test_loading.py, the Hub tests (tests/hub/) and tests/cli/test_hub.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rompatch.arch import get_spec
from rompatch.hooks import Trace
from rompatch.models import load_model, model_identity
from rompatch.patch import ParamInfo, Patch, RankOneDelta, new_patch, save_patch
from rompatch.predict import top_next_tokens
from rompatch.request import EditRequest
from tests.helpers.tiny import VOCAB, make_model

WORDS = (
    "the of and a in is to was for on as with by at from his her it that city capital language works "
    "located country born plays sport speaks official team Eiffel Tower Colosseum Louvre Danielle Darrieux "
    "Paris Rome London Berlin Madrid Tokyo French Italian English German football basketball"
).split()


def make_tokenizer(model_type: str):
    """A word-level fast tokenizer with exactly VOCAB tokens (every model id decodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if model_type == "gpt2":
        specials = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<unk>"}
        head = ["<|endoftext|>", "<unk>"]
    else:
        specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        head = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab_list = head + [w for w in WORDS if w not in head]
    vocab_list += [f"w{i}" for i in range(VOCAB - len(vocab_list))]
    assert len(vocab_list) == VOCAB
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_list)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


def save_tiny(folder: Path, model_type: str = "llama", *, seed: int = 0) -> Path:
    """A tiny random model plus tokenizer saved as a normal model folder."""
    model = make_model(model_type, seed=seed)
    with torch.no_grad():  # larger weights: sharper, less uniform next-token distributions
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    make_tokenizer(model_type).save_pretrained(folder)
    return folder


def steer_patch(
    model, tok, prompt: str, target: str, *, layer: int = 1, scale: float = 50.0, lineage=()
) -> Patch:
    """A rank-one patch on ``layer`` that makes ``target`` the next token after ``prompt``.

    u = the edited module's input at the prompt's last token (normalised), v = scale · target's
    unembedding row: ΔW k = scale·‖k‖ · W_U[target], pushing the residual stream towards ``target``.
    """
    spec = get_spec(model)
    module = spec.mlp_out_module(layer)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad(), Trace(model, module, retain_input=True, stop=True) as tr:
        model(**enc)
    k = tr.input[0, -1].float()
    tid = tok.convert_tokens_to_ids(target)
    v = model.get_output_embeddings().weight[tid].detach().float()
    v = scale * v / v.norm()
    subject, rest = prompt.split(" ", 1) if " " in prompt else (prompt, "")
    req = EditRequest("{} " + rest if rest else "{}", subject, target, None)
    name = spec.mlp_out_param(layer)
    delta = RankOneDelta(
        u=k / k.norm(), v=v, layer=layer, parameter=name, request=req, kind="manual",
        metrics={"p_new_before": 0.01, "p_new_after": 0.9},
    )  # fmt: skip
    return new_patch(
        [delta],
        base=model_identity(model),
        parameters={name: ParamInfo.of(model.get_parameter(name).data, spec.layout)},
        lineage=list(lineage),
    )


def top1(model, tok, prompt: str) -> str:
    return top_next_tokens(model, tok, prompt, k=1)[0][0].strip()


PROMPT_A = "Eiffel Tower is located in"
PROMPT_B = "Danielle Darrieux speaks the language"
DOC_PROMPT = "The Eiffel Tower is located in the city of"


def steer_patches(root: Path) -> dict:
    """A tiny Llama model folder under ``root`` and three saved patches that change three next-token
    predictions (the Hub tests' ``tiny``)."""
    folder = save_tiny(root / "llama-tiny", "llama")
    model, tok = load_model(str(folder), device="cpu")
    before = {p: top1(model, tok, p) for p in (PROMPT_A, PROMPT_B, DOC_PROMPT)}
    a = steer_patch(model, tok, PROMPT_A, "Rome", layer=1)
    b = steer_patch(model, tok, PROMPT_B, "German", layer=2)
    doc = steer_patch(model, tok, DOC_PROMPT, "Rome", layer=1)
    paths = {
        "a": save_patch(a, root / "eiffel-rome.safetensors"),
        "b": save_patch(b, root / "darrieux-german.safetensors"),
        "doc": save_patch(doc, root / "doc-edit.safetensors"),
    }
    return {"folder": folder, "root": root, "before": before, "paths": paths, "a": a, "b": b, "doc": doc}
