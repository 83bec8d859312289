"""A patch stack recomputed on a checkpoint: values and fingerprints equal the in-memory apply."""

from __future__ import annotations

import pytest
import torch

from rompatch.checkpoint.record import AppliedEntry
from rompatch.checkpoint.rewrite import chain
from rompatch.fingerprint import tensor_sha256
from rompatch.patch import ParamInfo, RankOneDelta, new_patch
from tests.helpers.ckpt import (
    DTYPES,
)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chain_is_the_in_memory_sum_over_blocks_and_sub_blocks(dtype, layout):
    """A matrix of several row blocks and sub-blocks, neither a multiple of the row count: the value
    and every fingerprint are those of cast(original + Σ deltas) computed whole, as in-memory apply does."""
    rows, cols = 6000, 100  # 3 hashing blocks of ≤ 2621 rows, computed 327 rows at a time
    g = torch.Generator().manual_seed(0)
    original = torch.randn(rows, cols, generator=g).to(dtype)
    name = "w"
    n_in, n_out = (rows, cols) if layout == "conv1d" else (cols, rows)
    patches = []
    for k in range(3):
        deltas = [
            RankOneDelta(
                u=torch.randn(n_in, generator=g), v=torch.randn(n_out, generator=g), layer=0, parameter=name
            )
            for _ in range(k + 1)
        ]
        info = ParamInfo(
            shape=(rows, cols), dtype=str(dtype).removeprefix("torch."), sha256="0" * 64, layout=layout
        )
        patches.append(new_patch(deltas, base={"model": "m", "model_type": "llama"}, parameters={name: info}))

    value, prints, base_sha = chain(original, [AppliedEntry(p) for p in patches], name, None)

    acc = original.to(torch.float32, copy=True)
    expected = []
    for p in patches:
        for d in p.deltas:
            acc.add_(d.matrix(layout))
        expected.append(acc.to(dtype, copy=True))
    assert torch.equal(value, expected[-1]) and value.dtype == dtype
    assert base_sha == tensor_sha256(original)
    shas = [tensor_sha256(original)] + [tensor_sha256(e) for e in expected]
    assert prints == {k: {"before": shas[k], "after": shas[k + 1]} for k in range(3)}
