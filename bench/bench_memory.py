"""Issue 16, point 4: peak memory of ``stats`` and ``create`` on a TinyLlama-1.1B-shaped model on CPU.

A randomly initialised model with TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632, 32000
tokens) is saved once as a model folder (bench/_work, float32 and bfloat16), then each measurement
runs in a fresh process: load the folder, then either compute the statistics of the default layer
(4,096 tokens of the tiny test corpus) or compute one edit with them (cached). Peak memory is the
process's peak resident set (VmHWM), with the resident set after ``import torch`` and after
loading taken on the way, so the peak splits into interpreter + libraries, weights and the rest.

Configurations: float32, bfloat16, and float32 with a device map that keeps the embeddings, the head
and the first half of the blocks in memory and offloads the second half to disk (on a CPU-only
machine a block "on the CPU" is simply resident; on a GPU machine it would be CPU-offloaded).

``ROMPATCH_BENCH_MEMORY_SMOKE=1`` runs the same code with the shape shrunk 8× (a check, not a result).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TITLE = "Peak memory of stats and create: TinyLlama-1.1B shape on CPU (issue 16)"
FULL_ONLY = True

HERE = Path(__file__).resolve().parent
SHAPE = dict(
    num_hidden_layers=22,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
STATS_TOKENS = 4096
CONFIGS = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "float32, half the blocks on disk": {"dtype": "float32", "offload": True},
}


def _smoke() -> bool:
    return bool(os.environ.get("ROMPATCH_BENCH_MEMORY_SMOKE"))


def _shape() -> dict:
    if not _smoke():
        return dict(SHAPE)
    s = dict(SHAPE)
    s.update(
        num_hidden_layers=6,
        hidden_size=256,
        intermediate_size=704,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    return s


def _folder(dtype: str) -> Path:
    """The model folder of ``dtype`` (written once, with the tiny test tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers.tiny_tokenizer import make_tokenizer

    name = f"tinyllama-1.1b-shape-{dtype}" + ("-smoke" if _smoke() else "")
    folder = HERE / "_work" / name
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("llama", **_shape()), dtype=getattr(torch, dtype)
    )
    tmp = folder.with_name(name + ".tmp")
    model.save_pretrained(tmp)
    make_tokenizer(bos=True).save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from the
    parent through fork and exec, so a child of a large process reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


class _Sampler:
    """Peaks of the resident set's two parts, read from /proc/self/status every 20 ms by a thread:
    anonymous memory (tensors, allocator) and file-backed pages (the memory-mapped checkpoint, which
    the kernel can drop and read again: weights accelerate maps from disk show up here)."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.anon = max(self.anon, int(line.split()[1]) / 1024)
                elif line.startswith("RssFile:"):
                    self.file = max(self.file, int(line.split()[1]) / 1024)

    def start(self) -> _Sampler:
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def measure(args: dict) -> dict:
    """One measurement, in this (fresh) process: ``args`` = {folder, dtype, offload, phase, cache, corpus}."""
    import time

    import torch
    import transformers  # noqa: F401 - imported before the baseline is taken

    from rompatch.arch import default_layer
    from rompatch.create import create_patch
    from rompatch.models import load_model
    from rompatch.request import EditRequest
    from rompatch.rome import ROMEHyperParams
    from rompatch.stats import get_second_moment

    after_import = _rss_mb()  # interpreter, torch, transformers and rompatch

    os.environ["ROMPATCH_CACHE"] = args["cache"]
    kw: dict = {"dtype": args["dtype"]}
    if args.get("offload"):
        n = _shape()["num_hidden_layers"]
        dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
        dm.update({f"model.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)})
        kw.update(device_map=dm)
    else:
        kw.update(device="cpu")
    sampler = _Sampler().start()
    t0 = time.perf_counter()
    model, tok = load_model(args["folder"], **kw)
    loaded = _rss_mb()
    load_s = time.perf_counter() - t0
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = default_layer(model)
    t0 = time.perf_counter()
    stats = get_second_moment(model, tok, layer, stats_data=args["corpus"], n_tokens=STATS_TOKENS)
    stats_s = time.perf_counter() - t0
    out = {"after_import_mb": after_import, "after_load_mb": loaded, "load_s": load_s, "stats_s": stats_s,
           "weights_mb": total / 2**20, "resident_weights_mb": resident / 2**20, "layer": layer,
           "stats_mb": stats.mom2.numel() * 4 / 2**20}  # fmt: skip
    if args["phase"] == "create":
        hp = ROMEHyperParams(layer=layer, v_steps=5, context_length_params=((5, 4),))
        t0 = time.perf_counter()
        req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
        create_patch(model, tok, [req], hparams=hp, stats=stats)
        out["create_s"] = time.perf_counter() - t0
    sampler.stop()
    out.update(peak_mb=_peak_mb(), peak_anon_mb=sampler.anon, peak_file_mb=sampler.file)
    out["threads"] = torch.get_num_threads()
    return out


def _corpus(path: Path) -> Path:
    import random

    from tests.helpers.tiny_tokenizer import CORPUS

    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(400)))
    return path


def _run_child(args: dict) -> dict:
    code = f"import json, bench.bench_memory as b; print('RESULT ' + json.dumps(b.measure(json.loads({json.dumps(json.dumps(args))}))))"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=HERE.parent, capture_output=True, text=True, timeout=7200
    )
    if r.returncode != 0:
        raise RuntimeError(f"measurement {args} failed:\n{r.stderr[-3000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def run() -> dict:
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="rompatch-bench-memory-"))
    corpus = _corpus(work / "corpus.txt")
    rows, lines = [], []
    lines += [
        "",
        "| configuration | phase | weights (resident) | after import | after load | peak | peak − import | "
        "(peak − import) / resident weights | peak anonymous | peak file-backed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, cfg in CONFIGS.items():
        folder = _folder(cfg["dtype"])
        for phase in ("stats", "create"):
            cache = str(work / f"cache-{name.replace(' ', '_').replace(',', '')}")
            res = _run_child(
                {"folder": str(folder), "phase": phase, "cache": cache, "corpus": str(corpus), **cfg}
            )
            base = res["peak_mb"] - res["after_import_mb"]
            ratio = base / res["resident_weights_mb"]
            lines.append(
                f"| {name} | {phase} | {res['weights_mb']:,.0f} MB ({res['resident_weights_mb']:,.0f} MB) | "
                f"{res['after_import_mb']:,.0f} MB | {res['after_load_mb']:,.0f} MB | {res['peak_mb']:,.0f} MB | "
                f"{base:,.0f} MB | {ratio:.2f} | {res['peak_anon_mb']:,.0f} MB | {res['peak_file_mb']:,.0f} MB |"
            )
            rows.append(
                {
                    "metric": f"peak RSS, {phase}, {name}",
                    "value": round(res["peak_mb"]),
                    "unit": "MB",
                    "target": "≤ 1.3 × weights + C + activations",
                    "note": f"{ratio:.2f} × resident weights beyond the interpreter; load {res['load_s']:.0f} s, "
                    f"statistics {res['stats_s']:.0f} s"
                    + (f", edit {res['create_s']:.0f} s" if "create_s" in res else "")
                    + f" (layer {res['layer']}, {res['threads']} threads)",
                }
            )
    setup = (
        ("SMOKE RUN, shape shrunk 8×: " if _smoke() else "")
        + "random TinyLlama-1.1B-shaped Llama (22 layers, hidden 2048, MLP 5632, vocab 32000, untied head) "
        f"saved as a model folder; each row a fresh process: load, statistics of the default layer "
        f"({STATS_TOKENS:,} tokens), and for 'create' one edit with 5 optimisation steps. Peak: VmHWM; "
        "'after import': the interpreter with torch, transformers and rompatch; anonymous and file-backed: "
        "the peaks of the resident set's two parts (sampled every 20 ms), where file-backed pages are the "
        "memory-mapped checkpoint (transformers maps safetensors; pages are read in as layers run, and the "
        "kernel can drop them again)."
    )
    return {"rows": rows, "markdown": "\n".join(lines), "setup": setup}
