"""The one invariant of applying patches: ``W = cast(original + Σ deltas)``, and its inverse.

A touched weight always equals its value before any patch, in float32, plus every applied delta
``v uᵀ`` in application order, cast once to the stored dtype. In-memory apply and revert
(:mod:`rompatch.apply`), checkpoint apply and revert (:mod:`rompatch.checkpoint`), the foreign
revert (subtracting deltas from a checkpoint rompatch did not write) and ``diff`` all compute it
here, so their results are bit-identical.

Every element goes through ``fl(acc + fl(a_i · b_j))`` per delta, in order. ``(a, b)`` are the
delta's factors in the stored weight's orientation (:func:`stored_factors`): rows ``v`` and columns
``u`` for a ``Linear`` weight (out × in), the transpose for GPT-2's ``Conv1D`` (in × out). Float
products commute, so building the update a block of rows at a time, or transposed, gives the
same bits as ``acc.add_(delta.matrix(layout))`` on the whole matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (row factor, column factor) of one delta

_CHUNK_ELEMS = 4 << 20  # whole-matrix sums build the update this many float32 elements at a time
_BLOCK_ELEMS = 1 << 18  # chained sums hand over rows in blocks of about this many elements
# ... computed in sub-blocks below torch's intra-op grain size (at::internal::GRAIN_SIZE, 32768
# elements): torch runs an elementwise op on fewer elements on the calling thread, so the arithmetic
# stays on one core (a shard copy and hashing may use others) without changing torch's process-wide
# thread count. Rows longer than that are one sub-block each (torch may split those).
_SUB_BLOCK_ELEMS = (1 << 15) - 1


def stored_factors(delta: Any, layout: str) -> Factors:
    """``delta``'s ``(row, column)`` factors in the stored weight's orientation."""
    return (delta.u, delta.v) if layout == "conv1d" else (delta.v, delta.u)


def whole(patch: Any) -> tuple[Any, range]:
    """``(patch, all its delta indices)``, a part for :func:`factors_on`."""
    return patch, range(len(patch.deltas))


def factors_on(name: str, parts: Iterable[tuple[Any, Iterable[int]]]) -> list[Factors]:
    """Factors of every delta on parameter ``name`` in ``parts`` (``(patch, delta indices)``), in order."""
    out = []
    for p, idx in parts:
        for i in idx:
            d = p.deltas[i]
            if d.parameter == name:
                out.append(stored_factors(d, p.parameters[name].layout))
    return out


def add_rows(
    acc: torch.Tensor,
    factors: Sequence[Factors],
    start: int,
    *,
    sign: int = 1,
    scratch: torch.Tensor | None = None,
) -> None:
    """``acc ±= outer(a[start : start + len(acc)], b)`` for each ``(a, b)`` in order (float32 rows).

    ``scratch``: a float32 buffer of at least ``acc``'s shape for the products (no allocation).
    """
    n = acc.shape[0]
    for a, b in factors:
        if scratch is None:
            prod = torch.outer(a[start : start + n], b)
        else:
            prod = torch.mul(a[start : start + n, None], b[None, :], out=scratch[:n])
        acc.add_(prod) if sign > 0 else acc.sub_(prod)


def add_deltas(acc: torch.Tensor, factors: Sequence[Factors], *, sign: int = 1) -> None:
    """``acc ±= Σ outer(a, b)`` in place, a delta at a time, without the full dense update."""
    for f in factors:
        step = max(1, _CHUNK_ELEMS // max(1, f[1].numel()))
        for r in range(0, f[0].numel(), step):
            add_rows(acc[r : r + step], [f], r, sign=sign)


def accumulate(original: torch.Tensor, factors: Sequence[Factors]) -> torch.Tensor:
    """float32 ``original + Σ deltas`` (a new tensor; ``original`` is never aliased)."""
    acc = original.to(torch.float32, copy=True)
    add_deltas(acc, factors)
    return acc


def apply_deltas(
    original: torch.Tensor, factors: Sequence[Factors], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``cast(original + Σ deltas)`` to ``dtype`` (default: ``original``'s); a copy when no delta."""
    if not factors:
        return original.clone()
    return accumulate(original, factors).to(dtype or original.dtype)


def remove_deltas(value: torch.Tensor, factors: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse without the original: ``cast(value - Σ deltas)`` subtracting the deltas newest first
    (``factors`` in application order), and the exact float32 difference before the cast."""
    acc = value.to(torch.float32, copy=True)
    add_deltas(acc, factors[::-1], sign=-1)
    return acc.to(value.dtype), acc


def update(shape: Sequence[int], factors: Sequence[Factors]) -> torch.Tensor:
    """``Σ deltas`` alone, float32 (summed from zero in order)."""
    acc = torch.zeros(tuple(shape), dtype=torch.float32)
    add_deltas(acc, factors)
    return acc


def minus_update(value: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``cast(value - total)`` for a summed update ``total`` (:func:`update`), in one subtraction."""
    return (value.to(torch.float32) - total).to(value.dtype)


def chained(
    original: torch.Tensor,
    steps: Sequence[Sequence[Factors]],
    on_block: Callable[[int, int, list[torch.Tensor]], None] | None = None,
) -> torch.Tensor:
    """``cast(original + Σ steps[0] + … + Σ steps[k])`` for every ``k``, by blocks of rows; returns the last.

    Each row block's values after every step are passed to ``on_block(first row, rows, values)`` as
    soon as they are computed (for hashing), then dropped (except the last step's, kept in the result).
    The sum stays in float32 across the steps: a step's cast is only its output, so the last value is
    exactly :func:`apply_deltas` over all steps' factors. ``original`` is a matrix (rows × columns).
    """
    if not steps:
        return original
    rows = original.shape[0]
    cols = original.numel() // rows
    step = max(1, _BLOCK_ELEMS // cols)
    sub = max(1, _SUB_BLOCK_ELEMS // cols)
    out = torch.empty_like(original)
    acc = torch.empty((min(sub, rows), cols), dtype=torch.float32)
    prod = torch.empty_like(acc)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        blks = [torch.empty_like(original[r : r + n]) for _ in steps[:-1]] + [out[r : r + n]]
        for s in range(r, r + n, sub):
            m = min(sub, r + n - s)
            acc[:m].copy_(original[s : s + m])  # exact: float32 holds every value of the narrower dtypes
            for fs, blk in zip(steps, blks):
                add_rows(acc[:m], fs, s, scratch=prod)
                blk[s - r : s - r + m].copy_(acc[:m])  # the cast of the sum; same rounding as .to()
        if on_block is not None:
            on_block(r, n, blks)
    return out
