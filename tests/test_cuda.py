"""The engine and statistics on a CUDA device (skipped without one; tracing: tests/tracing/test_trace.py).

The same tiny models as the CPU tests, moved to the GPU: the edit must work there in fp32, bf16 and
fp16, agree with the CPU computation, keep the fast replay, and leave the model untouched.
"""

from __future__ import annotations

import pytest
import torch

from rompatch.apply import patched
from rompatch.create import create_patch
from rompatch.fingerprint import tensor_sha256
from rompatch.rome import compute_delta
from rompatch.stats import get_second_moment
from tests.helpers import HP, REQ, edit_model, edit_tokenizer, greedy_next, needs_cuda
from tests.helpers.tiny import ARCHS

pytestmark = needs_cuda

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMPATCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_create_on_cuda(arch, dtype, text_file):
    model, tok = edit_model(arch).to(CUDA, dtype), edit_tokenizer(arch)
    before = {k: tensor_sha256(v) for k, v in model.state_dict().items()}
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    assert stats.mom2.dtype == torch.float32
    patch = create_patch(model, tok, REQ, hparams=HP, stats=stats)
    assert {k: tensor_sha256(v) for k, v in model.state_dict().items()} == before
    d = patch.deltas[0]
    assert d.u.device.type == "cpu" and d.u.dtype == torch.float32 and torch.isfinite(d.v).all()
    assert d.metrics["replay"] == "suffix"
    target_first = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    assert greedy_next(model, tok, REQ.text) != target_first
    with patched(model, patch):
        assert greedy_next(model, tok, REQ.text) == target_first
    assert {k: tensor_sha256(v) for k, v in model.state_dict().items()} == before


def test_fp16_on_cuda(text_file):
    model, tok = edit_model("llama").to(CUDA, torch.float16), edit_tokenizer("llama")
    stats = get_second_moment(model, tok, 1, stats_data=str(text_file), n_tokens=3000)
    patch = create_patch(model, tok, REQ, hparams=HP, stats=stats)
    assert patch.base["dtype"] == "float16" and patch.deltas[0].metrics["replay"] == "suffix"
    target_first = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    with patched(model, patch):
        assert greedy_next(model, tok, REQ.text) == target_first


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_agrees_with_cpu(arch, text_file):
    """Statistics and the delta computed on the GPU match the CPU's (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    tok = edit_tokenizer(arch)
    cpu = edit_model(arch)
    gpu = edit_model(arch).to(CUDA)
    s_cpu = get_second_moment(cpu, tok, 1, stats_data=str(text_file), n_tokens=3000)
    s_gpu = get_second_moment(gpu, tok, 1, stats_data=str(text_file), n_tokens=3000)
    assert s_cpu.count == s_gpu.count
    torch.testing.assert_close(s_gpu.mom2.cpu(), s_cpu.mom2, rtol=1e-3, atol=1e-4)
    r_cpu = compute_delta(cpu, tok, REQ, stats=s_cpu, hparams=HP)
    r_gpu = compute_delta(gpu, tok, REQ, stats=s_cpu, hparams=HP)
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.cpu(), b.cpu(), dim=0))  # noqa: E731
    assert cos(r_gpu.u, r_cpu.u) > 0.9999
    assert cos(r_gpu.v, r_cpu.v) > 0.98
    assert abs(r_gpu.v.norm() - r_cpu.v.norm()) / r_cpu.v.norm() < 0.05
