"""rompatch.numerics: cast(original + Σ deltas) and its inverse, bit for bit, in every dtype and layout."""

from __future__ import annotations

import pytest
import torch

from rompatch import numerics
from rompatch.patch import ParamInfo, RankOneDelta, new_patch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _patch(rows: int, cols: int, layout: str, n: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = (rows, cols) if layout == "conv1d" else (cols, rows)
    deltas = [
        RankOneDelta(
            u=torch.randn(n_in, generator=g), v=torch.randn(n_out, generator=g), layer=0, parameter="w"
        )
        for _ in range(n)
    ]
    info = ParamInfo(
        shape=(rows, cols), dtype=str(dtype).removeprefix("torch."), sha256="0" * 64, layout=layout
    )
    return new_patch(deltas, base={"model": "m", "model_type": "llama"}, parameters={"w": info})


def _reference(original, patches, layout):
    """The definition: float32 sum of the dense updates in order, one cast."""
    acc = original.to(torch.float32, copy=True)
    for p in patches:
        for d in p.deltas:
            acc.add_(d.matrix(layout))
    return acc


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_deltas_is_the_dense_float32_sum_cast_once(dtype, layout):
    g = torch.Generator().manual_seed(1)
    original = torch.randn(48, 40, generator=g).to(dtype)
    patches = [_patch(48, 40, layout, n=k + 1, seed=k, dtype=dtype) for k in range(3)]
    fs = numerics.factors_on("w", [numerics.whole(p) for p in patches])
    value = numerics.apply_deltas(original, fs)
    assert value.dtype == dtype and torch.equal(value, _reference(original, patches, layout).to(dtype))
    assert not torch.equal(value, original)
    assert numerics.apply_deltas(original, []) is not original  # a copy, never an alias
    assert torch.equal(numerics.apply_deltas(original, []), original)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_conv1d_factors_are_the_transposed_update(layout):
    p = _patch(6, 5, layout, n=1, seed=0, dtype=torch.float32)
    a, b = numerics.stored_factors(p.deltas[0], layout)
    assert torch.equal(torch.outer(a, b), p.deltas[0].matrix(layout))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_wise_equals_whole(dtype, monkeypatch):
    """Rows built a few at a time (add_deltas), and the chained blocks and sub-blocks, equal the whole."""
    g = torch.Generator().manual_seed(2)
    original = torch.randn(6000, 100, generator=g).to(dtype)
    patches = [_patch(6000, 100, "linear", n=2, seed=k, dtype=dtype) for k in range(2)]
    fs = numerics.factors_on("w", [numerics.whole(p) for p in patches])
    whole = numerics.apply_deltas(original, fs)
    monkeypatch.setattr(numerics, "_CHUNK_ELEMS", 700)  # 7 rows at a time
    assert torch.equal(numerics.apply_deltas(original, fs), whole)
    steps = [numerics.factors_on("w", [numerics.whole(p)]) for p in patches]
    seen = []
    chained = numerics.chained(
        original, steps, lambda r, n, blks: seen.append((r, n, [b.clone() for b in blks]))
    )
    assert torch.equal(chained, whole)
    first = torch.cat([blks[0] for _, _, blks in seen])
    assert torch.equal(first, numerics.apply_deltas(original, steps[0]))  # each step's cast sum
    assert sum(n for _, n, _ in seen) == 6000 and len(seen) > 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_remove_deltas_subtracts_newest_first_and_reports_the_exact_difference(dtype):
    g = torch.Generator().manual_seed(3)
    original = torch.randn(20, 30, generator=g).to(dtype)
    p = _patch(20, 30, "linear", n=3, seed=4, dtype=dtype)
    fs = numerics.factors_on("w", [numerics.whole(p)])
    value = numerics.apply_deltas(original, fs)
    back, exact = numerics.remove_deltas(value, fs)
    acc = value.to(torch.float32, copy=True)
    for d in reversed(p.deltas):
        acc.sub_(d.matrix("linear"))
    assert torch.equal(exact, acc) and torch.equal(back, acc.to(dtype))
    if dtype == torch.float32:
        assert torch.allclose(back, original, atol=1e-4)


def test_update_and_minus_update():
    p = _patch(8, 9, "conv1d", n=2, seed=5, dtype=torch.float32)
    fs = numerics.factors_on("w", [numerics.whole(p)])
    total = numerics.update((8, 9), fs)
    assert torch.equal(total, _reference(torch.zeros(8, 9), [p], "conv1d"))
    w = torch.randn(8, 9).to(torch.bfloat16)
    assert torch.equal(numerics.minus_update(w, total), (w.float() - total).to(torch.bfloat16))


def test_factors_on_keeps_only_the_parameter_and_the_indices():
    p = _patch(4, 3, "linear", n=3, seed=6, dtype=torch.float32)
    fs = numerics.factors_on("w", [(p, [2, 0])])
    assert [f[0] for f in fs] == [p.deltas[2].v, p.deltas[0].v]
    assert numerics.factors_on("other", [numerics.whole(p)]) == []
