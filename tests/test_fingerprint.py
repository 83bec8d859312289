"""TensorMemo: results memoised per tensor version, never served to another tensor."""

from __future__ import annotations

import weakref
from functools import partial

import numpy as np
import pytest
import torch

from rompatch.fingerprint import TensorMemo


def _key(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def _total(t: torch.Tensor) -> float:
    return float(t.sum())


def test_memo_never_serves_a_freed_tensors_result():
    """A tensor freed and a new one at the same address (same id, storage, version, shape, dtype)
    with other values: the memo must compute the new one's result, not return the old one's
    (what served one layer's LU factors for another layer's statistics)."""
    buf = np.zeros(64, dtype=np.float32)  # one buffer: every tensor made on it has the same data_ptr
    for _ in range(100):  # CPython reuses a freed object's id at once; retry if something took it
        memo = TensorMemo(4)
        buf[:] = 1.0
        a = torch.frombuffer(buf, dtype=torch.float32)
        assert memo.get(a, partial(_total, a)) == 64.0
        freed = _key(a)
        del a
        buf[:] = 2.0  # written around torch, so the new tensor's version is 0 like the old one's
        b = torch.frombuffer(buf, dtype=torch.float32)
        if _key(b) == freed:
            break
    else:
        pytest.fail("no tensor reused the freed tensor's id and address in 100 tries")
    assert memo.get(b, partial(_total, b)) == 128.0


def test_memo_recomputes_after_an_in_place_change_and_serves_the_same_version():
    memo = TensorMemo(4)
    t = torch.ones(8)
    calls = []

    def total() -> float:
        calls.append(1)
        return float(t.sum())

    assert memo.get(t, total) == 8.0
    assert memo.get(t, total) == 8.0
    assert len(calls) == 1
    t.add_(1)
    assert memo.get(t, total) == 16.0
    assert len(calls) == 2


def test_memo_drops_a_result_when_its_tensor_is_freed():
    """A memoised result (an LU factor can be a gigabyte) does not outlive its tensor."""

    class Result:
        pass

    memo = TensorMemo(4)
    t = torch.ones(8)
    result = weakref.ref(memo.get(t, Result))
    assert result() is not None
    del t
    assert result() is None
