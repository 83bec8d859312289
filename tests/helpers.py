"""Test helpers: patches from chosen vectors (independent of the edit engine)."""

from __future__ import annotations

import pytest
import torch

from rompatch.arch import get_spec, module_io
from rompatch.models import model_identity
from rompatch.patch import ParamInfo, RankOneDelta, new_patch
from rompatch.request import EditRequest

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
