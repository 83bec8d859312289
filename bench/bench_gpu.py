"""Issues 3 and 16: seconds per edit and peak memory on a CUDA GPU, for GPT-2 XL-, Llama-7B- and
30B-shaped models in bf16 (the 30B shape with half its blocks offloaded to CPU memory).

The models are randomly initialised on the GPU from their published shapes (no download); the
tokenizer is the tiny test tokenizer, whose ids all fit either vocabulary. A random model rarely
reaches the early-stopping loss, so most edits run all optimisation steps: the worst case.
Skipped (the last result is kept) when there is no CUDA device.

Issue 16 adds, per shape, the peak GPU memory of the edits (``torch.cuda.max_memory_allocated``)
and, for the first shape, where one edit's time goes (``_Phases``: wall time of the engine's stages,
the GPU synchronised around each). The 30B-class shape is built in CPU memory and dispatched with
accelerate (``dispatch_model``): blocks of the second half stay in CPU memory and are moved to the
GPU for each forward pass, as ``--device-map`` with ``--max-memory`` does when the GPU is too small.

``ROMPATCH_BENCH_GPU_SMOKE=1`` runs the same code on CPU with the shapes shrunk 16× (the offloaded
blocks go to disk instead), to check it.
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
# Offloaded: a LLaMA-33B-shaped model (32.5B parameters, 65 GB in bf16), half its blocks in CPU memory.
OFFLOADED = {
    "LLaMA-30B class (32.5B), second half of the blocks offloaded": (
        "llama",
        dict(
            num_hidden_layers=60,
            hidden_size=6656,
            intermediate_size=17920,
            num_attention_heads=52,
            num_key_value_heads=52,
            vocab_size=32000,
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        5,
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
    rows, notes, markdown = [], [], []
    for i_shape, (name, (model_type, cfg, layer, target)) in enumerate(SHAPES.items()):
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
        _reset_peak(device)
        for i, (prompt, subject, tgt) in enumerate([REQUESTS[0], *REQUESTS]):
            t = time.perf_counter()
            res = compute_delta(model, tok, EditRequest(prompt, subject, tgt), stats=stats, hparams=hp)
            _sync(device)
            if i:  # the first edit warms up kernels and generates the context templates
                secs.append(time.perf_counter() - t)
                steps.append(res.metrics["v_steps_run"])
                inner.append(res.metrics["seconds"])
        peak = _peak_gb(device)
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
        weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        rows.append(
            {
                "metric": f"peak GPU memory of the edits, {name}",
                "value": round(peak, 2) if peak is not None else "—",
                "unit": "GiB",
                "target": "",
                "note": f"torch.cuda.max_memory_allocated over the {len(secs) + 1} edits; weights {weights_gb:.2f} GiB",
            }
        )
        if i_shape == 0:  # where one edit's time goes
            req = EditRequest(*REQUESTS[1])
            with _Phases(device) as ph:
                t = time.perf_counter()
                compute_delta(model, tok, req, stats=stats, hparams=hp)
                _sync(device)
                ph.total = time.perf_counter() - t
            markdown += [
                f"Where one edit's time goes, {name} ({ph.total:.2f} s in all):",
                "",
                *ph.table(),
                "",
            ]
        notes.append(
            f"{name}: {n_params / 1e9:.2f}B parameters; statistics (20k tokens, layers 0..{layer}) "
            f"{stats_s:.1f} s, {20_000 / stats_s:,.0f} tok/s."
        )
        del model, stats
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += _offloaded(smoke, device, dtype, notes)
    card = "CPU smoke run (shapes shrunk 16×)" if smoke else torch.cuda.get_device_name(0)
    return {
        "setup": f"{card}; bf16 weights, statistics and u/v in float32; edits after one warm-up edit. "
        + " ".join(notes),
        "rows": rows,
        "markdown": "\n".join(markdown),
    }


def _offloaded(smoke: bool, device: torch.device, dtype: torch.dtype, notes: list[str]) -> list[dict]:
    """One edit of each OFFLOADED shape, dispatched by accelerate with half its blocks off the GPU."""
    import tempfile

    from accelerate import dispatch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rompatch.placement import is_offloaded
    from rompatch.request import EditRequest
    from rompatch.rome import ROMEHyperParams, compute_delta
    from rompatch.stats import get_second_moment
    from tests.helpers.tiny_tokenizer import make_tokenizer

    rows = []
    for name, (model_type, cfg, layer) in OFFLOADED.items():
        if smoke:
            cfg, layer = _shrink(cfg, model_type), 1
        n = cfg["num_hidden_layers"]
        tok = make_tokenizer(bos=True)
        torch.manual_seed(0)
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=dtype)  # CPU
        model.eval()
        build_s = time.perf_counter() - t
        main = 0 if device.type == "cuda" else "cpu"
        # offloaded blocks: CPU memory beside a GPU; disk on a CPU-only machine
        away = "cpu" if device.type == "cuda" else "disk"
        dm = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main}
        dm.update({f"model.layers.{i}": main if i < n // 2 else away for i in range(n)})
        with tempfile.TemporaryDirectory(prefix="rompatch-offload-") as off:
            model = dispatch_model(model, device_map=dm, offload_dir=off)
            assert is_offloaded(model, f"model.layers.{n - 1}.mlp.down_proj.weight")
            t = time.perf_counter()
            stats = get_second_moment(model, tok, layer, n_tokens=4_000, use_cache=False)
            _sync(device)
            stats_s = time.perf_counter() - t
            hp = ROMEHyperParams(layer=layer)
            _reset_peak(device)
            secs = []
            for prompt, subject, tgt in REQUESTS[:2]:  # the first warms up
                t = time.perf_counter()
                res = compute_delta(model, tok, EditRequest(prompt, subject, tgt), stats=stats, hparams=hp)
                _sync(device)
                secs.append(time.perf_counter() - t)
            peak = _peak_gb(device)
        rows.append(
            {
                "metric": f"seconds per edit, {name}",
                "value": round(secs[-1], 2),
                "unit": "s",
                "target": "works",
                "note": f"one edit after a warm-up ({secs[0]:.1f} s) at layer {layer}; "
                f"{res.metrics['v_steps_run']} of {hp.v_steps} steps; replay {res.metrics['replay']}"
                + (f"; peak GPU memory {peak:.1f} GiB" if peak is not None else ""),
            }
        )
        notes.append(
            f"{name}: built in CPU memory in {build_s:.0f} s, statistics (4k tokens, layers 0..{layer}) "
            f"{stats_s:.1f} s."
        )
        del model, stats
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


class _Phases:
    """Wall time of the engine's stages during one edit: wraps them (the GPU synchronised around each
    call) while the block runs. Stages nest: 'δ optimisation' includes 'replay set-up' and the
    per-step 'replay forward'; the backward passes and Adam are what it has beyond them."""

    # label: (class in rompatch.rome or None for a module function, attribute)
    STAGES = {
        "context templates": (None, "context_templates"),
        "keys (k* and the KL prompt)": (None, "subject_keys"),
        "u = C⁻¹k* (solve)": (None, "solve_key"),
        "‖W‖₂": (None, "spectral_norm"),
        "δ optimisation": (None, "compute_values"),
        "replay set-up": ("_Replay", "__init__"),
        "replay forward (per step)": ("_Replay", "run"),
    }

    def __init__(self, device: torch.device) -> None:
        self.device, self.spent, self.calls, self._undo = device, {}, {}, []
        self.total = 0.0

    def __enter__(self) -> _Phases:
        from rompatch import rome

        for label, (cls, attr) in self.STAGES.items():
            owner = rome if cls is None else getattr(rome, cls)
            original = getattr(owner, attr)
            setattr(owner, attr, self._timed(label, original))
            self._undo.append((owner, attr, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)

    def _timed(self, label: str, fn):
        def wrapper(*args, **kwargs):
            _sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t
                self.calls[label] = self.calls.get(label, 0) + 1

        return wrapper

    def table(self) -> list[str]:
        out = ["| stage | seconds | calls | share |", "| --- | --- | --- | --- |"]
        for label in self.STAGES:
            if label in self.spent:
                sec = self.spent[label]
                out.append(f"| {label} | {sec:.3f} | {self.calls[label]} | {100 * sec / self.total:.0f}% |")
        top = (
            "context templates",
            "keys (k* and the KL prompt)",
            "u = C⁻¹k* (solve)",
            "‖W‖₂",
            "δ optimisation",
        )
        rest = self.total - sum(self.spent.get(k, 0.0) for k in top)
        out.append(
            f"| everything else (validation, v, metrics) | {rest:.3f} | | {100 * rest / self.total:.0f}% |"
        )
        return out


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
