"""Issue 4: apply / revert / extract on a checkpoint on disk (a >= 1 GB random Llama in 4+ shards).

apply fsyncs what it writes before OUT appears (rompatch.atomic), so the copy baseline is fsynced
too; both are also given without fsync. Each operation runs in a fresh subprocess started by a small launcher, whose
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the operation's peak RSS alone (a child forked from this
large process would inherit its high-water mark). Times are taken inside the subprocess around the
library call (Python and torch import excluded, reported separately). The baseline is ``shutil.copyfile`` of only the shard(s) the apply rewrites, on
the same (warm page cache) files.

``ROMPATCH_EXTRACT_PATCH=patch.safetensors`` (a patch made on smollm2-135m, e.g. a real ROME edit)
replaces the random rank-one patch on SmolLM2 layer 6 used for the extract row.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rompatch.constants import CHECKPOINT_UNDO

TITLE = "Checkpoints on disk: apply / revert / extract (random Llama, bf16, >= 1 GB, 4+ shards)"
FULL_ONLY = False

REPO = Path(__file__).resolve().parent.parent
# TinyLlama-1.1B's shape (a real, small Llama): 2.2 GB in bf16, written as 4 shards.
CONFIG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
SHARD_BYTES = 600_000_000
EDIT_LAYER = 11


def _tensors(cfg: dict) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out: list = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_checkpoint(folder: Path) -> dict:
    """Write a random bf16 Llama straight to safetensors shards (no model object, one shard in RAM)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in _tensors(CONFIG):
        n = math.prod(shape) * 2
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=g).to(torch.bfloat16)
        shards[-1][name] = t
        size += n
    weight_map, total = {}, 0
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for fname, tensors in zip(names, shards):
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            total += t.numel() * 2
    shards.clear()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg = dict(
        CONFIG,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"bytes": sum((folder / f).stat().st_size for f in names), "shards": len(names)}


def make_patch(folder: Path, path: Path, layer: int, *, scale: float = 0.01, seed: int = 0):
    """A random rank-one patch on ``layer``'s down_proj, fingerprinted from the bytes on disk."""
    from rompatch.checkpoint.reader import open_checkpoint
    from rompatch.patch import ParamInfo, RankOneDelta, new_patch, save_patch

    ck = open_checkpoint(folder)
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    e = ck.entry(name)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(e.shape[1], generator=g)
    d = RankOneDelta(u / u.norm(), torch.randn(e.shape[0], generator=g) * scale, layer, name, kind="manual")
    base = {"model": str(folder), "revision": None, "model_type": "llama", "dtype": e.dtype_name}
    p = new_patch(
        [d],
        base=base,
        parameters={name: ParamInfo(shape=e.shape, dtype=e.dtype_name, sha256=ck.sha256(name))},
    )
    save_patch(p, path)
    return p, e


_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import rompatch.checkpoint.operations as C
t1 = time.perf_counter()
op, args = sys.argv[1], json.loads(sys.argv[2])
if args.pop("durable", True) is False:  # the fsync cost row: the same apply without fsync
    import rompatch.atomic as A
    A.sync_tree = A._fsync_path = lambda *a, **k: None
c1 = time.process_time()
if op == "apply":
    r = C.apply_to_checkpoint(args["base"], args["patches"], args["out"], overwrite=args.get("overwrite", False))
elif op == "revert":
    r = C.revert_checkpoint(args["ckpt"], args["patches"], out=args.get("out"), in_place=args.get("in_place", False))
elif op == "idle":
    r = None
t2 = time.perf_counter()
c2 = time.process_time()
hwm = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")]
print(json.dumps({"import_s": t1 - t0, "op_s": t2 - t1, "cpu_s": c2 - c1, "vmhwm": hwm[0] if hwm else None,
                  "result": None if r is None else r.to_json()}))
"""

# A small launcher runs each child: a child forked straight from this (large) process would inherit
# its RSS high-water mark. The launcher reports the child's ru_maxrss from getrusage(RUSAGE_CHILDREN).
_LAUNCH = r"""
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True)
sys.stderr.buffer.write(p.stderr)
if p.returncode:
    sys.exit(p.returncode)
sys.stdout.buffer.write(p.stdout)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def child(op: str, **args) -> dict:
    """Run one operation in a fresh Python; returns its timings, result and peak RSS (bytes)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    os.sync()  # start every timed operation with no dirty pages waiting for writeback
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", _LAUNCH, sys.executable, "-c", _CHILD, op, json.dumps(args)],
        env=env,
        capture_output=True,
    )
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{op} failed: {p.stderr.decode()[-2000:]}")
    lines = p.stdout.decode().strip().splitlines()
    res = json.loads(lines[-2])
    res["wall_s"] = wall
    res["maxrss"] = int(lines[-1]) * 1024  # Linux reports KiB
    return res


def _copy_time(src: Path, dst: Path, *, durable: bool = True) -> tuple[float, float]:
    """Wall and CPU seconds of copying ``src``; ``durable``: and fsyncing the copy, as apply does."""
    os.sync()
    t, c = time.perf_counter(), time.process_time()
    shutil.copyfile(src, dst)
    if durable:
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    os.remove(dst)
    return dt, dc


def _extract_smollm2(work: Path) -> dict:
    from rompatch.checkpoint.diff import diff_patches
    from rompatch.checkpoint.extract import extract_patch
    from rompatch.checkpoint.operations import apply_to_checkpoint
    from rompatch.models import ensure_embedded
    from rompatch.patch import load_patch

    src = ensure_embedded("smollm2-135m")
    ref = os.environ.get("ROMPATCH_EXTRACT_PATCH")
    if ref:
        patch, label = load_patch(ref), f"patch {ref}"
    else:
        patch, _ = make_patch(src, work / "smol-patch.safetensors", 6, scale=0.05)
        label = (
            "random rank-one patch on layer 6 (‖u‖=1, v ~ N(0, 0.05²)), stand-in until a ROME edit is given"
        )
    apply_to_checkpoint(src, [patch], work / "smol-edited")
    t = time.perf_counter()
    ex = extract_patch(src, work / "smol-edited")
    dt = time.perf_counter() - t
    r = diff_patches(patch, ex)
    shutil.rmtree(work / "smol-edited")
    return {"label": label, "both": r["both"], "n_extracted": len(ex.deltas), "seconds": dt}


def run() -> dict:
    from rompatch.checkpoint.extract import extract_patch
    from rompatch.checkpoint.reader import open_checkpoint
    from rompatch.fingerprint import tensor_sha256

    work = Path(tempfile.mkdtemp(prefix="rompatch-bench-ckpt."))
    load0 = os.getloadavg()[0]
    try:
        base = work / "base"
        t = time.perf_counter()
        info = build_checkpoint(base)
        build_s = time.perf_counter() - t
        patch_path = work / "patch.safetensors"
        patch, entry = make_patch(base, patch_path, EDIT_LAYER)
        shard = base / entry.file
        shard_bytes = shard.stat().st_size

        idle = child("idle")
        copies, plain_copies, applies, unsynced = [], [], [], []
        for k in range(3):
            copies.append(_copy_time(shard, work / f"copy-{k}"))
            plain_copies.append(_copy_time(shard, work / f"copy-{k}", durable=False)[0])
            r = child("apply", base=str(base), patches=[str(patch_path)], out=str(work / f"out-{k}"))
            applies.append(r)
            if k:
                shutil.rmtree(work / f"out-{k}")
            r = child(
                "apply", base=str(base), patches=[str(patch_path)], out=str(work / "nosync"), durable=False
            )
            unsynced.append(r["op_s"])
            shutil.rmtree(work / "nosync")
        res = applies[0]["result"]
        assert res["rewritten"] == [entry.file], res["rewritten"]
        copy_s = statistics.median(c[0] for c in copies)
        copy_cpu = statistics.median(c[1] for c in copies)
        apply_cpu = statistics.median(a["cpu_s"] for a in applies)
        apply_s = statistics.median(a["op_s"] for a in applies)
        apply_rss = max(a["maxrss"] for a in applies)

        out = work / "out-0"
        rev = child("revert", ckpt=str(out), patches=[patch.id[:12]], out=str(work / "reverted"))
        ck_rev, ck_base = open_checkpoint(work / "reverted"), open_checkpoint(base)
        name = patch.deltas[0].parameter
        assert ck_rev.sha256(name) == ck_base.sha256(name), "revert must restore the base bytes"
        assert filecmp.cmp(work / "reverted" / entry.file, shard, shallow=False)
        shutil.rmtree(work / "reverted")
        rev_in = child("revert", ckpt=str(out), patches=[patch.id[:12]], in_place=True)
        assert tensor_sha256(open_checkpoint(out).read(name)) == ck_base.sha256(name)

        child("apply", base=str(base), patches=[str(patch_path)], out=str(out), overwrite=True)
        t = time.perf_counter()
        ex = extract_patch(base, out)
        extract_s = time.perf_counter() - t
        from rompatch.checkpoint.diff import diff_patches

        (pair,) = diff_patches(patch, ex)["both"]
        smol = _extract_smollm2(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    touched = entry.nbytes
    mb = 1e6
    load = f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (2 cores shared with other jobs)"
    smol_cos = ", ".join(f"cos u {e['cos_u']:.9f}, cos v {e['cos_v']:.9f}" for e in smol["both"])
    rows = [
        {
            "metric": "apply wall time / copying the rewritten shard (both fsynced)",
            "value": apply_s / copy_s,
            "unit": "×",
            "target": "<= 1.5",
            "note": f"apply {apply_s:.3f} s (median of 3, in-process) vs shutil.copyfile + fsync {copy_s:.3f} s of "
            f"the {shard_bytes / mb:.0f} MB shard (without fsync: apply {statistics.median(unsynced):.3f} s, copy "
            f"{statistics.median(plain_copies):.3f} s); subprocess wall incl. imports "
            f"{statistics.median(a['wall_s'] for a in applies):.2f} s",
        },
        {
            "metric": "apply: cost of fsync (files and folders before the final rename, the parent after)",
            "value": apply_s - statistics.median(unsynced),
            "unit": "s",
            "note": f"apply {apply_s:.3f} s with fsync vs {statistics.median(unsynced):.3f} s without (medians of 3): "
            "the rewritten shard, the record and undo data reach the disk before OUT appears (hard-linked "
            "shards are already on disk)",
        },
        {
            "metric": "apply CPU time / copy CPU time",
            "value": apply_cpu / copy_cpu,
            "unit": "×",
            "note": f"apply {apply_cpu:.3f} CPU-s (all threads) vs copy {copy_cpu:.3f} CPU-s: the work apply adds, "
            "independent of machine load (the shard copy overlaps with it in wall time)",
        },
        {
            "metric": "apply peak RSS",
            "value": apply_rss / mb,
            "unit": "MB",
            "target": "≈ touched tensors + runtime",
            "note": f"touched tensor {touched / mb:.1f} MB ({name} {list(entry.shape)} bf16); a Python that only "
            f"imports rompatch.checkpoint.operations peaks at {idle['maxrss'] / mb:.0f} MB, so apply adds "
            f"{(apply_rss - idle['maxrss']) / mb:.0f} MB ({(apply_rss - idle['maxrss']) / touched:.1f}× the tensor); "
            f"checkpoint is {info['bytes'] / mb:.0f} MB",
        },
        {
            "metric": "revert time (-o OUT)",
            "value": rev["op_s"],
            "unit": "s",
            "note": f"in place (--in-place): {rev_in['op_s']:.3f} s; both restore the shard byte for byte; peak RSS "
            f"{rev['maxrss'] / mb:.0f} MB",
        },
        {
            "metric": "undo data size",
            "value": res["undo_bytes"] / mb,
            "unit": "MB",
            "note": f"{CHECKPOINT_UNDO}: the original bytes of the touched tensor ({touched / mb:.1f} MB) + the patch vectors",
        },
        {
            "metric": "extract from the apply output (2.2 GB checkpoint)",
            "value": extract_s,
            "unit": "s",
            "note": f"cos u {pair['cos_u']:.9f}, cos v {pair['cos_v']:.9f} vs the applied patch (bf16 rounding in the edited "
            "checkpoint limits them)",
        },
        {
            "metric": "extract on SmolLM2-135M (float32), one edit",
            "value": smol["seconds"],
            "unit": "s",
            "note": f"{smol_cos}; {smol['n_extracted']} delta(s) extracted; {smol['label']}",
        },
    ]
    setup = (
        f"A random Llama-shaped checkpoint written with safetensors (no model object): hidden {CONFIG['hidden_size']}, "
        f"MLP {CONFIG['intermediate_size']}, {CONFIG['num_hidden_layers']} layers, vocab {CONFIG['vocab_size']}, bf16, "
        f"{info['bytes'] / mb:.0f} MB in {info['shards']} shards (built in {build_s:.1f} s; TinyLlama-1.1B's shape). "
        f"One rank-one patch on "
        f"layer {EDIT_LAYER}'s down_proj. Files are in the page cache (just written) for both apply and the copy "
        "baseline, and os.sync() runs before each timed operation (so neither waits on the other's "
        "writeback). Untouched shards are hard-linked, so apply costs about one copy of the rewritten shard plus "
        "reading, hashing (sha256 before and after), recomputing and writing (shard and undo data) the touched "
        f"tensor; the shard copy runs in the background meanwhile. Load average during the run: {load}."
    )
    return {"setup": setup, "rows": rows}
