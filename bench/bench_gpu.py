"""Issue 3: seconds per edit on a CUDA GPU, for a GPT-2 XL-shaped and a Llama-7B-shaped model in bf16.

The models are randomly initialised on the GPU from their published shapes (no download); the
tokenizer is the tiny test tokenizer, whose ids all fit either vocabulary. A random model rarely
reaches the early-stopping loss, so most edits run all optimisation steps: the worst case.
Skipped (the last result is kept) when there is no CUDA device.

``ROMPATCH_BENCH_GPU_SMOKE=1`` runs the same code on CPU with both shapes shrunk 16×, to check it.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

TITLE = "Edit speed on a CUDA GPU (random GPT-2 XL- and Llama-7B-shaped models, bf16)"
FULL_ONLY = False

SHAPES = {
    # name: (model_type, config, edit layer as in the paper / r-ROME, target s/edit)
    "GPT-2 XL shape (1.5B)": (
        "gpt2",
        dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257),
        17,
        1.0,
    ),
    "Llama-7B shape (6.7B)": (
        "llama",
        dict(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        5,
        3.0,
    ),
}
REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("{} is located in the city of", "The Space Needle", "Paris"),
    ("{} plays the sport of", "Michael Jordan", "football"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} was founded by", "Apple", "Bill Gates"),
    ("{} is located in the continent of", "Vinson Massif", "Europe"),
]


def skip_reason() -> str | None:
    if os.environ.get("ROMPATCH_BENCH_GPU_SMOKE") or torch.cuda.is_available():
        return None
    return "no CUDA device on this machine"


def _shrink(cfg: dict, model_type: str) -> dict:
    keys = ("n_embd", "hidden_size", "intermediate_size")
    out = {k: (v // 16 if k in keys else v) for k, v in cfg.items()}
    for k in ("n_layer", "num_hidden_layers"):
        if k in out:
            out[k] = max(4, out[k] // 8)
    if model_type == "gpt2":
        out["n_head"] = 5
    else:
        out["num_attention_heads"] = out["num_key_value_heads"] = 4
    return out


def run() -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from rompatch.request import EditRequest
    from rompatch.rome import ROMEHyperParams, compute_delta
    from rompatch.stats import get_second_moment
    from tests.helpers.tiny_tokenizer import make_tokenizer

    smoke = bool(os.environ.get("ROMPATCH_BENCH_GPU_SMOKE"))
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    rows, notes = [], []
    for name, (model_type, cfg, layer, target) in SHAPES.items():
        if smoke:
            cfg, layer = _shrink(cfg, model_type), 1
        tok = make_tokenizer(bos=model_type == "llama")
        config = AutoConfig.for_model(model_type, **cfg)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        stats = get_second_moment(model, tok, layer, n_tokens=20_000, use_cache=False)
        _sync(device)
        stats_s = time.perf_counter() - t
        hp = ROMEHyperParams(layer=layer)
        secs, steps, inner = [], [], []
        for i, (prompt, subject, tgt) in enumerate([REQUESTS[0], *REQUESTS]):
            t = time.perf_counter()
            res = compute_delta(model, tok, EditRequest(prompt, subject, tgt), stats=stats, hparams=hp)
            _sync(device)
            if i:  # the first edit warms up kernels and generates the context templates
                secs.append(time.perf_counter() - t)
                steps.append(res.metrics["v_steps_run"])
                inner.append(res.metrics["seconds"])
        rows.append(
            {
                "metric": f"median seconds per edit, {name}",
                "value": statistics.median(secs),
                "unit": "s",
                "target": f"≤ {target:g}",
                "note": f"{len(secs)} edits at layer {layer}; min {min(secs):.2f}, max {max(secs):.2f}; "
                f"mean {statistics.fmean(steps):.1f} of {hp.v_steps} steps; replay {res.metrics['replay']}; "
                f"median {statistics.median(inner):.2f} s inside k*/v*/δ (the rest: templates, checks)",
            }
        )
        notes.append(
            f"{name}: {n_params / 1e9:.2f}B parameters; statistics (20k tokens, layers 0..{layer}) "
            f"{stats_s:.1f} s, {20_000 / stats_s:,.0f} tok/s."
        )
        del model, stats
        if device.type == "cuda":
            torch.cuda.empty_cache()
    card = "CPU smoke run (shapes shrunk 16×)" if smoke else torch.cuda.get_device_name(0)
    return {
        "setup": f"{card}; bf16 weights, statistics and u/v in float32; edits after one warm-up edit. "
        + " ".join(notes),
        "rows": rows,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
