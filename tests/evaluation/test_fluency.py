"""Top-k generation for fluency: batching that changes nothing, seeded sampling."""

from __future__ import annotations

from rompatch.evaluation.fluency import GenerationSettings, generate_topk, generate_topk_ids
from tests.helpers.evaluation import GEN


def test_generation_batching_is_exact_and_seeded(tiny):
    model, tok, _ = tiny
    prompts = ["The capital of Japan is", "Apple was founded by Steve", "It"]
    greedy = GenerationSettings(max_out_len=12, top_k=1)
    batched = generate_topk(model, tok, prompts, settings=greedy)
    alone = [generate_topk(model, tok, [p], settings=greedy)[0] for p in prompts]
    assert batched == alone  # left padding + position ids: a prompt sees what it sees alone
    ids = generate_topk_ids(model, tok, prompts, settings=greedy)
    for p, t, x in zip(prompts, batched, ids):  # max_out_len counts the prompt's tokens too
        assert t.startswith(p) and len(x) == 12 and x[: len(tok(p)["input_ids"])] == tok(p)["input_ids"]
    a = generate_topk(model, tok, prompts, settings=GEN)
    assert a == generate_topk(model, tok, prompts, settings=GEN)
    assert a != generate_topk(model, tok, prompts, settings=GenerationSettings(max_out_len=14, seed=1))
